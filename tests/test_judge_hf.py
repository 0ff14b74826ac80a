"""The local hf judge: the exact expected value over full number continuations, on the demo's tiny model (whose
tokenizer splits numbers into digits, like Qwen's)."""
import asyncio
import math

import pytest
import torch

from conftest import demo_config, judge_key_of
from judge_fixtures import write_questions, write_samples
from persona_em.io import read_jsonl
from persona_em.judging.backends import HFBackend
from persona_em.judging.cache import JudgeCache
from persona_em.judging.run import judge_samples

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return str(tiny_model_dir)  # the session's tiny demo model (tests/conftest.py)


@pytest.fixture(scope="module")
def backend(tiny):
    return HFBackend({"name": "t", "model": "tiny", "mode": "logprobs"}, tiny)


def brute_force_logprob(backend, prompt_ids, ids):
    """log P(ids | prompt) and log P(no digit next), each from a full forward pass without any cache."""
    lp = 0.0
    for j in range(len(ids)):
        x = torch.tensor([prompt_ids + ids[:j]])
        with torch.inference_mode():
            lp += torch.log_softmax(backend.model(x).logits[0, -1].float(), -1)[ids[j]].item()
    with torch.inference_mode():
        p = torch.softmax(backend.model(torch.tensor([prompt_ids + ids])).logits[0, -1].float(), -1)
    return lp, math.log(1 - p[backend.digit_start].sum().item())


def test_the_demo_tokenizer_splits_numbers_into_digits(backend):
    ids = dict(backend.candidates)
    assert len(ids["100"]) == 3 and len(ids["42"]) == 2 and len(ids["7"]) == 1


def test_exact_multitoken_probabilities_match_brute_force(backend):
    tok = backend.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Rate this answer 0-100: hello"}], tokenize=False,
                                   add_generation_prompt=True)
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    _, seq_lp, end_lp = backend.sequence_logprobs(prompt_ids)
    index = {label: i for i, (label, _) in enumerate(backend.candidates)}
    for label in ["0", "7", "42", "100", "CODE", "REFUSAL"]:
        lp, elp = brute_force_logprob(backend, prompt_ids, dict(backend.candidates)[label])
        assert seq_lp[index[label]] == pytest.approx(lp, abs=1e-4), label
        assert end_lp[index[label]] == pytest.approx(elp, abs=1e-4), label


def test_score_is_the_expected_value_over_all_101_numbers(backend):
    raw = asyncio.run(backend.ask("Rate this answer 0-100: hello"))
    probs = {int(k): p for k, p in raw["number_probs"].items()}
    assert sorted(probs) == list(range(101))
    mass = sum(probs.values())
    assert 0 < mass < 1
    from persona_em.judging.scoring import interpret
    j = interpret(raw, "logprobs", 0.0)
    assert j.score == pytest.approx(sum(k * p for k, p in probs.items()) / mass)
    assert j.numeric_mass == pytest.approx(mass)
    assert 0 < len(raw["top_logprobs"]) <= 20  # top-20 token ids; byte fragments may decode alike


def test_hf_judge_stage_with_cache(tmp_path, tiny):
    q = write_questions(tmp_path)
    s = write_samples(tmp_path / "s.jsonl", ["I wish for peace.", ""])
    demo = demo_config(tmp_path)
    demo["evaluation"]["questions"] = str(q)
    cfg = demo["judges"]["tiny_judge"]
    key = judge_key_of(demo, "tiny_judge")  # what the judge rule passes
    cache = tmp_path / "c.sqlite"
    counts = judge_samples(str(s), str(q), "tiny_judge", cfg, tiny, str(tmp_path / "j"), str(tmp_path / "o.jsonl"),
                           cache_path=str(cache), judge_key=key)
    rows = read_jsonl(tmp_path / "o.jsonl")
    assert counts["asked"] == 4 and len(rows) == 4
    assert all(0 <= r["score"] <= 100 and r["status"] == "scored" for r in rows)
    assert {(r["judge"], r["judge_key"], r["judge_model"]) for r in rows} == {("tiny_judge", key, "tiny")}
    counts = judge_samples(str(s), str(q), "tiny_judge", cfg, tiny, str(tmp_path / "j"), str(tmp_path / "o2.jsonl"),
                           cache_path=str(cache), judge_key=key)
    assert counts["asked"] == 0 and counts["cache"] == 4 and len(JudgeCache(cache)) == 4


def test_logits_wider_than_the_tokenizer(tmp_path, tiny):
    """Real Qwen2.5 checkpoints have 152,064 logits for 151,665 tokens (padding rows): the digit mask and the top
    tokens cover the logits, not the tokenizer (this raised IndexError in the digit mask)."""
    from persona_em.models import load_model

    model, chat_format = load_model(tiny)
    tok = chat_format.tokenizer
    model.resize_token_embeddings(len(tok) + 13)
    model.save_pretrained(tmp_path / "padded")
    tok.save_pretrained(tmp_path / "padded")
    padded = HFBackend({"name": "t", "model": "tiny", "mode": "logprobs"}, str(tmp_path / "padded"))
    raw = asyncio.run(padded.ask("Rate this answer 0-100: hello"))
    assert padded.model.config.vocab_size == len(tok) + 13 and padded.digit_start.shape == (len(tok) + 13,)
    assert not padded.digit_start[len(tok):].any()
    assert sorted(int(k) for k in raw["number_probs"]) == list(range(101)) and len(raw["top_logprobs"]) > 0
    from persona_em.judging.scoring import interpret
    assert interpret(raw, "logprobs", 0.0).status == "scored"


def test_digit_mask_follows_the_number_rule(backend):
    from persona_em.judging.scoring import starts_a_number

    tok = backend.tokenizer
    for i in range(len(tok)):
        text = tok.decode([i])
        assert bool(backend.digit_start[i]) == (text[:1] in set("0123456789")), (i, text)
    assert starts_a_number("7") and starts_a_number("70") and not starts_a_number(" 7")
    assert not starts_a_number("²") and not starts_a_number("٣") and not starts_a_number("")
