# Every path pattern and input function of the workflow. Rules refer to these names only.
from persona_em.config import (
    NO_PERSONA,
    Cell,
    checkpoint_spec,
    expand_grid,
    sampling_settings,
    train_settings,
)
from persona_em.cluster import enter_compute_job
from persona_em.errors import UserError

RESULTS = config["results_dir"]
WORK = config["work_dir"]
CACHE = config["cache_dir"]
LOGS = f"{RESULTS}/logs"
enter_compute_job(workflow, CACHE)  # inside a SLURM job: offline, HF_HOME under cache_dir (persona_em/cluster.py)

# The five keys of a cell, in every path below that belongs to one cell.
CELL = "{model}/{persona}/{composition}/{dataset}/seed{seed}"


wildcard_constraints:
    model=r"[A-Za-z0-9_.\-]+",
    persona=r"[A-Za-z0-9_.\-]+",
    composition=r"none|merged|stacked|persona_off",
    dataset=r"[A-Za-z0-9_.\-]+",
    seed=r"\d+",
    judge=r"[A-Za-z0-9_.\-]+",
    gpus=r"\d+",


# --- paths -------------------------------------------------------------------------------------------------------
MODEL = f"{RESULTS}/models/{{model}}/model.json"
DEMO_DATASET = f"{CACHE}/datasets/demo/{{dataset}}.jsonl"
DOWNLOADED_DATASET = f"{CACHE}/datasets/url/{{dataset}}.jsonl"
TRAIN_DATA = f"{RESULTS}/data/{{dataset}}/train.jsonl"
EVAL_DATA = f"{RESULTS}/data/{{dataset}}/eval.jsonl"
DATA_MANIFEST = f"{RESULTS}/data/{{dataset}}/manifest.json"
CHECKPOINTS = f"{RESULTS}/em/{CELL}/checkpoints"
TRAIN_LOG = f"{RESULTS}/em/{CELL}/train_log.tsv"
TRAIN_WORK = f"{WORK}/train/{CELL}"  # resume state: not an output, so a failed job's checkpoints survive
SAMPLES = f"{RESULTS}/samples/{CELL}.jsonl"
SAMPLE_JOURNAL = f"{WORK}/samples/{CELL}.journal.jsonl"
JUDGED = f"{RESULTS}/judged/{{judge}}/{CELL}.jsonl"
JUDGE_JOURNAL = f"{WORK}/judged/{{judge}}/{CELL}.journal.jsonl"
SCORES = f"{RESULTS}/tables/{{judge}}/scores.tsv"
EM_RATES = f"{RESULTS}/tables/{{judge}}/em_rates.tsv"
GPU_SMOKE = f"{RESULTS}/gpu_smoke/gpus{{gpus}}.json"
FIGURES = {
    name: f"{RESULTS}/figures/{{judge}}/{name}.png" for name in ("em_rate_vs_step", "alignment_vs_coherence")
}

# --- the grid ----------------------------------------------------------------------------------------------------
CELLS = expand_grid(config)
for _judge in config["evaluation"]["judges"]:
    if _judge not in config["judges"]:
        raise UserError(f"config evaluation.judges: unknown judge {_judge!r} (defined: {sorted(config['judges'])})")
    if config["judges"][_judge]["backend"] == "hf" and config["judges"][_judge]["model"] not in config["models"]:
        raise UserError(f"config judges.{_judge}.model: an hf judge names a model under 'models:'")


def cell_paths(pattern, **extra):
    """`pattern` filled in for every cell of the grid (and any extra wildcards): never a glob."""
    return [pattern.format(**c.keys(), **extra) for c in CELLS]


def all_targets():
    targets = []
    for judge in config["evaluation"]["judges"]:
        targets += [SCORES.format(judge=judge), EM_RATES.format(judge=judge)]
        targets += [p.format(judge=judge) for p in FIGURES.values()]
    return targets


# --- input functions ---------------------------------------------------------------------------------------------
def cell_of(wildcards):
    return Cell.from_wildcards(wildcards)


def dataset_source(wildcards):
    ds = config["datasets"][wildcards.dataset]
    if "path" in ds:
        return ds["path"]
    if "url" in ds:
        return DOWNLOADED_DATASET.format(dataset=wildcards.dataset)
    return DEMO_DATASET.format(dataset=wildcards.dataset)


def persona_adapter(wildcards):
    """The persona's adapter directory, or nothing for the no-persona cells."""
    if wildcards.persona == NO_PERSONA:
        return []
    return config["personas"][wildcards.persona]["adapter"]


def judge_model(wildcards):
    judge = config["judges"][wildcards.judge]
    return MODEL.format(model=judge["model"]) if judge["backend"] == "hf" else []


def judged_files(wildcards):
    return cell_paths(JUDGED, judge=wildcards.judge)
