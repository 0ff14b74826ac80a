"""GPU check: the variable-length flash path of persona_em.training.packed_attention equals the one-call-per-sequence path
(outputs and gradients, GQA included, and a sliding window as in Gemma 3's local layers: the per-sequence path's
window mask is checked against transformers on CPU in tests/test_batching.py), and what each costs per layer call
(forward + backward).

    python -m bench.check_packed_attention
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from persona_em.training import packed_attention as pa


def _run(q, k, v, bounds, use_varlen, window=None):
    pa.USE_VARLEN = use_varlen
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with pa.packed_sequences(bounds):
        out, _ = pa.packed_sdpa(SimpleNamespace(training=True), q, k, v, None, scaling=q.shape[-1] ** -0.5,
                                 sliding_window=window)
    (out.float() * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def main():
    print(torch.__version__, "varlen_attn available:", pa._VARLEN is not None)
    torch.manual_seed(0)
    lengths = [300, 120, 511, 77, 290, 640, 33, 400, 260, 180, 350, 222, 301, 95, 480, 250]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    # Qwen2.5-7B, Llama-3.1-8B, and Gemma 3 4B's local layers (head_dim 256) with a window shorter than some sequences
    for heads, kv, dim, window in ((28, 4, 128, None), (32, 8, 128, None), (8, 4, 256, 256)):
        T = bounds[-1]
        q = torch.randn(1, heads, T, dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, kv, T, dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, kv, T, dim, device="cuda", dtype=torch.bfloat16)
        ref, got = _run(q, k, v, bounds, False, window), _run(q, k, v, bounds, True, window)
        for name, a, b in zip(("out", "dq", "dk", "dv"), ref, got):
            err = (a.float() - b.float()).abs().max().item()
            print(f"heads {heads}/{kv} window {window} {name}: shape {tuple(b.shape)} max abs diff {err:.2e} "
                  f"(scale {a.float().abs().max().item():.2e})")
            assert a.shape == b.shape and err <= 2e-2 * max(1.0, a.float().abs().max().item()), name
        if window:  # the window matters at these lengths: without it the output differs
            unwindowed = _run(q, k, v, bounds, True)[0]
            assert (unwindowed.float() - got[0].float()).abs().max().item() > 1e-1, "window had no effect"
        for use in (False, True):
            for _ in range(3):
                _run(q, k, v, bounds, use, window)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                _run(q, k, v, bounds, use, window)
            torch.cuda.synchronize()
            print(f"heads {heads}/{kv} window {window} {'varlen' if use else 'per-sequence'}: "
                  f"{(time.perf_counter() - t0) / 20 * 1e3:.2f} ms per forward+backward ({T} tokens, {len(lengths)} sequences)")
    print("OK")


if __name__ == "__main__":
    main()
