#!/usr/bin/env bash
# BENCHMARKS.md "round 5": one cold sampling job (this tree's code: saves the decode kernel's Triton entries too),
# then two warm jobs sharing its persisted cache: $BASE_TREE's code (PyTorch's blob only) and this tree's.
# Each a new process with empty TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR. Run from this tree's root.
set -u
out=$1; base=$2; here=$PWD
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
job() {  # name tree
    (cd "$2" && TORCHINDUCTOR_CACHE_DIR=/tmp/ind-$1 TRITON_CACHE_DIR=/tmp/tri-$1 timeout 150 python3 -m bench.compile_cache \
        --shape qwen2.5-7b --cache /tmp/pcc --out "$out/cc-$1.json" >"$out/cc-$1.log" 2>&1)
    echo "== $1"; grep -E "^\[|Error" "$out/cc-$1.log" | cut -c1-300 | tail -2
}
job cold "$here"; job warm-base "$base"; job warm-variant "$here"
{ find /tmp/pcc -type f; echo; find /tmp/tri-warm-variant -name '*decode*'; } >"$out/files.txt" 2>&1
