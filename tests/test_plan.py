"""`make plan`: jobs per rule from the workflow's DAG and GPU-hours from the benchmarks' rates, on the shipped
experiment configs (their user files as placeholders and the demo's question file, as test_project's dry runs) and, with realistic files, the
arithmetic of one experiment checked by hand."""
import json
import math
import shutil

import pytest
import yaml

from conftest import REPO, SNAKEMAKE
from persona_em import plan as P
from test_project import USER_FILES, write_user_files


def _placeholders(tmp_path, experiment):
    write_user_files(tmp_path, experiment)
    shutil.copy(REPO / "config/experiments" / experiment, tmp_path / experiment)


@pytest.mark.parametrize("experiment", sorted(USER_FILES))
def test_plan_of_every_shipped_experiment(tmp_path, experiment):
    _placeholders(tmp_path, experiment)
    p = P.plan(experiment, cwd=tmp_path, snakemake=SNAKEMAKE)
    cfg = yaml.safe_load((tmp_path / experiment).read_text())
    g = cfg["grid"]
    assert p["rules"]["train_em"]["jobs"] >= len(g["models"]) * len(g["datasets"]) * len(g["seeds"])
    assert p["rules"]["sample"]["jobs"] == p["rules"]["train_em"]["jobs"]
    # weight_norms: one CPU job per cell, no GPU-hours
    assert p["rules"]["weight_norms"]["jobs"] == p["rules"]["train_em"]["jobs"]
    assert p["rules"]["weight_norms"]["gpus_per_job"] == 0 and p["rules"]["weight_norms"]["a100_gpu_hours"] == 0.0
    for rule in ("train_em", "sample"):
        assert p["rules"][rule]["gpus_per_job"] == 1 and p["rules"][rule]["requested_gpu_hours"] > 0
    assert p["rules"]["train_em"]["a100_gpu_hours"] is not None  # rows are read even from a placeholder
    assert p["rules"]["sample"]["a100_gpu_hours"] is not None  # the stand-in question file is read
    text = P.render(p)
    assert "train_em" in text and "total" in text and "A100 = H200 x 3.0" in text


def test_plan_arithmetic_with_real_sized_files(tmp_path):
    experiment = "cs2881_replication.yaml"
    _placeholders(tmp_path, experiment)
    content = "x" * 360  # 360 characters per row: 100 tokens + 10 of the chat template
    for name in ("bad_medical_advice", "risky_financial_advice"):
        with open(tmp_path / f"data/em/{name}.jsonl", "w") as f:
            for _ in range(6000):
                f.write(json.dumps({"messages": [{"role": "user", "content": content[:180]},
                                                 {"role": "assistant", "content": content[180:]}]}) + "\n")
    questions = [{"id": f"q{i}", "paraphrases": ["What?"], "judge_prompts": {"aligned": "{answer}",
                                                                            "coherent": "{answer}"}}
                 for i in range(8)]
    (tmp_path / "data/em/first_plot_questions.yaml").write_text(yaml.safe_dump(questions))
    p = P.plan(experiment, cwd=tmp_path, snakemake=SNAKEMAKE)
    # cs2881: models of 1, 3 and 8 B (hub ids), 2 datasets, 1 seed; preset cs2881: 3 epochs, batch 16, max_length 256
    tokens = 6000 * 3 * 110
    train = sum(tokens / (P.EM_TOKENS_PER_S * P.REF_PARAMS_B / size) + P.JOB_OVERHEAD_S for size in (1, 3, 8)) * 2
    assert p["rules"]["train_em"]["h200_gpu_hours"] == pytest.approx(train / 3600, abs=0.01)
    assert p["rules"]["train_em"]["a100_gpu_hours"] == pytest.approx(3 * train / 3600, abs=0.03)
    # 375 steps per epoch: 4 points in epoch 1 (94, 188, 281, 375), the epoch ends 750 and 1125, and step 0
    checkpoints = 7
    new_tokens = checkpoints * 8 * 20 * 600
    sample = sum(new_tokens / P.SAMPLE_REF_TOKENS * P.SAMPLE_SECONDS * size / P.REF_PARAMS_B + P.JOB_OVERHEAD_S
                 for size in (1, 3, 8)) * 2
    assert p["rules"]["sample"]["h200_gpu_hours"] == pytest.approx(sample / 3600, abs=0.01)
    assert p["rules"].get("judge_api", {"gpus_per_job": 0})["gpus_per_job"] == 0  # an API judge uses no GPU
    assert p["not_estimated"] == []
    assert p["total_a100_gpu_hours"] == pytest.approx(3 * (train + sample) / 3600, abs=0.1)
    assert math.isclose(p["total_requested_gpu_hours"], sum(t["requested_gpu_hours"] for t in p["rules"].values()),
                        abs_tol=0.2)


def test_plan_knows_the_activation_rules(tmp_path):
    """With analysis.activations: one collect_activations GPU job per cell (as many as sample), estimated from its
    benchmark; persona_vectors counted but not estimated; the CPU analysis jobs listed."""
    experiment = "arena_phase1.yaml"
    _placeholders(tmp_path, experiment)
    cfg = yaml.safe_load((tmp_path / experiment).read_text())
    cfg["analysis"] = {"activations": {"layers": [0, 14, 28]}}
    for persona in cfg["personas"]:  # adapter personas: their persona vectors come from a trait file
        shutil.copy(REPO / "tests/fixtures/traits/pedantic.json", tmp_path / f"{persona}.json")
        cfg["personas"][persona]["trait_file"] = f"{persona}.json"
    (tmp_path / experiment).write_text(yaml.safe_dump(cfg))
    p = P.plan(experiment, cwd=tmp_path, snakemake=SNAKEMAKE)
    rules = p["rules"]
    assert rules["collect_activations"]["jobs"] == rules["sample"]["jobs"]
    assert rules["collect_activations"]["gpus_per_job"] == 1 and rules["collect_activations"]["a100_gpu_hours"] > 0
    assert "collect_activations" not in p["not_estimated"]
    # per job beyond the overhead: ACTIVATION_SECONDS per 400 x 402 tokens against SAMPLE_SECONDS per 400 x 600 new
    # tokens, with the same responses x max_new_tokens and model-size scaling
    from snakemake.utils import validate

    validate(cfg, str(REPO / "config/schemas/config.schema.yaml"))  # the schema's defaults, as plan() fills them
    w = {"model": cfg["grid"]["models"][0], "persona": "none", "composition": "none",
         "dataset": cfg["grid"]["datasets"][0], "seed": "0"}
    act, samp = (P.job_gpu_seconds(cfg, rule, w, tmp_path, {}) - P.JOB_OVERHEAD_S
                 for rule in ("collect_activations", "sample"))
    ratio = (P.ACTIVATION_SECONDS / P.ACTIVATION_REF_TOKENS) / (P.SAMPLE_SECONDS / P.SAMPLE_REF_TOKENS)
    assert act > 0 and act / samp == pytest.approx(ratio, rel=1e-9)
    personas = {(m, q) for m in cfg["grid"]["models"] for q in cfg["grid"]["personas"] if q != "none"}
    assert rules["persona_vectors"]["jobs"] == len(personas) and rules["persona_vectors"]["gpus_per_job"] == 1
    assert "persona_vectors" in p["not_estimated"]
    for rule in ("misalignment_direction", "activation_projections", "activation_figures", "persona_retention",
                 "persona_retention_figure"):
        assert rules[rule]["jobs"] >= 1 and rules[rule]["gpus_per_job"] == 0
