#!/usr/bin/env bash
# BENCHMARKS.md "round 7" (issue 16 target 2): the cost of Inductor's deterministic mode, side by side in one process
# (bench/sample.py variant `detmode`: autotuned, deterministic, autotuned, deterministic; each a compilation and two
# steady 400 x 600 calls). Run from the repository root with the carried wheels importable (PYTHONPATH):
#   bash bench/issue16_round7.sh OUT SHAPE        (SHAPE: qwen2.5-7b or llama-3.1-8b, bench/config.yaml)
# BENCH_DETMODE_ROUNDS=1: A B only; PROFILE_SHAPE=qwen2.5-7b: then a profile of that shape's steady decode step.
# VARIANT=defer (SHAPE may be a comma-separated list): the per-step stop check vs the deferred one, in turn, on one
# compiled decode step (bench/sample.py variant `defer`).
set -u
out=$1; shape=${2:-qwen2.5-7b}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1
python3 -c "import torch, triton, transformers, peft; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__)" >>"$out/gpu.txt" 2>&1
variant=${VARIANT:-detmode}
for s in ${shape//,/ }; do
    timeout ${DET_TIMEOUT:-570} python3 -m bench.run --shape "$s" --parts sample --sample-variants $variant \
        --out "$out" >"$out/$variant-$s.log" 2>&1
    grep -E "sample |Error" "$out/$variant-$s.log" | cut -c1-260
done
if [ -n "${PROFILE_SHAPE:-}" ]; then  # then where a steady decode step's time goes (bench/profile_sample.py)
    timeout ${PROFILE_TIMEOUT:-240} python3 -m bench.profile_sample --shape "$PROFILE_SHAPE" \
        >"$out/profile_sample-$PROFILE_SHAPE.txt" 2>&1
    grep -E "^generate|^decode step" "$out/profile_sample-$PROFILE_SHAPE.txt"
fi
