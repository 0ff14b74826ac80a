"""LoRA projections without PEFT's full-width elementwise passes (training speed; same function, same gradients).

PEFT computes a LoRA projection as `result + lora_B(lora_A(x)) * scaling`: the scaling multiplies, and the sum
adds, tensors as wide as the projection's output ([tokens, 18944] for a 7B MLP), and autograd repeats the
multiplication backward. Three memory-bound passes per projection, 196 projections per 7B forward: ~25% of the GPU
time of an EM training step (bench/profile_train.py). Here the scaling is applied to the rank-r intermediate
([tokens, 32]) and the sum is the epilogue of the LoRA-B matmul (`addmm` with beta = 1), so neither pass exists.
"""
from __future__ import annotations

import types

import torch


def _forward(self, x, *args, **kwargs):
    # Anything but plain LoRA on a plain call (DoRA and other variants, per-row adapter names, merged or disabled
    # adapters, extra arguments) takes PEFT's own forward.
    if args or kwargs or self.disable_adapters or self.merged or self.lora_variant or any(
            b.bias is not None for b in self.lora_B.values()):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    out = result.reshape(-1, result.shape[-1])
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        h = lora_a(self.lora_dropout[name](x)).reshape(-1, lora_a.out_features) * self.scaling[name]
        out = torch.addmm(out, h.to(out.dtype), lora_b.weight.t().to(out.dtype))
    return out.view(result.shape)


def use_fused_lora(model) -> int:
    """Give every LoRA `Linear` of `model` the fused forward; returns how many layers were switched."""
    from peft.tuners.lora.layer import Linear

    n = 0
    for module in model.modules():
        if type(module) is Linear:  # subclasses (quantized layers) keep their own forward
            module.forward = types.MethodType(_forward, module)
            n += 1
    return n
