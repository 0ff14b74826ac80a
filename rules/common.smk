# Every path pattern and input function of the workflow. Rules refer to these names only.
import re
from pathlib import Path

from persona_em.activations.persona_vectors import check_config as check_persona_vector_config
from persona_em.activations.settings import activation_settings, check_config as check_activation_config
from persona_em.artifacts import (
    ACTIVATION_FIGURES,
    ACTIVATION_TABLES,
    FIGURE_NAMES,
    FIGURE_SUFFIXES,
    RETENTION_FIGURES,
    RETENTION_TABLES,
    TABLE_NAMES,
    WEIGHT_FIGURE_NAMES,
    WEIGHT_TABLE_NAMES,
)
from persona_em.config import (
    NO_PERSONA,
    Cell,
    check_cell,
    checkpoint_spec,
    control_pairs,
    expand_grid,
    model_source,
    sampling_settings,
    train_settings,
)
from persona_em.cluster import enter_compute_job
from persona_em.errors import UserError
from persona_em.analysis.onset import onset_settings
from persona_em.judging.identity import judge_key, judge_key_identity, questions_sha256
from persona_em.persona.settings import check_persona_config, generator_settings
from persona_em.data.questions import load_questions

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
    composition=r"none|merged|stacked|persona_off|posthoc",
    dataset=r"[A-Za-z0-9_.\-]+",
    treatment=r"[A-Za-z0-9_.\-]+",
    control=r"[A-Za-z0-9_.\-]+",
    seed=r"\d+",
    judge=r"[A-Za-z0-9_.\-]+",
    judge_a=r"[A-Za-z0-9_.\-]+",
    judge_b=r"[A-Za-z0-9_.\-]+",
    questions_sha=r"[0-9a-f]{64}",
    gpus=r"\d+",


# --- paths -------------------------------------------------------------------------------------------------------
MODEL = f"{RESULTS}/models/{{model}}/model.json"
DEMO_DATASET = f"{CACHE}/datasets/demo/{{dataset}}.jsonl"
DOWNLOADED_DATASET = f"{CACHE}/datasets/url/{{dataset}}.jsonl"
TRAIN_DATA = f"{RESULTS}/data/{{dataset}}/train.jsonl"
EVAL_DATA = f"{RESULTS}/data/{{dataset}}/eval.jsonl"
DATA_MANIFEST = f"{RESULTS}/data/{{dataset}}/manifest.json"
CONTROL_OVERLAP = f"{RESULTS}/data/controls/{{treatment}}__vs__{{control}}.json"  # per analysis.controls pair
CHECKPOINTS = f"{RESULTS}/em/{CELL}/checkpoints"
TRAIN_LOG = f"{RESULTS}/em/{CELL}/train_log.tsv"
TRAIN_WORK = f"{WORK}/train/{CELL}"  # resume state: not an output, so a failed job's checkpoints survive
SAMPLES = f"{RESULTS}/samples/{CELL}.jsonl"
SAMPLE_JOURNAL = f"{WORK}/samples/{CELL}.journal.jsonl"
# {judge} (and {judge_a}, {judge_b}) is a judge's path key, `<name>-<hash of what it answers>` (JUDGE_KEYS below):
# changing what a judge name means writes new paths and never touches the old ones.
JUDGED = f"{RESULTS}/judged/{{judge}}/{CELL}.jsonl"
JUDGE_JOURNAL = f"{WORK}/judged/{{judge}}/{CELL}.journal.jsonl"
SCORES = f"{RESULTS}/tables/{{judge}}/scores.tsv"
EM_RATES = f"{RESULTS}/tables/{{judge}}/em_rates.tsv"
SUMMARY = f"{RESULTS}/tables/{{judge}}/summary.tsv"
SEED_SUMMARY = f"{RESULTS}/tables/{{judge}}/seeds.tsv"
COMPARISONS = f"{RESULTS}/tables/{{judge}}/comparisons.tsv"
LABEL_RATES = f"{RESULTS}/tables/{{judge}}/label_rates.tsv"  # label questions (type free_form_judge)
JUDGE_IDENTITY = f"{RESULTS}/tables/{{judge}}/judge.json"  # what the key hashes: name, key and identity
JUDGE_AGREEMENT = f"{RESULTS}/tables/agreement/{{judge_a}}__vs__{{judge_b}}.tsv"
AGREEMENT_PAGE = f"{RESULTS}/figures/agreement/{{judge_a}}__vs__{{judge_b}}.html"  # the same, for the report
DOWNLOADED_QUESTIONS = f"{CACHE}/questions/{{questions_sha}}.yaml"
COMPILE_CACHE = f"{CACHE}/torch_compile"  # compiled decode steps, shared by every sampling job (compile_cache.py)
JUDGE_CACHE = f"{CACHE}/judge_cache.sqlite"  # persistent answers of every judge: reruns never pay twice
# Summary tables and figures of one judge, rebuilt from the tidy tables above (rules/report.smk).
SUMMARY_TABLES = {name: f"{RESULTS}/tables/{{judge}}/{name}.tsv" for name in TABLE_NAMES}
TABLE_SIDECARS = {f"{name}_provenance": f"{RESULTS}/tables/{{judge}}/{name}.provenance.json" for name in TABLE_NAMES}
RESPONSE_EXAMPLES_MD = f"{RESULTS}/tables/{{judge}}/response_examples.md"
FIGURE_FILES = {
    f"{name}_{kind}": f"{RESULTS}/figures/{{judge}}/{name}.{suffix}"
    for name in FIGURE_NAMES
    for kind, suffix in FIGURE_SUFFIXES.items()
}
# Weight trajectories of one cell (rules/weights.smk): no judge, so not under a judge's key.
WEIGHT_TABLE_FILES = {name: f"{RESULTS}/tables/weights/{CELL}/{name}.tsv" for name in WEIGHT_TABLE_NAMES}
WEIGHT_TABLE_SIDECARS = {
    f"{name}_provenance": f"{RESULTS}/tables/weights/{CELL}/{name}.provenance.json" for name in WEIGHT_TABLE_NAMES
}
WEIGHT_FIGURE_FILES = {
    f"{name}_{kind}": f"{RESULTS}/figures/{{judge}}/{name}.{suffix}"
    for name in WEIGHT_FIGURE_NAMES
    for kind, suffix in FIGURE_SUFFIXES.items()
}
GPU_SMOKE = f"{RESULTS}/gpu_smoke/gpus{{gpus}}.json"
TABLES_PAGE = f"{RESULTS}/figures/{{judge}}/summary_tables.html"
PROVENANCE_PAGE = f"{RESULTS}/figures/{{judge}}/provenance.html"

