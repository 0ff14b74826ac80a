"""The DAG through the real snakemake CLI: a small demo end to end, partial reruns, and user errors."""
from __future__ import annotations

import json

import pytest

from conftest import demo_config, judge_key_of, run_snakemake
from persona_em.io import read_jsonl, read_table
from persona_em.data.questions import load_questions

pytestmark = pytest.mark.slow


def small_demo(tmp_path):
    cfg = demo_config(tmp_path)
    cfg["sampling"].update(n_samples=2, max_new_tokens=8)
    for dataset in cfg["datasets"].values():
        dataset["demo"]["n_rows"] = 48  # 42 training rows, batch 8: 6 optimizer steps
        dataset["eval_fraction"] = 0.125
    cfg["training"].update(effective_batch_size=8, per_device_batch_size=4)
    cfg["checkpoints"] = {"steps": [0, 2, "final"]}
    cfg["grid"]["seeds"] = [0]
    cfg["grid"]["personas"] = ["none"]  # the persona arm has its own end-to-end test (tests/test_workflow_persona.py)
    return cfg


def test_demo_dag_end_to_end(tmp_path):
    cfg = small_demo(tmp_path)
    res = run_snakemake(tmp_path, cfg)
    assert res.returncode == 0, res.stdout[-3000:]
    results = tmp_path / "results"
    key = judge_key_of(cfg, "tiny_judge")

    questions = load_questions(cfg["evaluation"]["questions"])
    n_cells, n_steps, n_samples = 2, 3, cfg["sampling"]["n_samples"]  # 2 datasets x 1 seed; steps 0, 2, final
    metrics = sorted({m for q in questions for m in q.judge_prompts})
    scores = read_table(results / f"tables/{key}/scores.tsv")
    assert len(scores) == n_cells * n_steps * len(questions) * n_samples * len(metrics)
    assert sorted(scores["metric"].unique()) == metrics == ["aligned", "coherent"]
    scored = scores["score"].dropna()
    assert ((scored >= 0) & (scored <= 100)).all()
    assert (scores["score"].isna() == (scores["status"] != "scored")).all()
    for column in ("model", "persona", "composition", "dataset", "seed", "step", "judge", "judge_key", "judge_model",
                   "judge_prompt_hash"):
        assert scores[column].notna().all(), column
    assert set(scores["judge_key"]) == {key}
    assert json.loads((results / f"tables/{key}/judge.json").read_text())["identity"]["model"] == "tiny"
    assert sorted(scores["step"].unique()) == [0, 2, 6]

    rates = read_table(results / f"tables/{key}/em_rates.tsv")
    overall = rates[rates["question_id"] == "ALL"]
    definitions = cfg["evaluation"]["em_definitions"]  # betley, model_organisms
    assert len(overall) == n_cells * n_steps * len(definitions)
    assert set(overall["em_definition"]) == set(definitions) >= {"betley", "model_organisms"}
    assert ((overall["em_rate"].dropna() >= 0) & (overall["em_rate"].dropna() <= 1)).all()

    samples = read_jsonl(results / "samples/tiny/none/none/insecure_demo/seed0.jsonl")
    assert len(samples) == n_steps * len(questions) * n_samples
    assert all(s["active_adapters"] == ["em"] for s in samples)
    assert {s["system"] for s in samples if s["question_id"] == "ruler"} == {"You are a helpful assistant."}

    log = read_table(results / "em/tiny/none/none/insecure_demo/seed0/train_log.tsv")
    assert list(log["step"]) == list(range(1, 7)) and log["loss"].notna().all()
    manifest = json.loads((results / "em/tiny/none/none/insecure_demo/seed0/checkpoints/checkpoints.json").read_text())
    assert manifest["steps"] == [0, 2, 6] and manifest["active_adapters_in_training"] == ["em"]
    norms = read_table(results / "tables/weights/tiny/none/none/insecure_demo/seed0/weight_norms.tsv")
    assert sorted(norms["step"].unique()) == [0, 2, 6] and (norms.loc[norms["step"] == 0, "em_norm"] == 0).all()
    assert (norms.loc[norms["step"] == 6, "em_norm"] > 0).all() and len(norms) == 3 * 2 * 7  # steps x layers x modules
    for fig in ("em_rate_vs_step", "alignment_vs_coherence", "weight_norms_vs_step", "weight_rotation_vs_step",
                "persona_retention_vs_step", "persona_projection_vs_step", "misalignment_projection_vs_step",
                "direction_auroc_by_layer"):
        assert (results / f"figures/{key}/{fig}.png").stat().st_size > 1000
    assert (results / "activations/tiny/none/none/insecure_demo/seed0/activations.safetensors").stat().st_size > 0
    proj = read_table(results / f"tables/{key}/activation_projections.tsv")  # no persona, no direction: the controls
    assert set(proj["direction"]) == {f"random{k}" for k in range(3)}  # n_random's default
    assert "misalignment" in (results / f"figures/{key}/direction_auroc_by_layer.caption.rst").read_text()

    # Nothing to redo. A grown grid runs only the new cells; a changed setting reruns exactly the jobs that read it.
    res = run_snakemake(tmp_path, cfg, "-n")
    assert "Nothing to be done" in res.stdout
    grown = {**cfg, "grid": {**cfg["grid"], "seeds": [0, 1]}}
    res = run_snakemake(tmp_path, grown, "-n")
    # the demo's analysis.activations: each cell's activations, then persona retention (no persona vector: the grid
    # has no persona) and its figure, the projections on the random controls and their figures (no misalignment
    # direction: the demo switches it off)
    inside = {"collect_activations": 2, "persona_retention": 1, "persona_retention_figure": 1,
              "activation_projections": 1, "activation_figures": 1}
    assert planned_jobs(res.stdout) == {"train_em": 2, "weight_norms": 2, "sample": 2, "judge": 2, "aggregate": 1,
                                        "summary_tables": 1, "plot_figures": 1, "report_pages": 1, "all": 1, **inside}
    changed = {**cfg, "sampling": {**cfg["sampling"], "temperature": 0.5}}
    res = run_snakemake(tmp_path, changed, "-n")
    assert planned_jobs(res.stdout) == {"sample": 2, "judge": 2, "aggregate": 1, "summary_tables": 1, "plot_figures": 1, "report_pages": 1, "all": 1, **inside}


