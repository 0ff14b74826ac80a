#!/usr/bin/env bash
# BENCHMARKS.md "round 10" (issue 16 target 3, its loss criterion): EM training, ours against the seed setting, with
# the GPU's run-to-run noise removed. Round 8 found that neither setting repeats its own losses on the GPU (atomic
# adds in attention's backward), so one comparison against 2e-4 passed or failed by chance. Here every run is in
# PyTorch's deterministic mode (bench/common.py deterministic_mode): each setting must repeat itself bit for bit
# (checked: *_repeats_identical), and ours-vs-seed is then the difference the two settings' arithmetic makes.
# Run from the repository root with the carried wheels importable (PYTHONPATH); results into $1; parts in $2
# (comma-separated, default det):
#   det   one process, Qwen2.5-7B shape, round 2's data, 6 steps per run: ours (auto), ours planned for a 64 GiB GPU
#         and the seed setting (2 x 8 + checkpointing), two rounds of all three. Speeds in this mode are not the
#         product's (deterministic attention backward): round 8 holds those.
#   llama target 2's Llama-3.1-8B shape sampled the way sample_cell now samples (adapters folded), against the
#         same through PEFT's layers, one process (bench/sample.py variant `folded`; round 9 ran it for Qwen only)
#   window the packed training attention's variable-length flash path with a sliding window (Gemma 3's local
#         layers) against the per-sequence path: bench/check_packed_attention.py (seconds)
set -u
out=$1; parts=${2:-det}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True CUBLAS_WORKSPACE_CONFIG=:4096:8
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1
has() { [[ ",$parts," == *",$1,"* ]]; }
if has det; then
    timeout ${TRAIN_TIMEOUT:-420} python3 -m bench.run --shape qwen2.5-7b --parts train --out "$out" \
        --train-deterministic --train-repeats 2 --train-seed-repeats 2 --train-steps 6 \
        --train-only "ours (auto)|ours (auto, planned for a 64 GiB GPU)|seed: 2 x 8 + checkpointing" >"$out/train.log" 2>&1
    echo "exit $?"; grep -E "Error|error" "$out/train.log" | cut -c1-400 | tail -5
    python3 - "$out/qwen2.5-7b.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print("deterministic:", d.get("deterministic"))
t = d["train"]
for k, v in t.items():
    if isinstance(v, dict) and ("losses" in v or "error" in v):
        print(f"{k:45s} {v.get('error') or v['losses']}  peak {v.get('peak_gb')} GB")
for k in ("loss_curve", "loss_curve_64gib"):
    if k in t:
        c = t[k]
        print(k, {x: c[x] for x in ("ours_vs_seed", "ours_vs_ours", "seed_vs_seed", "ours_repeats_identical",
                                    "seed_repeats_identical") if x in c})
PY
fi
if has llama; then
    timeout 400 python3 -m bench.run --shape llama-3.1-8b --parts sample --sample-variants folded --out "$out" \
        >"$out/llama-sample.log" 2>&1
    echo "exit $?"; grep -E "sample |Error" "$out/llama-sample.log" | cut -c1-400
fi
if has window; then
    timeout 200 python3 -m bench.check_packed_attention >"$out/packed-attention.log" 2>&1
    echo "exit $?"; tail -20 "$out/packed-attention.log"
fi