# The persona arm (rules/persona.smk). Prompts and teacher answers depend on the constitution only; the student's
# answers, the pairs and the adapter on the base model too.
PERSONA_PROMPTS = f"{RESULTS}/persona_data/{{persona}}/prompts.jsonl"
PERSONA_PROMPTS_JOURNAL = f"{WORK}/persona_data/{{persona}}/prompts.journal.jsonl"
TEACHER_RESPONSES = f"{RESULTS}/persona_data/{{persona}}/teacher.jsonl"
TEACHER_JOURNAL = f"{WORK}/persona_data/{{persona}}/teacher.journal.jsonl"
STUDENT_RESPONSES = f"{RESULTS}/personas/{{model}}/{{persona}}/student.jsonl"
STUDENT_JOURNAL = f"{WORK}/personas/{{model}}/{{persona}}/student.journal.jsonl"
DPO_PAIRS = f"{RESULTS}/personas/{{model}}/{{persona}}/dpo_pairs.jsonl"
DPO_PAIR_STATS = f"{RESULTS}/personas/{{model}}/{{persona}}/dpo_pairs.stats.json"
DPO_ADAPTER = f"{RESULTS}/personas/{{model}}/{{persona}}/dpo_adapter"
DPO_WORK = f"{WORK}/personas/{{model}}/{{persona}}/dpo"  # resume state, not an output
INTROSPECTION = f"{RESULTS}/personas/{{model}}/{{persona}}/introspection.jsonl"
INTROSPECTION_JOURNAL = f"{WORK}/personas/{{model}}/{{persona}}/introspection.journal.jsonl"
SFT_WORK = f"{WORK}/personas/{{model}}/{{persona}}/sft"
PERSONA_FINAL = f"{RESULTS}/personas/{{model}}/{{persona}}/adapter"  # cat(dpo, sft) when introspection is on
HUB_PERSONA = f"{RESULTS}/hub_personas/{{persona}}"  # downloaded adapter (the hub cache stays in CACHE)

