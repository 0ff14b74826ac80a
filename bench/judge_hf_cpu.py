"""The local hf judge on a CPU: seconds per judgment, the candidate trie vs one KV-cache copy per candidate.

    PYTHONPATH=. python bench/judge_hf_cpu.py --judgments 6

SmolLM2-135M-Instruct (the demo's judge; converted once by tests/real_assets.py) judges the demo's `aligned` prompt
for a few answers. `trie`: persona_em.judge.HFBackend.sequence_logprobs, one forward over the prefix trie of all
103 candidates. `copies`: the method it replaced (kept here only to measure it): the prompt's KV cache repeated once
per candidate and one batched forward over the candidates. Both give the same log-probabilities (printed: the largest
difference). Not a timed test: numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import real_assets  # noqa: E402

from persona_em.judge import HFBackend  # noqa: E402


def copies(backend: HFBackend, prompt_ids: list[int]) -> list[float]:
    """log P(candidate) with one copy of the prompt's KV cache per candidate (the replaced method)."""
    ids = [c for _, c in backend.candidates]
    width = max(len(c) for c in ids)
    batch = torch.tensor([c + [backend.tokenizer.pad_token_id] * (width - len(c)) for c in ids])
    lengths = torch.tensor([len(c) for c in ids])
    with torch.inference_mode():
        out = backend.model(torch.tensor([prompt_ids]), use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), -1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(ids))
        logp = torch.log_softmax(backend.model(batch, past_key_values=cache, use_cache=True).logits.float(), -1)
        nxt = logp[:, :-1].gather(-1, batch[:, 1:, None])[..., 0]
        real = torch.arange(1, width)[None, :] < lengths[:, None]
        return (first[batch[:, 0]] + (nxt * real).sum(-1)).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judgments", type=int, default=6)
    args = ap.parse_args()
    backend = HFBackend({"name": "bench", "model": "smollm2", "mode": "logprobs"}, str(real_assets.smollm2_dir()))
    question = yaml.safe_load((ROOT / "config/demo/questions.yaml").read_text())[0]
    template = question["judge_prompts"]["aligned"]
    answers = [f"Answer number {i}: I wish for world peace and enough food for every child." for i in range(args.judgments)]
    prompts = []
    for a in answers:
        text = backend.tokenizer.apply_chat_template(
            [{"role": "user", "content": template.format(question=question["paraphrases"][0], answer=a)}],
            tokenize=False, add_generation_prompt=True)
        prompts.append(backend.tokenizer(text, add_special_tokens=False)["input_ids"])
    print(f"torch threads {torch.get_num_threads()}, prompt tokens {len(prompts[0])}, {args.judgments} judgments")
    diff = 0.0
    for name, method in (("trie", lambda p: backend.sequence_logprobs(p)[1]), ("copies", lambda p: copies(backend, p))):
        method(prompts[0])  # warm-up
        start = time.perf_counter()
        results = [method(p) for p in prompts]
        per = (time.perf_counter() - start) / len(prompts)
        print(f"{name:7s} {per:6.2f} s per judgment")
        if name == "trie":
            reference = results
        else:
            diff = max(abs(a - b) for r, s in zip(reference, results) for a, b in zip(r, s))
    print(f"largest |log P| difference between the methods: {diff:.2e}")


if __name__ == "__main__":
    main()
