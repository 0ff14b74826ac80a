#!/usr/bin/env bash
# BENCHMARKS.md "round 6" (issue 16 target 3): EM training on the Qwen2.5-7B shape, one process: the seed setting
# once (the loss baseline), then ours (fused RMSNorm, SiLU * up and LoRA addmm: the default) and ours without the
# fused LoRA, in turn for 3 rounds of 32 steps each; then a profile of the default's steps 4-6.
# Run from the repository root with the carried wheels importable (PYTHONPATH). Results into $1.
set -u
out=$1
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1
timeout ${TRAIN_TIMEOUT:-330} python3 -m bench.run --shape qwen2.5-7b --parts train --out "$out" --train-repeats 3 \
    --train-examples 512 --train-only "seed: 2 x 8 + checkpointing|ours (auto)|ours (auto) without fused LoRA" \
    >"$out/train.log" 2>&1
grep -E "train (ours|seed)" "$out/train.log" | sed -E 's/"step_seconds": \[[^]]*\], //' | cut -c1-330
python3 - "$out/qwen2.5-7b.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))["train"]
for k, v in d.items():
    if isinstance(v, dict) and "tokens_per_s" in v:
        print(f"{k:45s} {v['tokens_per_s']:>9} tok/s  peak {v.get('peak_gb')} GB")
for k in ("loss_curve", "loss_curve_no_fused_lora"):
    if k in d:
        print(k, "max_rel_diff", d[k]["max_rel_diff"])
PY
timeout ${PROFILE_TIMEOUT:-150} python3 -m bench.profile_train --shape qwen2.5-7b >"$out/profile_train.txt" 2>&1
grep -E "optimizer step|^BatchPlan" "$out/profile_train.txt"
