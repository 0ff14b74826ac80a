#!/usr/bin/env bash
# BENCHMARKS.md "round 6" (issue 16 targets 3 and 1). Run from the repository root with the carried wheels importable
# (PYTHONPATH); results into $1; parts in $2 (comma-separated, default train,compile):
#   train    EM training on the Qwen2.5-7B shape, one process: the seed setting once (the loss baseline), then ours
#            (the default) for 3 rounds of 32 steps each over the same 256-example data (2 epochs: a timing window
#            twice round 2's)
#   compile  sampling jobs sharing one persisted compile cache, each a new process with empty node-local
#            TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR: one cold, two warm, one warm with
#            TORCHINDUCTOR_COMPILE_THREADS=1
# TRAIN_REPEATS=N: N rounds of ours instead of 3; TRAIN_SEED_REPEATS=M: the seed setting in the first M of them
# (default 1; round 8: its own run-to-run loss spread).
# Call 1 of round 6 ran an earlier version of this script (a fused-LoRA variant against the default, 512 examples).
set -u
out=$1; parts=${2:-train,compile}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1
has() { [[ ",$parts," == *",$1,"* ]]; }
if has train; then
    timeout ${TRAIN_TIMEOUT:-240} python3 -m bench.run --shape qwen2.5-7b --parts train --out "$out" --train-repeats ${TRAIN_REPEATS:-3} \
        --train-seed-repeats ${TRAIN_SEED_REPEATS:-1} --train-steps 32 --train-only "seed: 2 x 8 + checkpointing|ours (auto)" >"$out/train.log" 2>&1
    python3 - "$out/qwen2.5-7b.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))["train"]
for k, v in d.items():
    if isinstance(v, dict) and "tokens_per_s" in v:
        toks = v["step_tokens"][2:]
        print(f"{k:40s} {v['tokens_per_s']:>9} tok/s  {sum(toks) / len(toks):.0f} tok/step  peak {v.get('peak_gb')} GB")
if "loss_curve" in d:
    c = d["loss_curve"]
    print("loss_curve max_rel_diff", c["max_rel_diff"], {k: c[k] for k in ("ours_vs_seed", "ours_vs_ours", "seed_vs_seed") if k in c})
PY
fi
if has compile; then
    job() {  # name [env...]
        local name=$1; shift
        env "$@" TORCHINDUCTOR_CACHE_DIR=/tmp/ind-$name TRITON_CACHE_DIR=/tmp/tri-$name timeout 150 \
            python3 -m bench.compile_cache --shape qwen2.5-7b --cache /tmp/pcc --out "$out/cc-$name.json" \
            >"$out/cc-$name.log" 2>&1
        echo "== $name"; grep -E "^\[|Error" "$out/cc-$name.log" | cut -c1-300 | tail -2
    }
    job cold; job warm1; job warm2; job warm3-threads1 TORCHINDUCTOR_COMPILE_THREADS=1
fi
