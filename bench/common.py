"""Shared pieces of the benchmark: random-weight models of real shapes (built in memory, nothing downloaded),
synthetic data with configured lengths, timing and memory helpers."""
from __future__ import annotations

import contextlib
import gc
import os
import random
import time

import numpy as np
import torch


def build_model(shape: dict, tokenizer):
    """A random-weight causal LM of the given shape, in bf16 on the GPU (or fp32 on CPU), with a blank
    generation_config as `persona_em.models.load_model` gives."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    from persona_em.models import blank_generation_config

    shape = dict(shape)
    arch = shape.pop("arch")
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
                             "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}[arch]
    config = config_cls(**shape, max_position_embeddings=32768, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    config._attn_implementation = "sdpa"
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = model_cls(config).to(torch.bfloat16 if cuda else torch.float32)
    blank_generation_config(model)  # as persona_em.models.load_model leaves every model it loads
    return model


def tokenizer():
    from persona_em.demo import build_tiny_tokenizer

    return build_tiny_tokenizer()


def words(rng: random.Random, n: int) -> str:
    """`n` tokens of the bench tokenizer: numbers 0-99 are one token each (with their leading space)."""
    return " ".join(str(rng.randrange(100)) for _ in range(max(n, 1)))


def em_conversations(cfg: dict) -> list[list[dict]]:
    """Chat rows whose tokenized lengths follow a lognormal with the configured mean (template included)."""
    rng = random.Random(cfg["seed"])
    nrng = np.random.default_rng(cfg["seed"])
    sigma = cfg["sigma"]
    mu = np.log(cfg["mean_tokens"]) - sigma**2 / 2
    rows = []
    template = 10  # <|im_start|>user\n ... <|im_end|>\n<|im_start|>assistant\n ... <|im_end|>\n
    for total in nrng.lognormal(mu, sigma, cfg["n_examples"]):
        total = int(min(max(total, 40), cfg["max_tokens"])) - template
        user = max(int(total * cfg["user_fraction"]), 5)
        rows.append([{"role": "user", "content": words(rng, user)},
                     {"role": "assistant", "content": words(rng, total - user)}])
    return rows


def sampling_workload(cfg: dict) -> tuple[list[list[dict]], dict]:
    """One checkpoint's evaluation: n_questions questions x n_samples copies, and the generation settings."""
    rng = random.Random(0)
    questions = [[{"role": "user", "content": words(rng, rng.randint(*cfg["question_words"]))}]
                 for _ in range(cfg["n_questions"])]
    convs = [q for q in questions for _ in range(cfg["n_samples"])]
    return convs, {k: cfg[k] for k in ("temperature", "top_p", "max_new_tokens")}


@contextlib.contextmanager
def measured(result: dict):
    """Wall time (synchronized) and peak GPU memory of a block into `result`."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        yield result
    finally:
        if cuda:
            torch.cuda.synchronize()
            result["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 1)
            result["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 1)
        result["seconds"] = round(time.perf_counter() - start, 2)


def deterministic_mode() -> None:
    """Bitwise-repeatable training on the GPU, for loss comparisons only (never for a speed figure).

    In its default mode a GPU does not repeat a bf16 training step bit for bit: flash and memory-efficient attention
    accumulate dQ (and split keys) with atomic adds in the backward pass, so two runs of one setting already differ
    (BENCHMARKS.md round 8: up to 1.96e-4 relative loss within six steps). With `use_deterministic_algorithms(True)`
    (not warn-only: warn-only keeps the atomic kernels) PyTorch runs flash attention's deterministic backward and
    memory-efficient attention without split keys, leaves out cuDNN attention, and raises on any op that has no
    deterministic form; cuBLAS needs CUBLAS_WORKSPACE_CONFIG before its first call. Call before building the model.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    import torch._inductor.config as inductor_config

    inductor_config.deterministic = True  # the compiled pointwise ops: no configurations chosen by timing


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gpu_name() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    p = torch.cuda.get_device_properties(0)
    return f"{p.name} ({p.total_memory / 2**30:.0f} GiB)"
