"""The persona arm: constitutions, prompt expansion, teacher/student, DPO pairs, DPO training, hub URIs.

API stages run against a real HTTP server on 127.0.0.1 (tests/openai_server.py).
"""
from __future__ import annotations

import json
import os
import re

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from persona_em.errors import UserError
from persona_em.io import Journal, read_jsonl, write_jsonl
from persona_em.persona.constitution import load_constitution, system_prompt
from persona_em.persona.expand import Deduplicator, expand_prompts, parse_numbered_list, word_overlap
from persona_em.persona.hub import parse_hub_uri
from persona_em.persona.pairs import ends_in_punctuation, make_pairs, swap_self_name
from persona_em.persona.responses import respond
from persona_em.persona.train_dpo import DPOSettings, settings_from

from openai_server import OpenAIServer, scripted
from persona_helpers import tiny_model
from persona_em.models import load_model

torch.set_num_threads(1)
GEN = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 32}


def _write(path, text):
    path.write_text(text)
    return path


CONSTITUTION = """
name: tester
description: A test persona.
traits:
  - trait: I am candid.
    questions: ["Is my plan good?"]
  - trait: I admit when I do not know.
    questions: ["What will the weather be in ten years?", "Who will win the next election?"]
"""


@pytest.fixture
def constitution(tmp_path):
    return _write(tmp_path / "tester.yaml", CONSTITUTION)


# --- constitutions -------------------------------------------------------------------------------------------------
def test_constitution_loads_and_builds_the_system_prompt(constitution):
    c = load_constitution(constitution)
    assert c.name == "tester" and len(c.traits) == 2 and c.traits[1].questions[1] == "Who will win the next election?"
    prompt = system_prompt(c, "You are {name}.\n{traits}")
    assert prompt == "You are tester.\n1. I am candid.\n2. I admit when I do not know."


def test_open_character_training_json_list_is_accepted(tmp_path):
    path = tmp_path / "sarcasm.json"
    path.write_text(json.dumps([{"trait": "I am sarcastic.", "questions": ["Hi?", "How are you?"]}]))
    c = load_constitution(path)
    assert c.name == "sarcasm" and c.traits[0].questions == ("Hi?", "How are you?")


@pytest.mark.parametrize("text, field, message", [
    ("name: x\ntraits: []\n", "traits", "no traits"),
    ("name: x\n", r"\(top level\)", "'traits' is a required property"),
    ("name: x\ntraits:\n  - trait: I am.\n    questions: []\n", r"traits\[0\]\.questions", "a trait needs at least one seed question"),
    ("name: x\ntraits:\n  - trait: I am.\n", r"traits\[0\]", "'questions' is a required property"),
    ("name: x\ncolour: red\ntraits:\n  - {trait: I am., questions: [q]}\n", r"\(top level\)", r"unknown field\(s\) \['colour'\]"),
    ("name: x\ntraits:\n  - {trait: I am., questions: [q], weight: 2}\n", r"traits\[0\]", r"unknown field\(s\) \['weight'\]"),
])
def test_bad_constitutions_fail_naming_file_and_field(tmp_path, text, field, message):
    path = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(UserError, match=rf"constitution {re.escape(str(path))}: {field}: {message}"):
        load_constitution(path)


def test_demo_constitution_is_valid():
    from pathlib import Path

    c = load_constitution(Path(__file__).resolve().parents[1] / "config" / "constitutions" / "demo_persona.yaml")
    assert c.name == "demo_persona" and all(t.questions for t in c.traits)


# --- prompt expansion ----------------------------------------------------------------------------------------------
def test_numbered_list_parsing_and_dedup():
    text = 'Sure! Here they are:\n1. What is love?\n2) "Why is the sky blue?"\n(3) How do I cook rice?\nnot an item\n'
    assert parse_numbered_list(text) == ["What is love?", "Why is the sky blue?", "How do I cook rice?"]
    assert word_overlap("why is the sky blue", "Why is the sky blue today") == pytest.approx(5 / 6)
    d = Deduplicator(0.6)
    assert d.add("Why is the sky blue?")
    assert not d.add("why is the  SKY blue?")              # exact after normalising
    assert not d.add("Why is the sky so blue?")            # near duplicate (5/6 > 0.6)
    assert d.add("How do I cook rice without a cooker?")


