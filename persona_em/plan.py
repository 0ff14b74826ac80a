"""GPU-hours of an experiment before submitting it: `make plan CONFIG=config/experiments/<name>.yaml`.

Jobs: the workflow's own DAG (`snakemake --dry-run --forceall`, every job as if nothing existed yet), each job with
its wildcards. GPU time per job, for the rules the benchmarks measured (BENCHMARKS.md, a 7.6 B Qwen2.5 shape on
one H200, torch 2.11, transformers 5.23, issue 16):
  train_em  EM_TOKENS_PER_S non-padding tokens/s (all of a job's epochs x rows x tokens per row);
  sample    SAMPLE_SECONDS per checkpoint of 400 responses x 600 new tokens (scaled by responses x max_new_tokens);
  judge     JUDGMENTS_PER_S local (hf) judgments/s of ~1,000-token prompts;
  collect_activations  ACTIVATION_SECONDS per checkpoint of 400 responses x 402 tokens (prompt + response) x 2
            readers (scaled by responses x max_new_tokens: the response bounds the tokens, the prompt is small);
  persona_vectors  rollouts (plain `generate`: an H100 figure, the only one) + one teacher-forced pass +
            JOB_OVERHEAD_S (persona_vectors_seconds: what each term comes from is written there);
(sampling: at a batch of 400; a cell with fewer responses per checkpoint batches fewer and is slower per token
than this, so its figure is a lower bound), each scaled by model size (parameters / 7.6 B: these steps are bound by matrix products over all weights or by
reading the weights), plus JOB_OVERHEAD_S per job (model load, the compile of a sampling job with a warm compile
cache). Rows, tokens per row (characters / CHARS_PER_TOKEN) and questions are read from the files the config names;
a file that is not there yet (a download the login node has not made) leaves its rule's figure unknown ("?").
Other GPU rules (teacher, student, expand_prompts, introspection, train_dpo, train_sft) have no
benchmark of their whole job here: their job counts are printed, their hours are not. CPU
rules (weight_norms: one job per cell, about a minute for a 7B r32 cell, bench/weights.py; tables, figures) are
counted with 0 GPU-hours.

A100 factor: Leonardo's booster GPUs are A100 64 GB. The factor A100_FACTOR = 3.0 is the H200's datasheet bf16
dense rate over the A100's (989 / 312 TFLOP/s = 3.2, for the compute-bound training and judging) and about its
memory bandwidth ratio (4.8 / 1.6 TB/s = 3.0, for the bandwidth-bound sampling); it is NOT a measurement on an A100.
The profile's requested time (first-attempt runtime x GPUs per job, profiles/leonardo/config.yaml) is printed too:
that is what the queue reserves, an upper bound on what a job is billed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import yaml

# rows and tokens per row of a dataset: persona_em/data/datasets.py (parse-time checks use it too)
from persona_em.data.datasets import dataset_stats

REPO = Path(__file__).resolve().parents[1]

REF_PARAMS_B = 7.62  # the benchmarks' Qwen2.5-7B shape
EM_TOKENS_PER_S = 12_500  # train_em, auto plan + fused pointwise ops: 12,542-13,508 on the H200 (run6)
SAMPLE_SECONDS = 10.8  # one checkpoint, 400 responses x 600 new tokens, steady: decode kernel, deterministic compile,
# deferred stop check, adapters folded into the weights; 10.38-10.78 s on three H200 machines (bench/results/run13)
SAMPLE_REF_TOKENS = 400 * 600
JUDGMENTS_PER_S = 23.2  # HFBackend.ask_many, ~1,070-token prompts (run6, H200)
ACTIVATION_SECONDS = 12.2  # collect_activations, one checkpoint: 400 responses x 402 tokens x 2 readers (H200)
ACTIVATION_REF_TOKENS = 400 * 402
ACTIVATION_BASE_SECONDS = 4.6  # of ACTIVATION_SECONDS, the base reader alone (no adapter), same benchmark row
# Plain batched `generate` (persona_em.sampling.sample.generate_batch with fast=False, the path the persona arm's
# HFBackend takes), 600 decode steps of a batch of 400 (Qwen2.5-7B shape + an r32 EM adapter, H200, deferred stop
# check on and off in turn: 31.6, 33.5, 41.0 s after the process's first call; bench/results/run12/call3): the slowest.
PLAIN_STEP_SECONDS = 41.0 / 600
JOB_OVERHEAD_S = 120  # per GPU job: loading the model, compiling (10 s with a warm compile cache, 30-37 s cold)
A100_FACTOR = 3.0
GPU_RULES_WITHOUT_BENCHMARK = ("teacher", "student", "expand_prompts", "introspection", "train_dpo", "train_sft")

_JOB = re.compile(r"^(?:local)?rule (\w+):$")
_WILDCARDS = re.compile(r"^\s+wildcards: (.*)$")


def dag_jobs(configfile: str, snakemake: str | None = None, cwd: str | Path = REPO) -> list[tuple[str, dict]]:
    """(rule, wildcards) of every job of the experiment's DAG, from a forced dry run of the workflow."""
    snakemake = snakemake or str(Path(sys.executable).with_name("snakemake"))
    cmd = [snakemake, "--dry-run", "--forceall", "--configfile", str(configfile), "-s", str(REPO / "Snakefile"),
           "--replace-workflow-config"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"snakemake --dry-run failed for {configfile}:\n{tail}")
    jobs, rule = [], None
    for line in res.stdout.splitlines():
        m = _JOB.match(line)
        if m:
            if rule is not None:
                jobs.append((rule, {}))
            rule = m.group(1)
            continue
        m = _WILDCARDS.match(line)
        if m and rule is not None:
            jobs.append((rule, dict(kv.split("=", 1) for kv in m.group(1).split(", "))))
            rule = None
        elif rule is not None and not line.strip():
            jobs.append((rule, {}))
            rule = None
    if rule is not None:
        jobs.append((rule, {}))
    return jobs


