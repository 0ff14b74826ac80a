"""Fused element-wise ops for the packed training path.

- RMSNorm and SiLU(gate) * up: each one compiled kernel forward and one backward instead of PyTorch's chain of
  element-wise kernels (RMSNorm in eager: a cast, a square, a mean, an add, a reciprocal square root, two products
  and a cast back, each a pass over [tokens, hidden] in fp32). The same functions as transformers' Llama/Qwen2
  modules compute, in the same precision; only the number of passes over memory changes. Compiled with dynamic
  shapes: one compilation for every micro-batch size.
- LoRA linears: PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`, i.e. besides the matmuls a product
  and a sum over the [tokens, out_features] output per adapter (and the product's backward): element-wise passes
  over the largest activations of the layer. Here the adapter's update is added by the matmul itself,
  `addmm(base(x), lora_A(dropout(x)), (scaling * B)^T)`: cuBLAS reads the base output in its epilogue (beta = 1)
  and the scaling is applied to the small [out, r] matrix. The same sum; in bf16 the product is rounded once
  less. Only plain LoRA on unmerged layers is switched (no DoRA or other variant, no LoRA bias); anything else
  keeps PEFT's forward, and so does every call PEFT handles specially (adapters disabled, merged, mixed batches).
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


def _lora_forward(module, x, *args, **kwargs):
    if args or kwargs or module.disable_adapters or module.merged or module.lora_variant:
        return type(module).forward(module, x, *args, **kwargs)
    result = module.base_layer(x)
    out = result.reshape(-1, result.shape[-1])
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        lora_a = module.lora_A[name]
        a = lora_a(module.lora_dropout[name](module._cast_input_dtype(x, lora_a.weight.dtype)))
        scaled_b = module.lora_B[name].weight * module.scaling[name]
        out = torch.addmm(out, a.reshape(-1, a.shape[-1]).to(out.dtype), scaled_b.t().to(out.dtype))
    return out.view(result.shape)


def _plain_lora_linear(module) -> bool:
    from peft.tuners.lora.layer import Linear

    return (type(module) is Linear and isinstance(module.base_layer, torch.nn.Linear) and not module.lora_variant
            and all(b.bias is None for b in module.lora_B.values()))


def use_fused_pointwise(model, pointwise: bool = True, lora: bool = True) -> int:
    """Switch, with `pointwise`, the RMSNorm and SiLU-gated MLP modules of a (PEFT-wrapped) Llama/Qwen2-style model
    to the fused ops and, with `lora`, its plain LoRA linears to the addmm form; returns how many modules were
    switched. Modules of other forms are left as they are."""
    n = 0
    for module in model.modules():
        if lora and not getattr(module, "_fused", False) and _plain_lora_linear(module):
            module.forward = functools.partial(_lora_forward, module)
            module._fused = True
            n += 1
            continue
        if not pointwise:
            continue
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
