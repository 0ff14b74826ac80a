"""Fused element-wise ops for the packed training path: RMSNorm and SiLU(gate) * up, each one compiled kernel
forward and one backward instead of PyTorch's chain of element-wise kernels (RMSNorm in eager: a cast, a square,
a mean, an add, a reciprocal square root, two products and a cast back, each a pass over [tokens, hidden] in fp32).
The same functions as transformers' Llama/Qwen2 modules compute, in the same precision; only the number of passes
over memory changes. Compiled with dynamic shapes: one compilation for every micro-batch size.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _rms_norm(x, weight, eps: float):
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _silu_mul(gate, up):
    return F.silu(gate) * up


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def _norm_forward(module, hidden_states):
    return _compiled(_rms_norm)(hidden_states, module.weight, module.variance_epsilon)


def _mlp_forward(module, x):
    return module.down_proj(_compiled(_silu_mul)(module.gate_proj(x), module.up_proj(x)))


def use_fused_pointwise(model) -> int:
    """Switch the RMSNorm and SiLU-gated MLP modules of a (PEFT-wrapped) Llama/Qwen2-style model to the fused ops;
    returns how many modules were switched. Modules of other forms are left as they are."""
    n = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and type(module).forward.__module__ \
                .startswith("transformers.models.") and not getattr(module, "_fused", False):
            module.forward = functools.partial(_norm_forward, module)
            module._fused = True
            n += 1
        elif name.endswith("MLP") and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")) \
                and getattr(getattr(module, "config", None), "hidden_act", None) == "silu" \
                and not getattr(module, "_fused", False):
            module.forward = functools.partial(_mlp_forward, module)
            module._fused = True
            n += 1
    return n


def undo_fused_pointwise(model) -> None:
    for module in model.modules():
        if getattr(module, "_fused", False):
            del module.forward
            del module._fused
