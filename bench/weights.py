"""Weight analysis of one 7B r32 cell on CPU (issue 14 target: <= 1 min): rule weight_norms' work, timed.

    .venv/bin/python -m bench.weights [--checkpoints 10] [--out results/bench/weights.json]

Builds random LoRA adapters of the Qwen2.5-7B shape (28 layers; hidden 3584, intermediate 18944, 28 query / 4 KV heads
of 128): an EM adapter r32/α64 rsLoRA on all 7 projections (the betley preset) at `--checkpoints` steps (B = 0 at
step 0, as PEFT initialises it) and a persona adapter r64/α128 (the persona arm's default) for a stacked cell, saved
as the training stage saves them (adapter_config.json + adapter_model.safetensors, fp32), then times
persona_em.analysis.weights.write_weight_tables (reading every snapshot, both tables, provenance). Writing the
adapters is not timed; the page cache may hold them (a cluster job reads them from disk: see the read rate printed).
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from persona_em.analysis.weights import write_weight_tables
from persona_em.training.em import step_dir_name
from persona_em.training.trace import projection_shapes

QWEN7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
          "head_dim": 128, "num_hidden_layers": 28}
MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_adapter(out: Path, r: int, alpha: int, b_std: float, gen: torch.Generator) -> int:
    shapes = projection_shapes(QWEN7B)
    tensors = {}
    for layer in range(QWEN7B["num_hidden_layers"]):
        for module, block in MODULES.items():
            d_in, d_out = shapes[module]
            key = f"base_model.model.model.layers.{layer}.{block}.{module}.lora_{{}}.weight"
            tensors[key.format("A")] = torch.randn(r, d_in, generator=gen) / d_in ** 0.5
            tensors[key.format("B")] = (torch.randn(d_out, r, generator=gen) * b_std if b_std
                                        else torch.zeros(d_out, r))
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                         "use_rslora": r == 32, "target_modules": list(MODULES)}))
    return sum(t.numel() for t in tensors.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp)
        steps = [round(i * 338 / (a.checkpoints - 1)) for i in range(a.checkpoints)]  # one insecure epoch: 338 steps
        t0 = time.perf_counter()
        for step in steps:
            params = write_adapter(root / "checkpoints" / step_dir_name(step), 32, 64, 1e-3 * step, gen)
        (root / "checkpoints" / "checkpoints.json").write_text(json.dumps({"steps": steps}))
        write_adapter(root / "persona", 64, 128, 1e-2, gen)
        written = time.perf_counter() - t0
        size_gb = sum(f.stat().st_size for f in root.rglob("*.safetensors")) / 1e9
        outputs = {n: str(root / f"{n}.{ext}") for n in ("weight_norms", "weight_rotation") for ext in ("tsv",)}
        outputs.update({f"{n}_provenance": str(root / f"{n}.provenance.json") for n in ("weight_norms",
                                                                                       "weight_rotation")})
        keys = {"model": "qwen2.5-7b", "persona": "p", "composition": "stacked", "dataset": "insecure", "seed": 0}
        t0 = time.perf_counter()
        write_weight_tables(str(root / "checkpoints"), keys, str(root / "persona"), ".", {}, outputs)
        seconds = time.perf_counter() - t0
    result = {"what": "weight_norms of one cell, Qwen2.5-7B shape, EM r32 x 7 modules x 28 layers + persona r64",
              "checkpoints": a.checkpoints, "em_params_per_checkpoint": params, "adapters_gb": round(size_gb, 2),
              "seconds": round(seconds, 1), "write_seconds_untimed": round(written, 1),
              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "target_seconds": 60, "met": seconds <= 60}
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
