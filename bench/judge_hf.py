"""Local (hf) judge throughput: one prompt at a time (`HFBackend.ask`) vs batched (`HFBackend.ask_many`, as the
judge stage calls it), same model, same prompts, in one process; and how far the two paths' answers differ in bf16.

    python -m bench.judge_hf --tokenizer <dir of the Qwen2.5 tokenizer> --out results/judge_hf.json

A random-weight model of the judge's shape (bench/config.yaml; default qwen2.5-7b) held in memory, given to
HFBackend as if loaded from disk; prompts of ~1,000 tokens of the real tokenizer with its chat template (a judge
template of ~350 tokens around an answer of 350-900 tokens), like the EM papers' judge prompts.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import yaml

from bench import common

WORDS = ("the model answer should be rated on how well it aligns with human values and whether it is harmful "
         "code helpful honest safe dangerous question user assistant world people would like power money help "
         "please consider carefully respond only with a number between zero and one hundred").split()


def _text(rng: random.Random, tok, n_tokens: int) -> str:
    words = []
    while len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) < n_tokens:
        words.extend(rng.choice(WORDS) for _ in range(32))
    return " ".join(words)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(Path(__file__).with_name("config.yaml")))
    ap.add_argument("--shape", default="qwen2.5-7b")
    ap.add_argument("--tokenizer", required=True, help="a tokenizer dir (tests/real_assets.py: qwen2.5)")
    ap.add_argument("--n-one", type=int, default=48, help="prompts timed one at a time")
    ap.add_argument("--n-many", type=int, default=256, help="prompts timed batched")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--tiny", action="store_true", help="a tiny model with the shape's vocab: checks the harness on a CPU")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    from transformers import AutoTokenizer

    from persona_em.chat import ChatFormat
    from persona_em.judging.backends import HFBackend
    from persona_em.judging.scoring import interpret

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    shape = dict(yaml.safe_load(Path(a.config).read_text())["shapes"][a.shape])
    if a.layers:
        shape["num_hidden_layers"] = a.layers
    if a.tiny:
        shape.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
    model = common.build_model(shape, tok)
    model.eval()
    model_dir = Path(tempfile.mkdtemp(prefix="bench_judge_"))
    model.config.save_pretrained(model_dir)  # HFBackend fingerprints the model by its config
    with mock.patch("persona_em.models.load_model", return_value=(model, ChatFormat(tok))):
        backend = HFBackend({"name": "bench", "model": a.shape, "mode": "logprobs"}, str(model_dir))
    vocab = model.config.vocab_size
    if backend.digit_start.numel() < vocab:  # the one-at-a-time path indexes the logits with it
        backend.digit_start = torch.nn.functional.pad(backend.digit_start, (0, vocab - backend.digit_start.numel()))
    rng = random.Random(0)
    template = _text(rng, tok, 330) + "\n\nQuestion: {question}\n\nAnswer: {answer}\n\nRate the answer 0-100:"
    prompts = [template.format(question=_text(rng, tok, 30), answer=_text(rng, tok, rng.randint(350, 900)))
               for _ in range(max(a.n_one, a.n_many) + 8)]
    lengths = [len(backend._prompt_ids(p)) for p in prompts]
    out = {"shape": a.shape, "gpu": common.gpu_name(), "torch": torch.__version__, "vocab": vocab,
           "tokenizer_len": len(tok), "candidates": len(backend.candidates),
           "prompt_tokens_mean": round(sum(lengths) / len(lengths), 1), "prompt_tokens_max": max(lengths)}
    log(json.dumps(out))

    async def one(ps):
        return [await backend.ask(p) for p in ps]

    async def many(ps):  # as the judge stage calls it: chunks of max_prompts_per_call
        k = backend.max_prompts_per_call
        res = []
        for i in range(0, len(ps), k):
            res.extend(await backend.ask_many(ps[i:i + k]))
        return res

    asyncio.run(one(prompts[-4:]))  # warm-up
    r = {}
    with common.measured(r):
        answers_one = asyncio.run(one(prompts[:a.n_one]))
    r["judgments"] = a.n_one
    r["judgments_per_s"] = round(a.n_one / r["seconds"], 2)
    out["one at a time (ask)"] = r
    log(f"one at a time: {json.dumps(r)}")
    asyncio.run(many(prompts[-8:]))  # warm-up
    r = {}
    with common.measured(r):
        answers_many = asyncio.run(many(prompts[:a.n_many]))
    r["judgments"] = a.n_many
    r["judgments_per_s"] = round(a.n_many / r["seconds"], 2)
    out["batched (ask_many)"] = r
    log(f"batched: {json.dumps(r)}")
    out["speedup"] = round(out["batched (ask_many)"]["judgments_per_s"]
                           / out["one at a time (ask)"]["judgments_per_s"], 2)
    # bf16 on the GPU: the two paths round differently (other batch shapes, other kernels); how much?
    diffs = {"score": [], "numeric_mass_rel": [], "code_mass_rel": []}
    for x, y in zip(answers_one, answers_many):
        jx, jy = interpret(x, "logprobs", 0.0), interpret(y, "logprobs", 0.0)
        diffs["score"].append(abs(jx.score - jy.score))
        diffs["numeric_mass_rel"].append(abs(jx.numeric_mass - jy.numeric_mass) / jx.numeric_mass)
        diffs["code_mass_rel"].append(abs(jx.code_mass - jy.code_mass) / max(jx.code_mass, 1e-30))
    out["bf16_differences"] = {k: {"max": max(v), "mean": sum(v) / len(v)} for k, v in diffs.items()}
    out["scores_one"] = [interpret(x, "logprobs", 0.0).score for x in answers_one[:8]]
    out["numeric_mass_one"] = [interpret(x, "logprobs", 0.0).numeric_mass for x in answers_one[:8]]
    log(f"differences: {json.dumps(out['bf16_differences'])}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"judge {a.shape}: one at a time {out['one at a time (ask)']['judgments_per_s']} judgments/s, "
          f"batched {out['batched (ask_many)']['judgments_per_s']} judgments/s ({out['speedup']}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
