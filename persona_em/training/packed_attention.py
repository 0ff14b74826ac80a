"""Attention for packed (padding-free) training micro-batches: causal flash attention per sequence.

Without it, transformers turns a packed row into a dense block-diagonal [T, T] mask, and SDPA then runs a masked
kernel over all T^2 pairs (cuDNN on an H100, with a per-shape graph build on the CPU at every step): measured as
~20% of the GPU time and ~30% of the CPU time of a 7B LoRA step (BENCHMARKS.md). Here each sequence gets
unmasked causal flash attention (on a GPU one variable-length flash call for all of them), which only does the work
inside its own triangle. A layer with a sliding window (Gemma 3's local layers) keeps it: each token sees
itself and the window - 1 tokens before it, as transformers' own mask has it. The sequence bounds come from `packed_sequences(...)` around the forward+backward (set by
train_em's EMTrainer), not from the device, so no host-device sync happens per layer. Outside that context this is
transformers' SDPA, unchanged.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from persona_em.compose import inner_model

ATTN_NAME = "sdpa_packed"
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class _Packed:
    """The sequence offsets of the current micro-batch, and (once, on first use) their copy on the GPU."""

    def __init__(self, bounds: list[int]):
        self.bounds = list(bounds)
        self.max_len = max((b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])), default=0)
        self._cu = None

    def cu_seqlens(self, device) -> torch.Tensor:
        if self._cu is None:  # pinned + non_blocking: the copy does not wait for the GPU to drain
            self._cu = torch.tensor(self.bounds, dtype=torch.int32).pin_memory().to(device, non_blocking=True)
        return self._cu


_PACKED: contextvars.ContextVar[_Packed | None] = contextvars.ContextVar("packed_bounds", default=None)


@contextlib.contextmanager
def packed_sequences(bounds: list[int]):
    """Token offsets [0, end_1, ..., T] of the sequences laid back to back in the current micro-batch."""
    token = _PACKED.set(_Packed(bounds))
    try:
        yield
    finally:
        _PACKED.reset(token)


def _varlen_attention():
    """PyTorch's variable-length flash attention (one kernel for all sequences of a micro-batch), or None where
    the installed version lacks it or its `window_size` causal masking (then one SDPA call per sequence)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn if "window_size" in inspect.signature(varlen_attn).parameters else None


_VARLEN = _varlen_attention()
USE_VARLEN = True  # bench/check_packed_attention.py compares both paths


def _window_mask(length: int, window: int, device) -> torch.Tensor:
    """[L, L] boolean: causal, and each query sees itself and the window - 1 tokens before it (transformers'
    sliding_window_overlay: kv_idx > q_idx - sliding_window)."""
    i = torch.arange(length, device=device)
    dist = i[:, None] - i[None, :]
    return (dist >= 0) & (dist < window)


def packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                sliding_window=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = _PACKED.get()
    if packed is None or query.shape[0] != 1 or packed.bounds[-1] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, sliding_window=sliding_window, **kwargs)
    unsupported = [k for k in ("softcap", "s_aux") if kwargs.get(k) is not None]
    if unsupported:  # attention logit soft-capping (Gemma 2), attention sinks (gpt-oss): not in these kernels
        raise ValueError(f"packed training attention does not support {', '.join(unsupported)} "
                         f"({type(module).__name__}); set per_device_batch_size to a number for padded batches")
    dropout = dropout if module.training else 0.0
    gqa = key.shape[1] != query.shape[1]
    if _VARLEN is not None and USE_VARLEN and query.is_cuda and not dropout:
        # One kernel per layer instead of one SDPA call per sequence (and a concatenation): the step is partly
        # bound by the CPU launching kernels (BENCHMARKS.md).
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, D]
        if gqa:  # query head h uses KV head h // group, as transformers' repeat_kv (the path measured on the H100)
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        cu = packed.cu_seqlens(q.device)
        left = sliding_window - 1 if sliding_window else -1  # flash's window: keys i - left .. i (causal)
        out = _VARLEN(q, k, v, cu, cu, packed.max_len, packed.max_len, scale=scaling, window_size=(left, 0))
        return out.unsqueeze(0), None  # [1, T, H, D] as transformers expects
    # Not cuDNN (PyTorch's first choice on an H100): it builds an execution plan for every new sequence length,
    # measured at ~1.5 s per training step until every length has been seen once.
    bounds = packed.bounds
    outs = []
    with sdpa_kernel(_BACKENDS):
        for a, b in zip(bounds[:-1], bounds[1:]):
            windowed = sliding_window is not None and b - a > sliding_window
            mask = _window_mask(b - a, sliding_window, query.device) if windowed else None
            outs.append(F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                                       attn_mask=mask, is_causal=not windowed, dropout_p=dropout,
                                                       scale=scaling, enable_gqa=gqa))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None  # [1, T, H, D] as transformers expects


def _mask(*args, **kwargs):
    """No [T, T] mask inside a packed micro-batch (the attention above ignores it); SDPA's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if _PACKED.get() is not None:
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
    base = inner_model(model)
    base.set_attn_implementation(name)


_REGISTERED: set[str] = set()


def use_packed_attention(model) -> None:
    use_attention(model, ATTN_NAME, packed_sdpa, _mask)
