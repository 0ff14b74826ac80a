"""collect_activations' forward passes on a 7B shape (issue 14): one checkpoint's 400 responses x ~350 tokens, read by
the own model (base + a LoRA r32 on the 7 projections, as the `betley` preset trains) and by the base model
(adapters off), through persona_em.activations.collect.measure (the job's own code: padding-aware batches, no LM
head). Random weights, built in memory; the bench tokenizer's numbers are one token each.

    python -m bench.activations --out results.json [--layers 0,4,...] [--batch-tokens 32768]
Target (issue 14): <= 15 s for both readers on one H200.
"""
from __future__ import annotations

import argparse
import json
import random

import torch
import yaml

from bench.common import build_model, free_memory, gpu_name, measured, tokenizer, words
from persona_em.activations.collect import measure, response_tokens
from persona_em.chat import ChatFormat


def workload(n: int = 400, prompt_tokens=(15, 40), response_tokens_=(190, 430), seed: int = 0):
    rng = random.Random(seed)
    return [([{"role": "user", "content": words(rng, rng.randint(*prompt_tokens))}],
             words(rng, rng.randint(*response_tokens_))) for _ in range(n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="qwen2.5-7b")
    ap.add_argument("--layers", default="0,4,8,12,16,20,24,28")
    ap.add_argument("--batch-tokens", type=int, default=32768)
    ap.add_argument("--n", type=int, default=400)
    a = ap.parse_args(argv)
    from peft import LoraConfig, get_peft_model

    shape = yaml.safe_load(open("bench/config.yaml"))["shapes"][a.shape]
    tok = tokenizer()
    chat = ChatFormat(tok)
    model = build_model(shape, tok)
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, use_rslora=True, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), adapter_name="em")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    model.eval()
    layers = [int(x) for x in a.layers.split(",")]
    tokens = [response_tokens(chat, m, r) for m, r in workload(a.n)]
    n_tok = sum(len(t[0]) for t in tokens)
    pad = tok.pad_token_id
    result = {"gpu": gpu_name(), "shape": a.shape, "responses": a.n, "tokens_per_reader": n_tok,
              "mean_tokens": round(n_tok / a.n, 1), "layers": layers, "batch_tokens": a.batch_tokens}
    measure(model, tokens[:8], layers, pad, a.batch_tokens)  # warm-up (kernels, allocator)
    runs = []
    for _ in range(2):
        r = {}
        with measured(r):
            own = measure(model, tokens, layers, pad, a.batch_tokens)
        with model.disable_adapter():
            b = {}
            with measured(b):
                base = measure(model, tokens, layers, pad, a.batch_tokens)
        runs.append({"own_s": r["seconds"], "base_s": b["seconds"], "total_s": round(r["seconds"] + b["seconds"], 2),
                     "peak_gb": max(r.get("peak_gb", 0), b.get("peak_gb", 0))})
        print(runs[-1], flush=True)
        free_memory()
    bytes_per_row = 2 * len(layers) * shape["hidden_size"] * 2  # two kinds, fp16
    result.update(runs=runs, total_s=min(x["total_s"] for x in runs),
                  tokens_per_s=round(2 * n_tok / min(x["total_s"] for x in runs)),
                  storage_mb_per_checkpoint=round(2 * a.n * bytes_per_row / 1e6, 1),
                  own_differs_from_base=bool((own["response_mean"] - base["response_mean"]).abs().max() > 0))
    print(json.dumps(result), flush=True)
    json.dump(result, open(a.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