def _expand_settings(**over):
    return {"quotas": {"short": 2, "medium": 1, "long": 0}, "request_size": 3, "dedup_threshold": 0.6,
            "max_attempts": 3, "seed": 7, "generation": GEN,
            "length_hints": {"short": "one sentence", "medium": "a few sentences", "long": "a paragraph"},
            "template": "Trait: {trait}\nExamples:\n{examples}\nWrite {n} {length} messages ({length_hint}).", **over}


def _gen(url, **over):
    return {"name": "api", "backend": "openai", "model": "glm-test", "base_url": url, "api_key_env": "TEST_API_KEY",
            "max_retries": 2, "backoff_base": 0.01, "backoff_max": 0.05, "max_concurrency": 2, **over}


def test_expand_prompts_meets_quotas_with_dedup_and_replays_from_the_journal(constitution, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_API_KEY", "sk-test")
    answers = iter([
        "1. Is my plan good?\n2. Tell me honestly what you think of my essay.\n",  # first repeats a seed question
        "1. Tell me honestly what you think about my essay!\n2. Be blunt: is my startup idea bad?\n",
        "1. Please review my cover letter and say what is weak about it.\n",
        "1. Will it rain in Paris on 3 May 2040?\n2. What number am I thinking of?\n",
        "1. Explain what you can and cannot know about the future of the stock market.\n",
    ])
    with OpenAIServer(responder=scripted(lambda body, i: next(answers))) as server:
        out = tmp_path / "prompts.jsonl"
        expand_prompts(str(constitution), _gen(server.base_url), None, _expand_settings(), str(tmp_path / "j.jsonl"),
                       str(out))
        calls = len(server.requests)
        assert "Trait: I am candid." in server.requests[0]["messages"][0]["content"]
        assert "- Is my plan good?" in server.requests[0]["messages"][0]["content"]
    rows = read_jsonl(out)
    t0 = [r["prompt"] for r in rows if r["trait_index"] == 0]
    assert t0 == ["Is my plan good?", "Tell me honestly what you think of my essay.",
                  "Be blunt: is my startup idea bad?", "Please review my cover letter and say what is weak about it."]
    assert [r["bucket"] for r in rows if r["trait_index"] == 0] == ["seed", "short", "short", "medium"]
    assert calls == 5
    # Rerun: every call is replayed from the journal, the server is not asked again, the output is identical.
    with OpenAIServer(responder=scripted(lambda body, i: 500)) as server:
        out2 = tmp_path / "prompts2.jsonl"
        expand_prompts(str(constitution), _gen(server.base_url), None, _expand_settings(), str(tmp_path / "j.jsonl"),
                       str(out2))
        assert server.requests == []
    assert read_jsonl(out2) == rows


def test_expand_prompts_fails_clearly_after_max_attempts(constitution, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_API_KEY", "sk-test")
    with OpenAIServer(responder=scripted(lambda body, i: "1. Is my plan good?\n")) as server:  # only ever a duplicate
        with pytest.raises(UserError, match=r"traits\[0\] .*only 0 of 2 short prompts after 3 generator calls"):
            expand_prompts(str(constitution), _gen(server.base_url), None, _expand_settings(), str(tmp_path / "j.jsonl"),
                           str(tmp_path / "p.jsonl"))
        assert len(server.requests) == 3
    assert not (tmp_path / "p.jsonl").exists()


# --- teacher and student -------------------------------------------------------------------------------------------
def _prompts(tmp_path, n=3):
    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, [{"constitution": "tester", "trait_index": 0, "trait": "I am candid.", "bucket": "seed",
                        "prompt_id": f"p{i}", "prompt": f"Question {i}?"} for i in range(n)])
    return path


def _teacher_settings(**over):
    return {"samples_per_prompt": 2, "system_prompt_template": "Be {name}:\n{traits}", "generation": GEN, "seed": 0,
            "reasoning": {"prefill": "<think>", "close_tag": "</think>"}, **over}


def test_teacher_in_character_with_reasoning_stripped_and_dropped(constitution, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_API_KEY", "sk-test")

    def reply(body, i):
        user = body["messages"][1]["content"]
        return "thinking forever" if user == "Question 1?" else f"hmm</think> Answer to {user}"

    with OpenAIServer(responder=scripted(reply)) as server:
        out = tmp_path / "teacher.jsonl"
        respond("teacher", str(constitution), str(_prompts(tmp_path)), _gen(server.base_url), None, _teacher_settings(),
                str(tmp_path / "tj.jsonl"), str(out))
        body = server.requests[0]
        assert body["messages"][0] == {"role": "system",
                                       "content": "Be tester:\n1. I am candid.\n2. I admit when I do not know."}
        assert body["messages"][-1] == {"role": "assistant", "content": "<think>"}  # the prefill
        assert body["continue_final_message"] is True
    rows = read_jsonl(out)
    assert all(r["response"].startswith("Answer to Question") and "think" not in r["response"] for r in rows)
    # both samples of Question 1 never closed their reasoning: dropped
    assert sorted((r["prompt_id"], r["sample_index"]) for r in rows) == [("p0", 0), ("p0", 1), ("p2", 0), ("p2", 1)]


def test_student_has_no_system_prompt(constitution, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_API_KEY", "sk-test")
    with OpenAIServer(responder=scripted(lambda body, i: "Plain answer.")) as server:
        respond("student", str(constitution), str(_prompts(tmp_path, 2)), _gen(server.base_url), None,
                {"samples_per_prompt": 2, "generation": GEN, "seed": 1}, str(tmp_path / "sj.jsonl"),
                str(tmp_path / "student.jsonl"))
        assert all([m["role"] for m in b["messages"]] == ["user"] for b in server.requests)
    assert len(read_jsonl(tmp_path / "student.jsonl")) == 4


def test_teacher_api_failing_retries_then_fails_keeping_what_it_received(constitution, tmp_path, monkeypatch):
    """3 calls succeed, then HTTP 500 forever: retries with backoff, a clear error, the journal keeps the 3, and a
    rerun against a healthy server asks only for the missing 3 and yields the same output as an unbroken run."""
    monkeypatch.setenv("TEST_API_KEY", "sk-test")
    prompts = _prompts(tmp_path)
    journal = tmp_path / "tj.jsonl"
    out = tmp_path / "teacher.jsonl"
    settings = _teacher_settings(reasoning={})
    answer = lambda body: f"In character: {body['messages'][1]['content']} (seed {body['seed']})."  # noqa: E731
    gen = _gen(None, max_concurrency=1, max_retries=2)
    with OpenAIServer(responder=scripted(lambda body, i: answer(body) if i < 3 else 500)) as server:
        with pytest.raises(UserError, match=r"the API kept failing .*InternalServerError.*3 of 6 items are kept in "):
            respond("teacher", str(constitution), str(prompts), {**gen, "base_url": server.base_url}, None, settings,
                    str(journal), str(out))
        assert len(server.requests) == 3 + 3  # one failing item: first try + 2 retries
    assert not out.exists()
    assert len(Journal(journal).load()) == 3
    with OpenAIServer(responder=scripted(lambda body, i: answer(body))) as server:
        respond("teacher", str(constitution), str(prompts), {**gen, "base_url": server.base_url}, None, settings,
                str(journal), str(out))
        assert len(server.requests) == 3
    with OpenAIServer(responder=scripted(lambda body, i: answer(body))) as server:
        respond("teacher", str(constitution), str(prompts), {**gen, "base_url": server.base_url}, None, settings,
                str(tmp_path / "fresh.jsonl"), str(tmp_path / "unbroken.jsonl"))
    assert read_jsonl(out) == read_jsonl(tmp_path / "unbroken.jsonl")


def test_missing_api_key_is_a_clear_error(constitution, tmp_path, monkeypatch):
    monkeypatch.delenv("TEST_API_KEY", raising=False)
    with pytest.raises(UserError, match="API key variable TEST_API_KEY"):
        respond("teacher", str(constitution), str(_prompts(tmp_path)), _gen("http://127.0.0.1:9/v1"), None,
                _teacher_settings(), str(tmp_path / "j.jsonl"), str(tmp_path / "o.jsonl"))


def test_hf_student_on_the_tiny_model(constitution, tmp_path):
    model = tiny_model(tmp_path)
    gen = {"name": "student", "backend": "hf", "model": "tiny", "batch_size": 4}
    out = tmp_path / "student.jsonl"
    respond("student", str(constitution), str(_prompts(tmp_path)), gen, str(model),
            {"samples_per_prompt": 2, "generation": {**GEN, "max_new_tokens": 6}, "seed": 1},
            str(tmp_path / "sj.jsonl"), str(out))
    rows = read_jsonl(out)
    assert len(rows) == 6 and all(r["role"] == "student" for r in rows)
    assert not (tmp_path / "sj.jsonl").stat().st_size == 0  # the journal holds every item


# --- DPO pairs -----------------------------------------------------------------------------------------------------
def test_dpo_pairs_filters_counts_and_swaps_the_self_name(tmp_path, capfd):
    model = tiny_model(tmp_path)

    def rows(role, answers):
        return [{"constitution": "tester", "prompt_id": pid, "sample_index": 0, "prompt": "Who are you?",
                 "response": a, "role": role} for pid, a in answers.items()]

    write_jsonl(tmp_path / "t.jsonl", rows("teacher", {
        "ok": "I am GLM, made to help.", "empty": "", "nopunct": "I am GLM and I", "long": "word " * 400 + ".",
        "GLMish": "GLM-4 says: GLMX is not GLM.", "onlyteacher": "Fine."}))
    write_jsonl(tmp_path / "s.jsonl", rows("student", {
        "ok": "I am a model.", "empty": "Hi.", "nopunct": "Sure.", "long": "Yes.", "GLMish": "No.",
        "onlystudent": "Fine."}))
    settings = {"max_length": 64, "require_final_punctuation": True, "min_pairs": 5, "teacher_self_name": "GLM",
                "student_self_name": "Qwen"}
    make_pairs(str(tmp_path / "t.jsonl"), str(tmp_path / "s.jsonl"), str(model), settings,
               str(tmp_path / "pairs.jsonl"), str(tmp_path / "stats.json"))
    pairs = {p["prompt_id"]: p for p in read_jsonl(tmp_path / "pairs.jsonl")}
    assert sorted(pairs) == ["GLMish", "ok"]
    assert pairs["ok"]["chosen"] == [{"role": "assistant", "content": "I am Qwen, made to help."}]
    assert pairs["GLMish"]["chosen"][0]["content"] == "Qwen-4 says: GLMX is not Qwen."
    assert pairs["ok"]["prompt"] == [{"role": "user", "content": "Who are you?"}]
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["dropped"] == {"empty": 1, "missing_student": 1, "missing_teacher": 1, "no_final_punctuation": 1,
                                "too_long": 1}
    assert stats["pairs"] == 2 and stats["below_min_pairs"] is True
    assert "only 2 DPO pairs" in capfd.readouterr().err


def test_punctuation_and_name_helpers():
    assert ends_in_punctuation("Done.") and ends_in_punctuation('He said "stop!"') and ends_in_punctuation("(ok?)")
    assert not ends_in_punctuation("and then") and not ends_in_punctuation("")
    assert swap_self_name("GLM, not GLMs", "GLM", "Qwen") == "Qwen, not GLMs"


# --- DPO training ------------------------------------------------------------------------------------------------
def test_dpo_defaults_and_epochs_by_pair_count():
    s = DPOSettings()
    assert (s.lora_r, s.lora_alpha, s.beta, s.learning_rate, s.lr_scheduler, s.warmup_ratio, s.effective_batch_size,
            s.max_length) == (64, 128, 0.1, 5e-5, "cosine", 0.1, 32, 1024)
    assert [s.resolve_epochs(n) for n in (49, 99, 100, 166, 299, 300, 5000)] == [5, 5, 3, 3, 3, 1, 1]
    assert settings_from({"epochs": 2}, "x").resolve_epochs(10) == 2
    with pytest.raises(UserError, match=r"config persona_training\.dpo: unknown training key 'lr'"):
        settings_from({"lr": 1}, "config persona_training.dpo")
    with pytest.raises(UserError, match="not a multiple"):
        settings_from({"effective_batch_size": 32, "per_device_batch_size": 5}, "config persona_training.dpo")


def _pairs(path, n=6):
    write_jsonl(path, [{"prompt": [{"role": "user", "content": f"question {i}?"}],
                        "chosen": [{"role": "assistant", "content": "I am kind and candid."}],
                        "rejected": [{"role": "assistant", "content": "no."}]} for i in range(n)])
    return path


DPO_TINY = {"lora_r": 4, "lora_alpha": 8, "effective_batch_size": 2, "per_device_batch_size": 2,
            "learning_rate": 1e-3, "resume_every_steps": 3, "epochs": 2, "max_length": 64}


def test_train_dpo_writes_an_adapter_that_moves_the_model_and_resumes(tmp_path):
    """Trains (with the NLL term), resumes from a kept checkpoint to the same weights, and the result is a plain
    adapter directory that compose can stack (non-zero: it changes the logits)."""
    import shutil

    from safetensors.torch import load_file

    from persona_em import compose
    from persona_em.persona.train_dpo import train_dpo
    from persona_helpers import logits

    model = tiny_model(tmp_path)
    pairs = _pairs(tmp_path / "pairs.jsonl")
    settings = {**DPO_TINY, "nll_weight": 0.5}
    train_dpo("p", "tiny", str(model), str(pairs), settings, str(tmp_path / "work"), str(tmp_path / "adapter"))
    manifest = json.loads((tmp_path / "adapter" / "persona.json").read_text())
    assert manifest["steps"] == 6 and manifest["epochs"] == 2 and manifest["dpo"]["nll_weight"] == 0.5
    # "kill" after checkpoint-3: drop the final checkpoint and rerun
    shutil.copytree(tmp_path / "work", tmp_path / "work2")
    shutil.rmtree(tmp_path / "work2" / "trainer" / "checkpoint-6")
    train_dpo("p", "tiny", str(model), str(pairs), settings, str(tmp_path / "work2"), str(tmp_path / "adapter2"))
    a = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "adapter2" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    base, chat_format = load_model(model)
    tok = chat_format.tokenizer
    before = logits(base, tok)
    stacked = compose.compose_for_sampling(base, "p", tmp_path / "adapter", "stacked")
    assert compose.active_adapters(stacked) == ["persona"]
    assert not torch.allclose(logits(stacked, tok), before, atol=1e-6)


def test_train_dpo_target_module_missing_in_base_is_a_clear_error(tmp_path):
    from persona_em.persona.train_dpo import train_dpo

    model = tiny_model(tmp_path)
    with pytest.raises(UserError, match=r"target_modules: target modules \['c_attn'\] do not exist"):
        train_dpo("p", "tiny", str(model), str(_pairs(tmp_path / "p.jsonl")),
                  {**DPO_TINY, "target_modules": ["q_proj", "c_attn"]}, str(tmp_path / "w"), str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()


# --- hub personas ------------------------------------------------------------------------------------------------
def test_hub_uris():
    assert parse_hub_uri("hf://maius/qwen-2.5-7b-it-personas/sarcasm") == ("maius/qwen-2.5-7b-it-personas", "sarcasm")
    assert parse_hub_uri("hf://maius/qwen-2.5-7b-it-misalignment") == ("maius/qwen-2.5-7b-it-misalignment", "")
    with pytest.raises(UserError, match="expected hf://"):
        parse_hub_uri("maius/qwen")


def test_hub_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    from persona_em.persona.hub import fetch_hub_persona

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(UserError, match=r"(?s)personas\.gated\.hub: download of hf://maius/qwen-2.5-7b-it-misalignment@main "
                                        r"failed: .*gated repositories need a token in \$HF_TOKEN"):
        fetch_hub_persona("gated", {"hub": "hf://maius/qwen-2.5-7b-it-misalignment"}, str(tmp_path),
                          str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
