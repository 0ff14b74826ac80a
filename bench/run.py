"""Run the GPU benchmarks for one model shape and print one table.

    python -m bench.run --shape qwen2.5-7b --parts train,sample,dpo --out results/bench
    python -m bench.run --quick          # the harness itself on a CPU (tiny shape; numbers mean nothing)

Writes <out>/<shape>.json (every number) and prints the table (bench/table.py renders several shapes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import yaml

from bench import common


def main(argv=None) -> int:
    # as train_em does: micro-batches of varying size fragment the caching allocator otherwise
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(Path(__file__).with_name("config.yaml")))
    ap.add_argument("--shape", help="a shape of config.yaml (default qwen2.5-7b; with --quick, the quick shape)")
    ap.add_argument("--parts", default="train,sample,dpo")
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--sample-variants", default="one,plain,ours,fp32lora")
    ap.add_argument("--train-only", help="run only the training settings whose name starts with this, e.g. 'ours'"
                                         " ('|' between several prefixes)")
    ap.add_argument("--train-repeats", type=int, default=1, help="run the selected training settings in turn, this"
                                                                 " many rounds (one process)")
    ap.add_argument("--train-seed-repeats", type=int, default=1, help="of those rounds, how many also run the slow"
                                                                      " seed setting (its run-to-run loss spread)")
    ap.add_argument("--train-steps", type=int, help="override train.steps_ours (more than one epoch of the data"
                                                    " repeats it: a longer timing window on the same workload)")
    ap.add_argument("--train-deterministic", action="store_true",
                    help="bitwise-repeatable training (common.deterministic_mode): the loss comparison without the"
                         " GPU's run-to-run noise; its speed is not the product's")
    ap.add_argument("--layers", type=int, help="override the shape's layer count (a cheaper smoke run)")
    ap.add_argument("--quick", action="store_true", help="tiny shape and sizes: checks the harness on a CPU")
    a = ap.parse_args(argv)
    cfg = yaml.safe_load(Path(a.config).read_text())
    if a.quick and a.shape is None:
        shape, name = cfg["quick"]["shape"], "quick"
    else:
        a.shape = a.shape or "qwen2.5-7b"
        shape, name = cfg["shapes"].get(a.shape), a.shape + ("-quick" if a.quick else "")
    if shape is None:
        raise SystemExit(f"unknown shape {a.shape!r}; known: {', '.join(cfg['shapes'])}")
    if a.layers:
        shape = {**shape, "num_hidden_layers": a.layers}
        name += f"-{a.layers}layers"
    if a.quick:
        for part in ("train", "sampling", "dpo"):
            cfg[part].update(cfg["quick"][part])
    cfg["sampling"]["variants"] = a.sample_variants
    cfg["train"]["only"] = a.train_only
    cfg["train"]["repeats"] = a.train_repeats
    cfg["train"]["seed_repeats"] = a.train_seed_repeats
    if a.train_steps:
        cfg["train"]["steps_ours"] = a.train_steps
    if a.train_deterministic:
        common.deterministic_mode()
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    import peft
    import transformers
    import trl

    result = {"shape": name, "dims": shape, "gpu": common.gpu_name(),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "peft": peft.__version__, "trl": trl.__version__},
              "deterministic": torch.are_deterministic_algorithms_enabled()}
    log(json.dumps(result))
    tok = common.tokenizer()
    t0 = time.perf_counter()
    model = common.build_model(shape, tok)
    result["build_seconds"] = round(time.perf_counter() - t0, 1)
    result["n_params"] = sum(p.numel() for p in model.parameters())
    log(f"built {name}: {result['n_params'] / 1e9:.2f} B parameters in {result['build_seconds']} s")
    path = out_dir / f"{name}.json"
    for part in a.parts.split(","):
        mod = __import__(f"bench.{part}", fromlist=["run"])
        section = {"train": "train", "sample": "sampling", "dpo": "dpo"}[part]
        result[part], model = mod.run(model, tok, cfg[section], log)
        path.write_text(json.dumps(result, indent=1))  # after every part: a later failure keeps the earlier ones
    from bench.table import render

    print(render([result]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