# Inside the model (rules/activations.smk; only when analysis.activations is configured).
ACTIVATIONS = f"{RESULTS}/activations/{CELL}"  # activations.safetensors, index.tsv, meta.json
ACTIVATION_WORK = f"{WORK}/activations/{CELL}"  # resume state: per (reader, step) tensors and a journal
MISALIGNMENT_DIRECTION = f"{RESULTS}/directions/{{judge}}/{{model}}"  # direction.safetensors, layers.tsv, direction.json
PERSONA_VECTOR = f"{RESULTS}/persona_vectors/{{model}}/{{persona}}"  # vector.safetensors, layers.tsv, rollouts.jsonl, vector.json
PERSONA_VECTOR_WORK = f"{WORK}/persona_vectors/{{model}}/{{persona}}"  # the rollouts' journal
ACTIVATION_TABLE_FILES = {name: f"{RESULTS}/tables/{{judge}}/{name}.tsv" for name in ACTIVATION_TABLES}
# Judge-free tables live under tables/activations/ (a judge's key is always <name>-<8 hex>, never "activations").
RETENTION_TABLE_FILES = {name: f"{RESULTS}/tables/activations/{name}.tsv" for name in RETENTION_TABLES}
ACTIVATION_FIGURE_FILES = {
    f"{name}_{kind}": f"{RESULTS}/figures/{{judge}}/{name}.{suffix}"
    for name in ACTIVATION_FIGURES
    for kind, suffix in FIGURE_SUFFIXES.items()
}
RETENTION_FIGURE_FILES = {
    f"{name}_{kind}": f"{RESULTS}/figures/{{judge}}/{name}.{suffix}"
    for name in RETENTION_FIGURES
    for kind, suffix in FIGURE_SUFFIXES.items()
}

# --- the grid ----------------------------------------------------------------------------------------------------
CELLS = expand_grid(config)
CONTROL_PAIRS = control_pairs(config)  # analysis.controls, both datasets of each pair in the grid
check_activation_config(config, sorted({c.model for c in CELLS}))  # layers out of range: one error, at parse time
for _cell in CELLS:  # layers_to_transform in range, trace size guard: now, where the model's shape is known
    check_cell(config, _cell, RESULTS)
# persona -> where its persona vector comes from; a grid persona with no constitution and no trait file: one error now
PERSONA_VECTOR_SOURCES = (check_persona_vector_config(config, sorted({c.persona for c in CELLS}))
                          if activation_settings(config) is not None else {})
check_persona_config(config)
for _judge in config["evaluation"]["judges"]:
    if _judge not in config["judges"]:
        raise UserError(f"config evaluation.judges: unknown judge {_judge!r} (defined: {sorted(config['judges'])})")
    if config["judges"][_judge]["backend"] == "hf" and config["judges"][_judge]["model"] not in config["models"]:
        raise UserError(f"config judges.{_judge}.model: an hf judge names a model under 'models:'")
for _pair in config["evaluation"]["judge_agreement"]:
    if len(_pair) != 2 or _pair[0] == _pair[1] or not set(_pair) <= set(config["evaluation"]["judges"]):
        raise UserError(f"config evaluation.judge_agreement: {_pair!r} must name two different judges listed in "
                        f"evaluation.judges")

onset_settings(config)  # analysis.onset.threshold in [0, 1]: one clear error at parse time

# A local question file is read and fully checked now, so that `snakemake -n` names a bad file and item before any
# job runs (persona_em/data/questions.py load_questions); a {url, sha256} file is checked when fetch_questions downloads it.
if isinstance(config["evaluation"]["questions"], str) and Path(config["evaluation"]["questions"]).is_file():
    load_questions(config["evaluation"]["questions"])
# Every judged path holds the judge's path key (persona_em/judging/identity.py judge_key says what it hashes), never
# its name.
try:
    QUESTIONS_SHA256 = questions_sha256(config)
except UserError:
    # A local question file that is not there yet has no digest. Its judges' keys get a placeholder, and since the
    # file is an input of every sampling and judging job, Snakemake stops on it before running any of those; stages
    # before them (and `snakemake --lint`) still work. Nothing is ever written under a placeholder key.
    QUESTIONS_SHA256 = "question-file-missing"
