"""One decode step's attention of one layer at the sampling benchmark's size (400 sequences, 67-token prompts + 600
new tokens of static cache): the kernels the compiled decode step can use, timed alone, and their bytes.

    python -m bench.decode_attention --out results/decode_attention.json

Also times the length-aware kernel (persona_em/sampling/decode_kernel.py) in several block/warp/stage settings.

The K/V bytes of the whole static cache, read once, over the copy bandwidth are the floor of one call; the profile
of the compiled decode step (BENCHMARKS.md) showed cuDNN's SDPA at ~445 us per layer for Llama-3.1-8B.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"llama-3.1-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128),  # query heads, KV heads, head dim
          "gemma-3-4b": (8, 4, 256)}


def manual(q, k, v, mask, scale):
    """Grouped query rows against the shared K/V: two batched matmuls and a float softmax."""
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, -1).to(v.dtype), v)


def main(argv=None) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=400)
    ap.add_argument("--prompt", type=int, default=67)
    ap.add_argument("--new", type=int, default=600)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="llama-3.1-8b,qwen2.5-7b", help=f"comma-separated, of {', '.join(SHAPES)}")
    a = ap.parse_args(argv)
    dev = "cuda"
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), return_mode="median")
    out["copy_TBps"] = round(2 * x.numel() / ms / 1e9, 2)
    del x, y
    b, length = a.batch, a.prompt + a.new
    for name in a.shapes.split(","):
        h, kvh, d = SHAPES[name]
        torch.manual_seed(0)
        g = h // kvh
        k = torch.randn(b, kvh, length, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(b, kvh, g, d, device=dev, dtype=torch.bfloat16)
        scale = d ** -0.5
        res = {"kv_MB": round(2 * k.numel() * 2 / 1e6, 1)}
        from persona_em.sampling import decode_kernel

        # the kernel's keys per block for this head size when CONFIG says 64 (decode_kernel._block_n): the variants
        # below are named by CONFIG's value
        res["block_n_for_config_64"] = decode_kernel._block_n(max(16, 1 << (d - 1).bit_length()))
        res["floor_us"] = round(res["kv_MB"] / out["copy_TBps"], 1)
        for filled in (a.prompt + a.new // 2, length):  # mid-generation and the last step
            pad = torch.randint(0, 20, (b,), device=dev)
            pos = torch.arange(length, device=dev)
            mask = ((pos[None, :] >= pad[:, None]) & (pos[None, :] < filled))[:, None, None, :]  # [B, 1, 1, L]
            ref = manual(q.float(), k.float(), v.float(), mask, scale)
            row = {}
            variants = {
                "sdpa_default": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale),
                "manual_eager": lambda: manual(q, k, v, mask, scale),
            }
            compiled = torch.compile(manual, dynamic=False)
            variants["manual_compiled"] = lambda: compiled(q, k, v, mask, scale)
            for backend in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
                def run(backend=backend):
                    with sdpa_kernel([getattr(SDPBackend, backend)]):
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
                variants[f"sdpa_{backend.split('_')[0].lower()}"] = run
            # only the filled part of the cache (what a length-aware kernel would read)
            kf, vf, mf = k[:, :, :filled], v[:, :, :filled], mask[..., :filled]
            variants["sdpa_default_filled_only"] = lambda: F.scaled_dot_product_attention(q, kf, vf, attn_mask=mf,
                                                                                          scale=scale)
            # the length-aware kernel (persona_em/sampling/decode_kernel.py): reads only up to each row's end
            from persona_em.sampling import decode_kernel

            mask2 = mask[:, 0, 0, :]
            default = dict(decode_kernel.CONFIG)
            for block, warps, stages in [(64, 4, 3), (32, 4, 3), (128, 4, 3), (64, 8, 3), (64, 4, 2), (64, 4, 4),
                                         (128, 8, 3), (32, 2, 3)]:
                def kern(cfg={"BLOCK_N": block, "num_warps": warps, "num_stages": stages}):
                    decode_kernel.CONFIG.update(cfg)
                    return decode_kernel.gqa_decode(q, k, v, mask2, scale)
                variants[f"kernel_n{block}_w{warps}_s{stages}"] = kern
            for vname, fn in variants.items():
                try:
                    o = fn()
                    err = ((o.float() - ref).norm() / ref.norm()).item()
                    us = do_bench(fn, return_mode="median") * 1000
                    row[vname] = {"us": round(us, 1), "rel_err": float(f"{err:.2e}")}
                except Exception as e:  # noqa: BLE001 - a kernel that does not take this input
                    row[vname] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
            decode_kernel.CONFIG.update(default)
            res[f"filled_{filled}"] = row
        # a small batch takes the split-K path (partial results merged): its error at the last step
        small = slice(0, 8)
        ref_small = manual(q[small].float(), k[small].float(), v[small].float(), mask[small], scale)
        o_small = decode_kernel.gqa_decode(q[small], k[small], v[small], mask[small, 0, 0, :], scale)
        res["kernel_batch8_split_k"] = {
            "splits": decode_kernel._splits(8, kvh, length, decode_kernel.CONFIG["BLOCK_N"], q.device),
            "rel_err": float(f"{((o_small.float() - ref_small).norm() / ref_small.norm()).item():.2e}")}
        out[name] = res
        print(name, json.dumps(res, indent=1), flush=True)
        del k, v, q
        torch.cuda.empty_cache()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
