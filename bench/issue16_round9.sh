#!/usr/bin/env bash
# BENCHMARKS.md "round 9" (issue 16 target 1): sampling with the adapters folded into the base weights
# (compose.FoldedAdapters) against sampling through PEFT's LoRA layers. Run from the repository root with the
# carried wheels importable (PYTHONPATH); results into $1; parts in $2 (comma-separated, default compile):
#   compile   sampling jobs, each a new process with empty node-local TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR,
#             sharing one persisted compile cache: a cold job of each kind, then two warm jobs of each kind, the
#             kinds in turn (peft, folded, peft, folded, ...) so that a drift of the host shows in both
#   sample    one process: both kinds' first calls and steady calls in turn, the next checkpoint folded in place
#             (bench/sample.py variant `folded`)
#   accuracy  bf16 logits of both kinds against an fp32 reference (bench/fold_accuracy.py)
#   copy      where the pristine copy of the base weights can live, and its cost (bench/fold_copy.py)
set -u
out=$1; parts=${2:-compile}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1
has() { [[ ",$parts," == *",$1,"* ]]; }
if has compile; then
    job() {  # kind name
        local kind=$1 name=$1-$2
        TORCHINDUCTOR_CACHE_DIR=/tmp/ind-$name TRITON_CACHE_DIR=/tmp/tri-$name timeout 150 \
            python3 -m bench.compile_cache --shape qwen2.5-7b --adapters "$kind" --cache /tmp/pcc \
            --out "$out/cc-$name.json" >"$out/cc-$name.log" 2>&1
        echo "== $name"; grep -E "^\[|Error" "$out/cc-$name.log" | cut -c1-300 | tail -2
    }
    job peft cold; job folded cold; job peft warm1; job folded warm1; job peft warm2; job folded warm2
    python3 - "$out" <<'PY'
import json, re, sys
from pathlib import Path
for p in sorted(Path(sys.argv[1]).glob("cc-*.json"), key=lambda p: p.stat().st_mtime):
    d = json.loads(p.read_text())
    ct = d["first call"].get("compile_times", "")
    get = lambda k: (re.search(rf"^{k}\s+([\d.]+)", ct, re.M) or [None, None])[1]
    print(f"{p.stem:18s} fold {d.get('fold_seconds')} s  first {d['first call']['seconds']} s  steady "
          f"{d['steady state']['seconds']} s  first-steady {d['first_minus_steady']} s  compile_inner "
          f"{get('_compile.compile_inner')}  tracing {get('bytecode_tracing')}  guards {get('build_guards')}  "
          f"tokens {d['steady state']['new_tokens']} {d['steady state']['responses_sha256']}")
PY
fi
if has sample; then
    timeout 400 python3 -m bench.run --shape qwen2.5-7b --parts sample --sample-variants folded --out "$out" \
        >"$out/sample.log" 2>&1
    grep -E "sample " "$out/sample.log" | cut -c1-400
fi
if has accuracy; then
    timeout 300 python3 -m bench.fold_accuracy --shape qwen2.5-7b --out "$out/fold_accuracy.json" \
        >"$out/accuracy.log" 2>&1
    grep -E "b_std|Error" "$out/accuracy.log"
fi
if has copy; then
    timeout 200 python3 -m bench.fold_copy --shape qwen2.5-7b --out "$out/fold_copy.json" >"$out/copy.log" 2>&1
    grep -vi warn "$out/copy.log" | tail -6
fi