JUDGE_KEYS = {name: judge_key(config, name, QUESTIONS_SHA256) for name in config["evaluation"]["judges"]}
JUDGE_NAMES = {key: name for name, key in JUDGE_KEYS.items()}


def judge_name(wildcards):
    """The config name of the judge whose path key is wildcards.judge."""
    key = wildcards.judge
    if key not in JUDGE_NAMES:
        raise UserError(f"{key!r} is not the path key of a judge in evaluation.judges (keys now: "
                        f"{', '.join(sorted(JUDGE_NAMES))}); a judge's key changes with what the judge answers")
    return JUDGE_NAMES[key]


def judge_settings(wildcards):
    return config["judges"][judge_name(wildcards)]


def judge_key_record(wildcards):
    """judge.json: the name, the key, and the identity it hashes."""
    name = judge_name(wildcards)
    return {"judge": name, "judge_key": wildcards.judge,
            "identity": judge_key_identity(config, name, QUESTIONS_SHA256)}


def name_pattern(names):
    """A wildcard regex matching exactly these names (and nothing when there are none)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


# API judges need the internet: they run on the submit host (localrule judge_api); local hf judges run as jobs.
API_JUDGES = name_pattern([k for n, k in JUDGE_KEYS.items() if config["judges"][n]["backend"] == "openai"])
LOCAL_JUDGES = name_pattern([k for n, k in JUDGE_KEYS.items() if config["judges"][n]["backend"] != "openai"])


# Persona-arm generators likewise: an API generator on the submit host (expand_prompts_api, teacher_api), a local
# one as a GPU job (expand_prompts, teacher). The backend is per stage, shared by every constitution persona.
def generator_personas(stage, api):
    trained = [n for n, p in config["personas"].items() if "constitution" in p]
    return name_pattern([n for n in trained if (generator_settings(config, stage)["backend"] == "openai") == api])


API_EXPAND_PERSONAS = generator_personas("expand", api=True)
LOCAL_EXPAND_PERSONAS = generator_personas("expand", api=False)
API_TEACHER_PERSONAS = generator_personas("teacher", api=True)
LOCAL_TEACHER_PERSONAS = generator_personas("teacher", api=False)


def questions_file():
    """The question set: a local path, or the downloaded copy of {url, sha256} (fetched by fetch_questions)."""
    q = config["evaluation"]["questions"]
    return q if isinstance(q, str) else DOWNLOADED_QUESTIONS.format(questions_sha=q["sha256"].lower())


QUESTIONS = questions_file()


def cell_paths(pattern, **extra):
    """`pattern` filled in for every cell of the grid (and any extra wildcards): never a glob."""
    return [pattern.format(**c.keys(), **extra) for c in CELLS]


def figure_targets():
    """Every figure, summary table and report page of every judge: the `figures` target."""
    patterns = [*SUMMARY_TABLES.values(), RESPONSE_EXAMPLES_MD, *FIGURE_FILES.values(), *WEIGHT_FIGURE_FILES.values(),
                TABLES_PAGE, PROVENANCE_PAGE]
    return [p.format(judge=key) for key in JUDGE_KEYS.values() for p in patterns]


def all_targets():
    targets = []
    for key in JUDGE_KEYS.values():
        targets += [p.format(judge=key) for p in (SCORES, EM_RATES, SUMMARY, SEED_SUMMARY, COMPARISONS, LABEL_RATES,
                                                  JUDGE_IDENTITY)]
    for name_a, name_b in config["evaluation"]["judge_agreement"]:
        keys = {"judge_a": JUDGE_KEYS[name_a], "judge_b": JUDGE_KEYS[name_b]}
        targets += [JUDGE_AGREEMENT.format(**keys), AGREEMENT_PAGE.format(**keys)]
    targets += [CONTROL_OVERLAP.format(treatment=t, control=c) for t, c in CONTROL_PAIRS]
    return targets + figure_targets()


def activation_figure_targets():
    """The activation figures of every judge (part of the `figures` target); nothing unless analysis.activations is
    set. Without a misalignment direction the direction's figures say so (persona_em/reporting/activation_figures.py)."""
    if activation_settings(config) is None:
        return []
    patterns = [*RETENTION_FIGURE_FILES.values(), *ACTIVATION_FIGURE_FILES.values()]
    return [p.format(judge=key) for key in JUDGE_KEYS.values() for p in patterns]


