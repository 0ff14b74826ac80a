"""The persona arm through the real snakemake CLI: constitution -> DPO persona -> EM grid, and its DAG variants."""
from __future__ import annotations

import json

import pytest

from conftest import demo_config, run_snakemake
from persona_em.io import read_jsonl

pytestmark = pytest.mark.slow


def persona_demo(tmp_path, **grid):
    cfg = demo_config(tmp_path)
    cfg["sampling"].update(n_samples=2, max_new_tokens=8)
    cfg["grid"].update({"personas": ["demo_persona"], "compositions": ["stacked"], "datasets": ["insecure_demo"],
                        "seeds": [0], **grid})
    cfg.pop("analysis")  # the demo's control pair names a dataset this grid drops
    return cfg


def test_constitution_trained_persona_is_active_in_em_training_and_sampling(tmp_path):
    cfg = persona_demo(tmp_path)
    res = run_snakemake(tmp_path, cfg)
    assert res.returncode == 0, res.stdout[-3000:]
    results = tmp_path / "results"
    persona_dir = results / "personas/tiny/demo_persona"
    stats = json.loads((persona_dir / "dpo_pairs.stats.json").read_text())
    assert stats["pairs"] == 9  # 9 seed questions x 1 sample, no filter drops with the tiny model's settings
    manifest = json.loads((persona_dir / "dpo_adapter/persona.json").read_text())
    assert manifest["epochs"] == 1 and manifest["pairs"] == 9  # the demo's epochs: 1
    cell = "tiny/demo_persona/stacked/insecure_demo/seed0"
    trained = json.loads((results / f"em/{cell}/checkpoints/checkpoints.json").read_text())
    assert trained["active_adapters_in_training"] == ["em", "persona"]
    rows = read_jsonl(results / f"samples/{cell}.jsonl")
    assert rows and all(r["active_adapters"] == ["em", "persona"] for r in rows)
    assert all(r["persona"] == "demo_persona" and r["composition"] == "stacked" for r in rows)


def test_introspection_and_hub_personas_are_in_the_dag(tmp_path):
    cfg = persona_demo(tmp_path, personas=["demo_persona", "hubbed"])
    cfg["personas"]["hubbed"] = {"hub": "hf://maius/qwen-2.5-7b-it-personas/sarcasm"}
    cfg["persona_training"]["introspection"] = {"enabled": True}
    res = run_snakemake(tmp_path, cfg, "-n")
    assert res.returncode == 0, res.stdout[-3000:]
    for rule in ("fetch_hub_persona", "expand_prompts", "teacher", "student", "dpo_pairs", "train_dpo",
                 "introspection", "train_sft"):
        assert f"rule {rule}:" in res.stdout, rule
    assert "results/personas/tiny/demo_persona/adapter" in res.stdout  # the cat(dpo, sft) persona feeds the grid


def test_constitution_errors_fail_the_rule_with_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntraits:\n  - trait: I am.\n    questions: []\n")
    cfg = persona_demo(tmp_path)
    cfg["personas"]["demo_persona"]["constitution"] = str(bad)
    res = run_snakemake(tmp_path, cfg, "--until", "expand_prompts")
    assert res.returncode != 0
    assert f"constitution {bad}: traits[0].questions: a trait needs at least one seed question" in res.stdout
    assert not (tmp_path / "results/persona_data/demo_persona/prompts.jsonl").exists()


def test_unknown_persona_generator_is_a_config_error(tmp_path):
    cfg = persona_demo(tmp_path)
    cfg["persona_training"]["teacher"]["generator"] = "nope"
    res = run_snakemake(tmp_path, cfg, "-n")
    assert res.returncode != 0
    assert "persona_training.teacher.generator: unknown generator 'nope'" in res.stdout


def test_api_generators_run_on_the_submit_host(tmp_path):
    cfg = persona_demo(tmp_path)
    cfg["persona_training"]["generators"]["api"] = {"backend": "openai", "model": "glm-4.5-air"}
    cfg["persona_training"]["teacher"]["generator"] = "api"
    res = run_snakemake(tmp_path, cfg, "-n")
    assert res.returncode == 0, res.stdout[-3000:]
    assert "rule teacher_api:" in res.stdout and "rule expand_prompts_api:" in res.stdout
    assert "rule teacher:" not in res.stdout and "models/tiny" in res.stdout  # the student still needs the model