def model_params_b(config: dict, name: str) -> float | None:
    """Parameters in billions: models.<name>.size_b, else the size in the hub id (e.g. Llama-3.1-8B), else a
    prepared local model's config.json."""
    spec = config["models"].get(name)
    if spec is None:
        return None
    if spec.get("size_b"):
        return float(spec["size_b"])
    m = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)[Bb](?![a-zA-Z])", spec.get("hf_id", ""))
    if m:
        return float(m.group(1))
    return None


def question_stats(config: dict, cwd: Path) -> tuple[int, int] | None:
    """(questions, judge metrics summed over questions) of the evaluation question file; None if not readable."""
    from persona_em.errors import UserError
    from persona_em.data.questions import load_questions

    source = config["evaluation"]["questions"]
    if isinstance(source, dict):
        path = Path(config.get("cache_dir", "results/cache")) / "questions" / f"{source['sha256'].lower()}.yaml"
    else:
        path = Path(source)
    try:
        questions = load_questions(cwd / path)
    except UserError:
        return None
    return len(questions), sum(len(q.judge_prompts) for q in questions)


def _cell(w: dict):
    from persona_em.config import Cell

    return Cell(w["model"], w["persona"], w["composition"], w["dataset"], int(w["seed"]))


def persona_vectors_seconds(config: dict, model: str, persona: str, cwd: Path) -> float | None:
    """Estimated H200 GPU-seconds of one persona_vectors job (persona_em/activations/persona_vectors.py), or None
    when the model's size or the persona's source file (constitution or trait file) is not known yet.

    Its rollouts: every question of the source x every system-prompt pair (a constitution: 1; a trait file: its
    instruction pairs) x 2 conditions (persona, baseline) x samples_per_question, each at most max_new_tokens
    (analysis.activations.persona_vectors; prompt_sets builds them, as the job does). Three terms:
    1. rollouts: persona_em.persona.generation.HFBackend generates them through generate_batch(fast=False), plain
       `generate`, in batches of `batch_size` (run_journaled). Not the sampling rule's fast path, so not
       SAMPLE_SECONDS: plain generate measured 31.6-41.0 s for 400 x 600 on the H200 (BENCHMARKS.md round 8)
       against 12.5 s for the fast path. Its decode step costs about the same whatever the batch (run5, H100:
       0.119 s per step at a batch of 400, 0.101 s at a batch of 1: the plain loop is bound by kernel launches, not
       by rows), so the time is batches x max_new_tokens x PLAIN_STEP_SECONDS, scaled by model size. Every batch is
       counted at max_new_tokens (a batch ends when its longest row does). The measurement has an adapter; these
       rollouts run the base model alone: an upper bound, as far as it is measured.
    2. one teacher-forced pass of the base model (collect.measure, one reader, no adapter) over every rollout's
       prompt + response tokens: ACTIVATION_BASE_SECONDS per ACTIVATION_REF_TOKENS (the collect_activations
       benchmark's base reader), scaled by tokens and model size. Tokens per rollout: its system prompt and
       question in characters / CHARS_PER_TOKEN + TEMPLATE_TOKENS (as dataset_stats estimates rows) + max_new_tokens
       (the response's bound).
    3. JOB_OVERHEAD_S, as every GPU job (loading the model)."""
    from persona_em.activations.persona_vectors import persona_source, prompt_sets
    from persona_em.data.datasets import CHARS_PER_TOKEN, TEMPLATE_TOKENS

    size = model_params_b(config, model)
    source = persona_source(config, persona)
    if size is None or not (cwd / source["path"]).is_file():
        return None
    pv = config["analysis"]["activations"]["persona_vectors"]
    template = config["persona_training"]["teacher"]["system_prompt_template"]
    questions, systems = prompt_sets({**source, "path": str(cwd / source["path"])}, template)
    samples, max_new = pv["samples_per_question"], pv["generation"]["max_new_tokens"]
    prompt_chars = [len(system or "") + len(text) for _, text in questions for pair in systems for system in pair]
    rollouts = len(prompt_chars) * samples
    scale = size / REF_PARAMS_B
    generate = math.ceil(rollouts / pv["batch_size"]) * max_new * PLAIN_STEP_SECONDS * scale
    tokens = samples * sum(chars / CHARS_PER_TOKEN + TEMPLATE_TOKENS + max_new for chars in prompt_chars)
    forward = tokens / ACTIVATION_REF_TOKENS * ACTIVATION_BASE_SECONDS * scale
    return generate + forward + JOB_OVERHEAD_S


