"""Compile tax per sampling job with and without the persisted compile cache (persona_em/sampling/compile_cache.py).

One process = one sampling job: build the model, load an EM checkpoint into the adapter slot, fold it into the base
weights as sample_cell does (`--adapters peft`: sample through PEFT's LoRA layers, as rounds 4-8 did), load the
compile cache of this model from --cache, time the first 400 x 600 `generate_batch` (compiles), save the cache,
then time a second call (steady state). Run it twice with the same --cache and each process with its own empty
TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR, like two jobs on two nodes:

    for p in cold warm; do TORCHINDUCTOR_CACHE_DIR=/tmp/ind-$p TRITON_CACHE_DIR=/tmp/tri-$p \\
        python -m bench.compile_cache --shape qwen2.5-7b --cache /tmp/cc --out results/cc-$p.json; done
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench import common


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(Path(__file__).with_name("config.yaml")))
    ap.add_argument("--shape", default="qwen2.5-7b")
    ap.add_argument("--cache", required=True, help="the persisted compile cache folder (cache_dir/torch_compile)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--adapters", choices=("folded", "peft"), default="folded",
                    help="folded: as sample_cell samples (compose.FoldedAdapters); peft: through PEFT's LoRA layers "
                         "(rounds 4-8)")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    cfg = yaml.safe_load(Path(a.config).read_text())
    shape = cfg["quick"]["shape"] if a.quick else dict(cfg["shapes"][a.shape])
    scfg = {**cfg["sampling"], **(cfg["quick"]["sampling"] if a.quick else {})}
    if a.layers:
        shape["num_hidden_layers"] = a.layers

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    from persona_em import compose
    from persona_em.chat import ChatFormat
    from persona_em.sampling.compile_cache import CompileCache, compile_key
    from persona_em.sampling.sample import fold_copy_device, generate_batch
    from bench.sample import _checkpoints

    tok = common.tokenizer()
    model = common.build_model(shape, tok)
    dirs, model = _checkpoints(model, 1, Path(tempfile.mkdtemp(prefix="bench_cc_")))
    model = compose.use_em_adapter(model, dirs[0], compose.EM, "none", "none")
    convs, settings = common.sampling_workload(scfg)
    t0 = time.perf_counter()
    longest = max(len(ChatFormat(tok).prompt_ids(c)) for c in convs) + settings["max_new_tokens"]
    keep = fold_copy_device(model, len(convs), longest)  # as sample_cell chooses
    folded = (compose.FoldedAdapters(keep).applied(model) if a.adapters == "folded"
              else contextlib.nullcontext(model))
    stack = contextlib.ExitStack()
    model = stack.enter_context(folded)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    fold_seconds = round(time.perf_counter() - t0, 2)
    out = {"adapters": a.adapters, "fold_seconds": fold_seconds, "fold_copy_on": keep, "shape": a.shape,
           "caching_precompile": torch._dynamo.config.caching_precompile, "gpu": common.gpu_name(),
           "torch": torch.__version__,
           "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"), "key": compile_key(model),
           "responses": len(convs), "max_new_tokens": settings["max_new_tokens"]}
    cache = CompileCache.for_model(a.cache, model)
    t0 = time.perf_counter()
    out["blobs_loaded"] = cache.load()
    out["load_seconds"] = round(time.perf_counter() - t0, 2)
    out["setup_seconds"] = round(time.perf_counter() - t_start, 1)
    log(f"setup {out['setup_seconds']} s, {out['blobs_loaded']} blob(s) loaded in {out['load_seconds']} s")

    from torch._dynamo.utils import compile_times, counters

    for name in ("first call", "steady state"):
        r = {}
        with common.measured(r):
            rows = generate_batch(model, ChatFormat(tok), convs, settings, seed=0, fast=True)
        r["new_tokens"] = sum(x["n_new_tokens"] for x in rows)
        # the sampled text: equal across processes and variants when the compiled code computes the same thing
        r["responses_sha256"] = hashlib.sha256(json.dumps([x["response"] for x in rows]).encode()).hexdigest()[:16]
        if name == "first call":
            t0 = time.perf_counter()
            saved = cache.save()
            r["save_seconds"] = round(time.perf_counter() - t0, 2)
            r["saved"] = saved.name if saved else None
            r["saved_mb"] = round(saved.stat().st_size / 1e6, 1) if saved else None
            r["counters"] = {k: dict(counters[k]) for k in ("inductor", "aot_autograd", "stats", "dynamo_cache") if k in counters}
            r["compile_times"] = compile_times(repr="str", aggregate=True)
        out[name] = r
        log(f"{name}: {json.dumps({k: v for k, v in r.items() if k != 'compile_times'})}")
    stack.close()
    out["first_minus_steady"] = round(out["first call"]["seconds"] - out["steady state"]["seconds"], 1)
    print(out["first call"]["compile_times"])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    log(f"first call {out['first call']['seconds']} s, steady {out['steady state']['seconds']} s, "
        f"difference {out['first_minus_steady']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
