"""The judge's path key: what changes it (what the judge answers) and what must not (how it is called, its cost)."""
import copy
import hashlib

import pytest

from conftest import REPO, demo_config, judge_key_of, run_snakemake
from persona_em.errors import UserError
from persona_em.io import stable_hash
from persona_em.judging.identity import judge_key, judge_key_identity, questions_sha256


def api_config(tmp_path, **judge):
    q = tmp_path / "questions.yaml"
    if not q.exists():
        q.write_text((REPO / "config/demo/questions.yaml").read_text())
    return {"models": {"tiny": {"build_tiny": {"hidden_size": 64, "num_layers": 2, "seed": 0}, "size_b": 0.001}},
            "evaluation": {"questions": str(q), "judges": ["gpt", "local"]},
            "judges": {"gpt": {"backend": "openai", "model": "gpt-4o-2024-08-06", **judge},
                       "local": {"backend": "hf", "model": "tiny", "min_numeric_mass": 0.0}}}


def changed(cfg, name, **settings):
    cfg = copy.deepcopy(cfg)
    cfg["judges"][name].update(settings)
    return cfg


def test_key_is_name_and_hash_and_deterministic(tmp_path):
    cfg = api_config(tmp_path)
    key = judge_key(cfg, "gpt")
    assert key == judge_key(copy.deepcopy(cfg), "gpt") == judge_key(cfg, "gpt", questions_sha256(cfg))
    name, digest = key.rsplit("-", 1)
    assert name == "gpt" and len(digest) == 8 and int(digest, 16) >= 0
    assert digest == stable_hash(judge_key_identity(cfg, "gpt"), 8)  # judge.json's identity re-derives the key
    # Spelling out a default is the same judge.
    assert judge_key(changed(cfg, "gpt", mode="logprobs", min_numeric_mass=0.25), "gpt") == key


@pytest.mark.parametrize("setting", [
    {"model": "gpt-4.1-2025-04-14"},
    {"mode": "text"},
    {"base_url": "https://openrouter.ai/api/v1"},
    {"min_numeric_mass": 0.5},
    {"max_answer_chars": 1000},
])
def test_what_the_judge_answers_changes_the_key(tmp_path, setting):
    cfg = api_config(tmp_path)
    assert judge_key(changed(cfg, "gpt", **setting), "gpt") != judge_key(cfg, "gpt")


@pytest.mark.parametrize("setting", [
    {"concurrency": 64}, {"budget_usd": 5.0}, {"price_per_million_input_tokens": 2.5},
    {"price_per_million_output_tokens": 10.0}, {"max_retries": 0}, {"timeout": 5}, {"backoff_base": 3.0},
    {"backoff_max": 1.0}, {"api_key_env": "OTHER_KEY"}, {"text_max_tokens": 64},  # logprobs mode: one token
])
def test_how_it_is_called_and_what_it_costs_keep_the_key(tmp_path, setting):
    cfg = api_config(tmp_path)
    assert judge_key(changed(cfg, "gpt", **setting), "gpt") == judge_key(cfg, "gpt")


def test_text_mode_answer_length_is_part_of_the_key(tmp_path):
    cfg = changed(api_config(tmp_path), "gpt", mode="text")
    assert judge_key(changed(cfg, "gpt", text_max_tokens=64), "gpt") != judge_key(cfg, "gpt")


def test_question_file_contents_change_every_key(tmp_path):
    cfg = api_config(tmp_path)
    before = {n: judge_key(cfg, n) for n in ("gpt", "local")}
    q = tmp_path / "questions.yaml"
    q.write_text(q.read_text().replace("{answer}", "{answer}\n(be strict)", 1))
    after = {n: judge_key(cfg, n) for n in ("gpt", "local")}
    assert all(before[n] != after[n] for n in before)


def test_url_source_uses_the_configured_sha256(tmp_path):
    cfg = api_config(tmp_path)
    local = judge_key(cfg, "gpt")
    digest = hashlib.sha256((tmp_path / "questions.yaml").read_bytes()).hexdigest()
    cfg["evaluation"]["questions"] = {"url": "https://example.org/q.yaml", "sha256": digest.upper()}
    assert judge_key(cfg, "gpt") == local  # the same bytes, wherever they come from
    cfg["evaluation"]["questions"]["sha256"] = "0" * 64
    assert judge_key(cfg, "gpt") != local


def test_hf_judge_key_follows_its_model_entry_but_not_size(tmp_path):
    cfg = api_config(tmp_path)
    key = judge_key(cfg, "local")
    assert judge_key(changed(cfg, "local", concurrency=2), "local") == key
    resized = copy.deepcopy(cfg)
    resized["models"]["tiny"]["size_b"] = 7.0
    assert judge_key(resized, "local") == key
    reseeded = copy.deepcopy(cfg)
    reseeded["models"]["tiny"]["build_tiny"]["seed"] = 1
    assert judge_key(reseeded, "local") != key
    cfg["models"]["other"] = copy.deepcopy(cfg["models"]["tiny"])
    assert judge_key(changed(cfg, "local", model="other"), "local") != key


def test_missing_local_question_file_is_one_clear_error(tmp_path):
    cfg = api_config(tmp_path)
    cfg["evaluation"]["questions"] = str(tmp_path / "nowhere.yaml")
    with pytest.raises(UserError, match=r"config evaluation\.questions: .*nowhere\.yaml: question file not found"):
        judge_key(cfg, "gpt")


def test_missing_question_file_stops_the_workflow_before_any_job(tmp_path):
    cfg = demo_config(tmp_path)
    cfg["evaluation"]["questions"] = str(tmp_path / "nowhere.yaml")
    res = run_snakemake(tmp_path, cfg, "-n")
    assert res.returncode != 0
    assert "MissingInputException" in res.stdout and "nowhere.yaml" in res.stdout, res.stdout[-2000:]
    assert not (tmp_path / "results").exists()
    # stages that do not need it still plan
    res = run_snakemake(tmp_path, cfg, "-n", f"{tmp_path}/results/em/tiny/none/none/insecure_demo/seed0/checkpoints")
    assert res.returncode == 0, res.stdout[-2000:]


def test_demo_config_key_is_what_the_workflow_plans(tmp_path):
    cfg = demo_config(tmp_path)
    cfg["grid"]["personas"] = ["none"]
    key = judge_key_of(cfg, "tiny_judge")
    res = run_snakemake(tmp_path, cfg, "-n")
    assert res.returncode == 0, res.stdout[-3000:]
    assert f"results/judged/{key}/tiny/none/none/insecure_demo/seed0.jsonl" in res.stdout
    assert f"results/tables/{key}/judge.json" in res.stdout
    assert "results/tables/tiny_judge/" not in res.stdout and "results/judged/tiny_judge/" not in res.stdout
