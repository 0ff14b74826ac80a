"""Fast batched sampling on a GPU: static KV cache, compiled + graph-captured decode, GQA-aware decode attention.

Measured in bench/ (BENCHMARKS.md). Plain HF `generate` on a batch of 400 spends most of each decode step on
(1) copying the growing DynamicCache (`torch.cat` per layer per step), (2) `repeat_kv`: with a padding mask,
transformers' SDPA path expands the 4 (Qwen) or 8 (Llama) KV heads to all query heads, i.e. copies the whole
KV cache 7x / 4x per step, and (3) per-kernel launch gaps. A static cache removes (1); the attention below
removes (2) by letting the query heads of one KV group share it; transformers compiles the decode step with
CUDA graphs when the cache is static, which removes (3). A static cache also hands every step K/V of its full length
(prompt + max_new_tokens), of which SDPA's kernels read every slot; on a GPU the length-aware kernel of
decode_kernel.py reads only the filled ones.

Nothing here changes what is computed: the same logits up to bf16 rounding, the same sampling.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

ATTN_NAME = "sdpa_gqa_decode"
# Where the length-aware decode kernel (decode_kernel.py, Triton) replaces SDPA; "cpu" runs Triton's interpreter
# (tests). Empty: SDPA everywhere (the earlier path; bench/sample.py measures both).
KERNEL_DEVICES = {"cuda"}
_kernel_module = None  # decode_kernel, once imported by use_gqa_decode_attention (None: Triton is not installed)


def gqa_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                         **kwargs):
    """SDPA for one decode token without expanding the KV heads; anything else goes to transformers' SDPA.

    query [B, H, 1, D] is viewed as [B, KVH, H/KVH, D]: the query heads of a KV group become the "query positions"
    of that group (head h uses KV head h // (H/KVH), as in transformers' repeat_kv), so K/V are read once.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, q_len, d = query.shape
    kvh = key.shape[1]
    if q_len != 1 or kvh == h or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q = query.reshape(b, kvh, h // kvh, d)
    if (_kernel_module is not None and query.device.type in KERNEL_DEVICES
            and _kernel_module.supports(q, key, attention_mask)):
        mask = attention_mask[:, 0, -1, : key.shape[-2]]  # [B, L]: the decode token's row
        scale = scaling if scaling is not None else d ** -0.5
        out = torch.ops.persona_em.gqa_decode_attention(q, key, value, mask, scale)
        return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None
    mask = attention_mask
    if mask is not None:
        mask = mask[:, :, -1:, : key.shape[-2]]  # [B, 1, 1, L]: broadcast over KV heads and group
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None


def use_gqa_decode_attention(model) -> None:
    """Switch a (PEFT-wrapped) transformers model to the GQA decode attention (masks as for SDPA)."""
    from transformers.masking_utils import sdpa_mask

    from persona_em.training.packed_attention import use_attention

    global _kernel_module
    if _kernel_module is None:
        try:
            from persona_em.sampling import decode_kernel
        except ImportError:  # no Triton (CPU installs): SDPA
            decode_kernel = None
        if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0):
            decode_kernel = None  # its bf16 tensor-core products need an Ampere GPU or newer
        _kernel_module = decode_kernel
    use_attention(model, ATTN_NAME, gqa_decode_attention, sdpa_mask)


def kv_cache_bytes_per_token(config) -> int:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * 2  # K and V, bf16


def use_deterministic_compile() -> None:
    """Make Inductor choose kernel configurations without timing them on the device.

    By default Inductor benchmarks candidate configurations of some kernels in every process (reductions among
    them) and keeps the fastest; which one wins varies with timing noise, and a reduction with another block size
    adds in another order, so bf16 rounding and then sampled tokens differed between processes: two sampling jobs
    with the same seeds and the same compile cache sampled different tokens (BENCHMARKS.md, round 6). In this
    mode every process compiles and picks the same kernels: a cold job and two warm jobs on one GPU sampled the
    same 239,723 tokens. A job resumed in a new process (a timeout, a requeue) therefore continues with the same
    numbers, on the same GPU model and software. Set before the first compile; part of the compile cache's key.
    """
    import torch._inductor.config as inductor_config

    inductor_config.deterministic = True


# Devices where `generate` learns one step late that every row has stopped (deferred_stop_check); transformers
# defers only on "mps". Its check records a device event: CPU has none (tests stand one in).
DEFER_DEVICES = {"cuda"}


@contextlib.contextmanager
def deferred_stop_check():
    """Let `generate` on a GPU read its "all rows stopped" flag one step late, so the host never waits for the device.

    transformers 5.x asks `bool(unfinished.max() == 0)` after every decode step: a host-device synchronisation, after
    which the GPU idles while the host prepares the next step (guard checks of the compiled step, the CUDA-graph
    launch, the logits processors). A steady 400 x 600 Qwen2.5-7B step took 25.5 ms of wall time for 17.2 ms of GPU
    work (bench/profile_sample.py, BENCHMARKS.md round 7). transformers has the fix, `DeferredStopCheck` (the flag is
    copied asynchronously and read on the next step; the one extra step after the last row stopped is undone, and a
    row reaching max_new_tokens stops without one), but turns it on only for Apple's "mps" devices. This widens its
    `is_supported` to DEFER_DEVICES with the same conditions otherwise. Same tokens: the extra step comes after
    every row has finished and is cut off (tests/test_fast_sampling.py).
    """
    from transformers.generation.utils import DeferredStopCheck

    original = DeferredStopCheck.__dict__["is_supported"]

    def is_supported(device, cache, cache_is_returned, is_assistant):
        if device.type not in DEFER_DEVICES or is_assistant:
            return original.__func__(device, cache, cache_is_returned, is_assistant)
        return cache is None or cache.is_croppable or not cache_is_returned  # transformers' own conditions

    DeferredStopCheck.is_supported = staticmethod(is_supported)
    try:
        yield
    finally:
        DeferredStopCheck.is_supported = original


def fast_generate_kwargs() -> dict:
    """Extra `generate` arguments for the fast path (transformers compiles the decode step for a static cache)."""
    return {"cache_implementation": "static"}



@contextlib.contextmanager
def bf16_lora_compute(model, active: bool = True):
    """Run the LoRA products in bf16 under autocast without PEFT's fp32 copy of every LoRA input.

    PEFT keeps adapter weights in fp32 and casts each projection's input to fp32 before the LoRA matmuls
    (7 copies per layer per decode step); under bf16 autocast the matmuls run in bf16 from the bf16 input.
    """
    if not active:
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:  # no LoRA products (e.g. adapters folded into the weights for sampling): nothing to change
        yield
        return
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    finally:
        for m in layers:
            m.cast_input_dtype_enabled = True