def job_gpu_seconds(config: dict, rule: str, w: dict, cwd: Path, cache: dict) -> float | None:
    """Estimated H200 GPU-seconds of one job (see the module docstring), or None where unknown."""
    from persona_em.config import checkpoint_spec, sampling_settings, train_settings
    from persona_em.training.schedule import expand_schedule, steps_per_epoch

    if rule == "persona_vectors":
        return persona_vectors_seconds(config, w["model"], w["persona"], cwd)
    if rule not in ("train_em", "sample", "judge", "collect_activations"):
        return None
    cell = _cell(w)
    size = model_params_b(config, cell.model)
    data = cache.setdefault(("data", cell.dataset), dataset_stats(config, cell.dataset, cwd))
    if size is None or data is None:
        return None
    rows, tokens_per_row = data
    train = train_settings(config, cell)
    if rule == "train_em":
        tokens = rows * train["epochs"] * min(tokens_per_row, train["max_length"])
        return tokens / (EM_TOKENS_PER_S * REF_PARAMS_B / size) + JOB_OVERHEAD_S
    questions = cache.setdefault("questions", question_stats(config, cwd))
    if questions is None:
        return None
    n_questions, n_metrics = questions
    spe = steps_per_epoch(rows, train["effective_batch_size"])
    checkpoints = len(expand_schedule(checkpoint_spec(config, cell), spe, train["epochs"]))
    settings = sampling_settings(config, cell)
    if rule == "sample":
        new_tokens = checkpoints * n_questions * settings["n_samples"] * settings["max_new_tokens"]
        return new_tokens / SAMPLE_REF_TOKENS * SAMPLE_SECONDS * size / REF_PARAMS_B + JOB_OVERHEAD_S
    if rule == "collect_activations":
        tokens = checkpoints * n_questions * settings["n_samples"] * settings["max_new_tokens"]
        return tokens / ACTIVATION_REF_TOKENS * ACTIVATION_SECONDS * size / REF_PARAMS_B + JOB_OVERHEAD_S
    judge_name = w["judge"].rsplit("-", 1)[0]
    judge_size = model_params_b(config, config["judges"][judge_name]["model"])
    if judge_size is None:
        return None
    judgments = checkpoints * n_metrics * settings["n_samples"]
    return judgments / (JUDGMENTS_PER_S * REF_PARAMS_B / judge_size) + JOB_OVERHEAD_S


def profile_requests(profile: Path) -> dict[str, tuple[int, float]]:
    """rule -> (GPUs per job, first-attempt runtime in minutes) from a Snakemake profile's set-resources."""
    spec = yaml.safe_load(profile.read_text()).get("set-resources", {})
    out = {}
    for rule, res in spec.items():
        gres = str(res.get("gres", ""))
        m = re.fullmatch(r"gpu:(\d+)", gres.strip("'\""))
        if not m:
            continue
        runtime = res.get("runtime")
        minutes = eval(str(runtime), {"min": min, "max": max}, {"attempt": 1}) if runtime is not None else math.nan
        out[rule] = (int(m.group(1)), float(minutes))
    return out