def activation_targets():
    """The activation analysis (rule `activations`); nothing unless analysis.activations is set. The misalignment
    direction is built only as an input of activation_projections, when its switch is on (model_directions)."""
    if activation_settings(config) is None:
        return []
    targets = [*RETENTION_TABLE_FILES.values(), *persona_vector_dirs(None)]
    targets += [p.format(judge=key) for key in JUDGE_KEYS.values() for p in ACTIVATION_TABLE_FILES.values()]
    return targets + activation_figure_targets()


# Parameters in billions of each model (config models.<name>.size_b); None where not given.
MODEL_SIZES = {name: spec.get("size_b") for name, spec in config["models"].items()}


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
    """The persona's adapter directory for the cell's base model, or nothing for the no-persona cells."""
    if wildcards.persona == NO_PERSONA:
        return []
    spec = config["personas"][wildcards.persona]
    if "hub" in spec:
        return HUB_PERSONA.format(persona=wildcards.persona)
    if "constitution" in spec:
        trained = PERSONA_FINAL if config["persona_training"]["introspection"]["enabled"] else DPO_ADAPTER
        return trained.format(model=wildcards.model, persona=wildcards.persona)
    return spec["adapter"]


def constitution_file(wildcards):
    spec = config["personas"].get(wildcards.persona, {})
    if "constitution" not in spec:
        raise UserError(f"persona {wildcards.persona!r} has no constitution (config personas.{wildcards.persona})")
    return spec["constitution"]


def persona_generator(stage):
    """The generator config of `stage` (expand | teacher), with its name; expand defaults to the teacher's."""

    def settings(wildcards):
        return generator_settings(config, stage)

    return settings


def persona_generator_model(stage):
    """The prepared model a local (hf) generator of `stage` needs; nothing for an API generator."""

    def model(wildcards):
        gen = generator_settings(config, stage)
        return MODEL.format(model=gen["model"]) if gen["backend"] == "hf" else []

    return model


def judge_model(wildcards):
    judge = judge_settings(wildcards)
    return MODEL.format(model=judge["model"]) if judge["backend"] == "hf" else []


def judged_files(wildcards):
    return cell_paths(JUDGED, judge=wildcards.judge)


def train_logs(wildcards):
    return cell_paths(TRAIN_LOG)


def weight_tables(name):
    """Input function: table `name` (weight_norms | weight_rotation) of every cell of the grid."""

    def paths(wildcards):
        return cell_paths(WEIGHT_TABLE_FILES[name])

    return paths


def figure_outputs(files=None):
    """`files` (default: FIGURE_FILES and WEIGHT_FIGURE_FILES, the figures of rule plot_figures) with every PNG flagged
    for `snakemake --report`; its caption template is report/<figure>.rst."""
    flagged = {}
    for key, path in (files if files is not None else {**FIGURE_FILES, **WEIGHT_FIGURE_FILES}).items():
        name = key.rsplit("_", 1)[0]
        caption = f"../report/{name}.rst"
        flagged[key] = report(path, caption=caption, category="Figures", subcategory="{judge}") if key.endswith("_png") else path
    return flagged


def model_activations(wildcards):
    """The collect_activations outputs of every cell of one model."""
    return [ACTIVATIONS.format(**c.keys()) for c in CELLS if c.model == wildcards.model]


def persona_vector_dirs(wildcards):
    """The persona_vectors outputs of every (model, persona other than none) of the grid."""
    pairs = sorted({(c.model, c.persona) for c in CELLS if c.persona in PERSONA_VECTOR_SOURCES})
    return [PERSONA_VECTOR.format(model=m, persona=p) for m, p in pairs]


def persona_vector_source(wildcards):
    """{kind, path} of the persona's vector source (persona_em/activations/persona_vectors.py persona_source)."""
    if wildcards.persona not in PERSONA_VECTOR_SOURCES:
        raise UserError(f"persona {wildcards.persona!r} is not a grid persona with a persona vector source")
    return PERSONA_VECTOR_SOURCES[wildcards.persona]


def model_directions(wildcards):
    """model -> its misalignment direction under the judge; none when analysis.activations.misalignment_direction is
    off (activation_projections and activation_figures then run without it)."""
    if not activation_settings(config)["misalignment_direction"]:
        return {}
    return {m: MISALIGNMENT_DIRECTION.format(judge=wildcards.judge, model=m) for m in sorted({c.model for c in CELLS})}