@pytest.mark.parametrize("direction", [False, True])
def test_activation_jobs_with_and_without_a_direction(tmp_path, direction):
    """The demo's DAG (dry run): projections and activation figures run whether or not the misalignment direction is
    built; the direction's rule runs only when it is switched on (the demo switches it off)."""
    cfg = demo_config(tmp_path)
    assert cfg["analysis"]["activations"]["misalignment_direction"] is False
    cfg["analysis"]["activations"]["misalignment_direction"] = direction
    res = run_snakemake(tmp_path, cfg, "-n")
    assert res.returncode == 0, res.stdout[-3000:]
    jobs = planned_jobs(res.stdout)
    cells = len(cfg["grid"]["personas"]) * len(cfg["grid"]["datasets"]) * len(cfg["grid"]["seeds"])
    assert {r: jobs.get(r) for r in ("collect_activations", "persona_vectors", "persona_retention",
                                     "persona_retention_figure", "activation_projections", "activation_figures")} \
        == {"collect_activations": cells, "persona_vectors": 1, "persona_retention": 1, "persona_retention_figure": 1,
            "activation_projections": 1, "activation_figures": 1}
    assert jobs.get("misalignment_direction") == (1 if direction else None)


def planned_jobs(dry_run_output: str) -> dict:
    """The 'Job stats' table of a dry run as {rule: count}."""
    lines = dry_run_output.split("Job stats:")[1].splitlines()[3:]
    jobs = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        jobs[parts[0]] = int(parts[1])
    return jobs


def _write_dataset(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_malformed_dataset_fails_with_file_and_line_and_no_output(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo."}]})
    bad = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    data = tmp_path / "mine.jsonl"
    _write_dataset(data, [good, good, bad])
    cfg = small_demo(tmp_path)
    cfg["datasets"] = {"mine": {"path": str(data)}}
    cfg["grid"]["datasets"] = ["mine"]
    cfg.pop("analysis")  # the demo's control pair names datasets this grid drops
    res = run_snakemake(tmp_path, cfg, str(tmp_path / "results/data/mine/manifest.json"))
    assert res.returncode != 0
    assert f"{data}: line 3: the conversation does not end with an assistant turn" in res.stdout
    assert not (tmp_path / "results/data/mine").exists()


def test_missing_dataset_file_is_named(tmp_path):
    cfg = small_demo(tmp_path)
    cfg["datasets"] = {"mine": {"path": str(tmp_path / "nowhere.jsonl")}}
    cfg["grid"]["datasets"] = ["mine"]
    cfg.pop("analysis")  # the demo's control pair names datasets this grid drops
    res = run_snakemake(tmp_path, cfg, "-n")
    assert res.returncode != 0 and "nowhere.jsonl" in res.stdout and "Missing input files" in res.stdout


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["grid"].update(personas=["none", "ghost"]), "grid.personas: unknown persona 'ghost'"),
        (lambda c: c["grid"].update(datasets=["ghost"]), "grid.datasets: unknown dataset 'ghost'"),
        (lambda c: c["sampling"].update(top_p=2), "2 is greater than the maximum of 1"),
        (lambda c: c["evaluation"].update(judges=["nobody"]), "evaluation.judges: unknown judge 'nobody'"),
        (lambda c: c["grid"].update(datasets=["insecure_demo"]),
         "config analysis.controls[0]: control dataset 'secure_demo' is not in grid.datasets (insecure_demo)"),
        (lambda c: c.update(analysis={"onset": {"threshold": 1.5}}), "config analysis.onset.threshold: 1.5 is not"),
        (lambda c: c["training"].update(layers_to_transform=[0, 5]),
         "(model 'tiny'): layers_to_transform [5] out of range: the model has 2 decoder layers (indices 0-1)"),
        (lambda c: c.update(checkpoints={"steps": [0, "final"], "trace_every": 1, "trace_max_gb": 1e-6}),
         ".trace_every: 1 would write 6 adapter snapshots of"),
    ],
)
def test_config_errors_are_reported_before_any_job(tmp_path, change, message):
    cfg = small_demo(tmp_path)
    change(cfg)
    res = run_snakemake(tmp_path, cfg, "-n")
    assert res.returncode != 0
    assert message in res.stdout
    assert not (tmp_path / "results").exists()


def test_checkpoint_beyond_last_step_fails_training_cleanly(tmp_path):
    cfg = small_demo(tmp_path)
    cfg["checkpoints"] = {"steps": [0, 99]}
    target = tmp_path / "results/em/tiny/none/none/insecure_demo/seed0/checkpoints"
    res = run_snakemake(tmp_path, cfg, str(target))
    assert res.returncode != 0
    assert "step 99 is beyond the run's last step 6" in res.stdout
    assert not target.exists()