def plan(configfile: str, profile: str | Path = REPO / "profiles/leonardo/config.yaml", cwd: Path = REPO,
         snakemake: str | None = None) -> dict:
    """Per rule: jobs, estimated GPU-hours (H200, A100) and the profile's requested GPU-hours; and the totals."""
    from snakemake.utils import validate

    config = yaml.safe_load(Path(cwd, configfile).read_text())
    validate(config, str(REPO / "config/schemas/config.schema.yaml"))  # fills in the schema's defaults
    jobs = dag_jobs(configfile, snakemake, cwd)
    requests = profile_requests(Path(profile))
    rows: dict[str, dict] = defaultdict(lambda: {"jobs": 0, "h200_gpu_hours": 0.0, "unknown_jobs": 0})
    cache: dict = {}
    for rule, w in jobs:
        r = rows[rule]
        r["jobs"] += 1
        gpus = requests.get(rule, (0, 0.0))[0]
        if not gpus:
            continue
        seconds = job_gpu_seconds(config, rule, w, cwd, cache)
        if seconds is None:
            r["unknown_jobs"] += 1
        else:
            r["h200_gpu_hours"] += seconds * gpus / 3600
    table = {}
    for rule, r in rows.items():
        gpus, minutes = requests.get(rule, (0, 0.0))
        estimated = gpus and rule not in GPU_RULES_WITHOUT_BENCHMARK and not r["unknown_jobs"]
        table[rule] = {
            "jobs": r["jobs"], "gpus_per_job": gpus,
            "h200_gpu_hours": round(r["h200_gpu_hours"], 2) if estimated else (0.0 if not gpus else None),
            "a100_gpu_hours": round(r["h200_gpu_hours"] * A100_FACTOR, 2) if estimated else (0.0 if not gpus else None),
            "requested_gpu_hours": round(r["jobs"] * gpus * minutes / 60, 1),
        }
    known = [t for t in table.values() if t["a100_gpu_hours"] is not None]
    return {"config": str(configfile), "rules": table, "a100_factor": A100_FACTOR,
            "total_a100_gpu_hours": round(sum(t["a100_gpu_hours"] for t in known), 1),
            "total_h200_gpu_hours": round(sum(t["h200_gpu_hours"] for t in known), 1),
            "total_requested_gpu_hours": round(sum(t["requested_gpu_hours"] for t in table.values()), 1),
            "not_estimated": sorted(r for r, t in table.items() if t["a100_gpu_hours"] is None)}


def render(p: dict) -> str:
    fmt = lambda v: "?" if v is None else f"{v:,.1f}"  # noqa: E731
    lines = [f"GPU budget of {p['config']} (estimates from BENCHMARKS.md; A100 = H200 x {p['a100_factor']}, "
             f"a datasheet ratio, see persona_em/plan.py)", "",
             f"{'rule':<18}{'jobs':>6}{'GPUs/job':>10}{'H200 GPU-h':>12}{'A100 GPU-h':>12}{'requested GPU-h':>17}"]
    for rule, t in sorted(p["rules"].items(), key=lambda kv: (-(kv[1]["gpus_per_job"] > 0), kv[0])):
        lines.append(f"{rule:<18}{t['jobs']:>6}{t['gpus_per_job']:>10}{fmt(t['h200_gpu_hours']):>12}"
                     f"{fmt(t['a100_gpu_hours']):>12}{fmt(t['requested_gpu_hours']):>17}")
    lines.append(f"{'total':<18}{sum(t['jobs'] for t in p['rules'].values()):>6}{'':>10}"
                 f"{fmt(p['total_h200_gpu_hours']):>12}{fmt(p['total_a100_gpu_hours']):>12}"
                 f"{fmt(p['total_requested_gpu_hours']):>17}")
    if p["not_estimated"]:
        lines += ["", "not estimated (no benchmark of the whole job, or an input file is not there yet): "
                  + ", ".join(p["not_estimated"]) + "; the total leaves them out"]
    lines.append("requested GPU-h: jobs x GPUs x the profile's first-attempt time limit (what the queue reserves)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configfile", required=True)
    ap.add_argument("--profile", default=str(REPO / "profiles/leonardo/config.yaml"))
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    a = ap.parse_args(argv)
    p = plan(a.configfile, a.profile, cwd=Path.cwd())
    print(json.dumps(p, indent=1) if a.json else render(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
