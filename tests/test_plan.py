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
    assert "persona_vectors" not in p["not_estimated"]
    per_job = {(m, q): P.job_gpu_seconds(cfg, "persona_vectors", {"model": m, "persona": q}, tmp_path, {})
               for m, q in personas}
    assert rules["persona_vectors"]["h200_gpu_hours"] == pytest.approx(sum(per_job.values()) / 3600, abs=0.01)
    assert p["not_estimated"] == []
    for rule in ("misalignment_direction", "activation_projections", "activation_figures", "persona_retention",
                 "persona_retention_figure"):
        assert rules[rule]["jobs"] >= 1 and rules[rule]["gpus_per_job"] == 0


def test_plan_persona_vectors_arithmetic_by_hand(tmp_path):
    """One persona_vectors job of a small config, its three terms worked out by hand (persona_em/plan.py,
    persona_vectors_seconds): plain-generate rollouts in batches, one teacher-forced base-model pass over prompt +
    response tokens, the per-job overhead. Its source missing: unknown."""
    from snakemake.utils import validate

    pos, neg = "P" * 34, "N" * 15  # system prompts of 26 + 34 = 60 and 29 + 15 = 44 characters
    trait = {"instruction": [{"pos": pos, "neg": neg}], "questions": ["Q" * 16, "R" * 52], "eval_prompt": ""}
    (tmp_path / "calm.json").write_text(json.dumps(trait))
    cfg = yaml.safe_load((REPO / "config/experiments/arena_phase1.yaml").read_text())
    model = cfg["grid"]["models"][0]
    cfg["personas"]["calm"] = {"adapter": "a", "trait_file": "calm.json"}
    cfg["analysis"] = {"activations": {"layers": [0], "persona_vectors": {
        "samples_per_question": 3, "batch_size": 4, "generation": {"max_new_tokens": 50}}}}
    validate(cfg, str(REPO / "config/schemas/config.schema.yaml"))
    assert P.model_params_b(cfg, model) == 7.0  # Qwen/Qwen2.5-7B-Instruct
    # rollouts: 2 questions x 1 pair x 2 conditions x 3 samples = 12, in ceil(12 / 4) = 3 batches of 50 steps
    generate = 3 * 50 * (41.0 / 600) * 7 / 7.62
    # prompt characters (system + question): 60+16, 44+16, 60+52, 44+52; tokens = chars / 3.6 + 10 + 50, x 3 samples
    tokens = 3 * sum(c / 3.6 + 10 + 50 for c in (76, 60, 112, 96))
    forward = tokens / (400 * 402) * 4.6 * 7 / 7.62
    seconds = P.job_gpu_seconds(cfg, "persona_vectors", {"model": model, "persona": "calm"}, tmp_path, {})
    assert seconds == pytest.approx(generate + forward + 120, rel=1e-12)
    assert seconds - 120 == pytest.approx(9.4425, abs=1e-4)  # the two terms: 9.4160 + 0.0265
    (tmp_path / "calm.json").unlink()
    assert P.job_gpu_seconds(cfg, "persona_vectors", {"model": model, "persona": "calm"}, tmp_path, {}) is None
