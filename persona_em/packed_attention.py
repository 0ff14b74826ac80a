"""Attention for packed (padding-free) training micro-batches: causal flash attention per sequence.

Without it, transformers turns a packed row into a dense block-diagonal [T, T] mask, and SDPA then runs a masked
kernel over all T^2 pairs (cuDNN on an H100, with a per-shape graph build on the CPU at every step): measured as
~20% of the GPU time and ~30% of the CPU time of a 7B LoRA step (BENCHMARKS.md). Here each sequence gets an
unmasked causal SDPA call (flash kernel), which only does the work inside its own triangle. The sequence bounds
come from `packed_sequences(...)` around the forward+backward (set by train_em's EMTrainer), not from the
device, so no host-device sync happens per layer. Outside that context this is transformers' SDPA, unchanged.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTN_NAME = "sdpa_packed"
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_BOUNDS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("packed_bounds", default=None)


@contextlib.contextmanager
def packed_sequences(bounds: list[int]):
    """Token offsets [0, end_1, ..., T] of the sequences laid back to back in the current micro-batch."""
    token = _BOUNDS.set(list(bounds))
    try:
        yield
    finally:
        _BOUNDS.reset(token)


def packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = _BOUNDS.get()
    if bounds is None or query.shape[0] != 1 or bounds[-1] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = key.shape[1] != query.shape[1]
    # Not cuDNN (PyTorch's first choice on an H100): it builds an execution plan for every new sequence length,
    # measured at ~1.5 s per training step until every length has been seen once.
    with sdpa_kernel(_BACKENDS):
        outs = [
            F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                           dropout_p=dropout if module.training else 0.0, scale=scaling,
                                           enable_gqa=gqa)
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None  # [1, T, H, D] as transformers expects


def _mask(*args, **kwargs):
    """No [T, T] mask inside a packed micro-batch (the attention above ignores it); SDPA's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if _BOUNDS.get() is not None:
        return None
    return sdpa_mask(*args, **kwargs)


def use_attention(model, name: str, attention, mask) -> None:
    """Register `attention` (and its mask builder) with transformers under `name` once, and switch the (possibly
    PEFT-wrapped) model to it. Shared by the packed training attention and the GQA decode attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if name not in _REGISTERED:
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, mask)
        _REGISTERED.add(name)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(name)


_REGISTERED: set[str] = set()


def use_packed_attention(model) -> None:
    use_attention(model, ATTN_NAME, packed_sdpa, _mask)
