"""Where compose.FoldedAdapters can keep the base weights' pristine copy, and what taking and restoring it costs.

The LoRA-wrapped base weights of a random-weight model of a real shape (bf16, on the GPU), copied once ("take":
allocation + copy, a job's first checkpoint) and written back ("restore", every later checkpoint), twice each, for:

  pinned_per_tensor   one pinned CPU tensor per weight (PyTorch's pinned allocator rounds each up to a power of 2)
  pinned_flat         one pinned CPU buffer for all, a view per weight
  pageable_flat       one ordinary CPU buffer
  gpu_flat            one GPU buffer (no host transfer; costs GPU memory)

    python3 -m bench.fold_copy --shape qwen2.5-7b --out bench/results/fold_copy.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

from bench import common


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _take(weights, where: str):
    pin = where.startswith("pinned") and torch.cuda.is_available()  # (--quick on a CPU: no pinned memory)
    if where == "pinned_per_tensor":
        return [torch.empty(w.shape, dtype=w.dtype, device="cpu", pin_memory=pin).copy_(w) for w in weights]
    total = sum(w.numel() for w in weights)
    device = weights[0].device if where == "gpu_flat" else "cpu"
    flat = torch.empty(total, dtype=weights[0].dtype, device=device, pin_memory=pin and where == "pinned_flat")
    views, at = [], 0
    for w in weights:
        views.append(flat[at:at + w.numel()].view(w.shape).copy_(w, non_blocking=True))
        at += w.numel()
    return views


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(Path(__file__).with_name("config.yaml")))
    ap.add_argument("--shape", default="qwen2.5-7b")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    cfg = yaml.safe_load(Path(a.config).read_text())
    shape = cfg["quick"]["shape"] if a.quick else dict(cfg["shapes"][a.shape])
    from persona_em.training.settings import ALL_PROJECTIONS

    model = common.build_model(shape, common.tokenizer())
    weights = [m.weight for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in ALL_PROJECTIONS]
    out = {"shape": a.shape, "gpu": common.gpu_name(), "torch": torch.__version__, "tensors": len(weights),
           "gb": round(sum(w.numel() * w.element_size() for w in weights) / 1e9, 2)}
    print(json.dumps(out), flush=True)
    for where in ("pinned_per_tensor", "pinned_flat", "pageable_flat", "gpu_flat"):
        r = {}
        for k in (1, 2):
            _sync()
            t0 = time.perf_counter()
            copies = _take(weights, where)
            _sync()
            r[f"take_{k}_s"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            with torch.no_grad():
                for w, c in zip(weights, copies):
                    w.copy_(c, non_blocking=True)
            _sync()
            r[f"restore_{k}_s"] = round(time.perf_counter() - t0, 3)
            del copies
            common.free_memory()
        out[where] = r
        print(where, json.dumps(r), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
