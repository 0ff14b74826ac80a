#!/usr/bin/env bash
# The GPU measurements of issue 16, as run on the lent H200 (BENCHMARKS.md "round 2"). Run from the repository root
# with the missing / pinned packages importable (PYTHONPATH), results into $1, parts in $2 (comma-separated):
#   compile  two sampling jobs (new processes, each with empty node-local inductor/Triton caches) sharing one
#            persisted compile cache: cold, then warm
#   judge    local judge, one prompt at a time vs batched; needs the Qwen2.5 tokenizer in $TOKENIZER
#   attn     decode attention kernels alone at the sampling size
#   kernel   sampling 400 x 600 in one process: SDPA decode attention vs the length-aware kernel, interleaved
#            (shapes in $SHAPES, default both)
#   train    EM training: the seed setting, ours (fused pointwise ops), ours without them ($TRAIN_ONLY: a subset)
# SHAPE (compile part): the model shape; PROCS: the processes' names (each a new process, e.g. "cold warm");
# CC_VARIANTS: "base" and/or "precompile" (TORCH_CACHING_PRECOMPILE=1), each with its own persisted cache.
set -u
out=$1
parts=${2:-compile,judge,attn}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1
has() { [[ ",$parts," == *",$1,"* ]]; }
if has compile; then
    for v in ${CC_VARIANTS:-base}; do  # base: as the product runs; precompile: + Dynamo's own cache (experimental)
        rm -rf /tmp/persisted-cc-$v
        pre=0; [[ $v == precompile ]] && pre=1
        for p in ${PROCS:-cold warm}; do
            TORCH_CACHING_PRECOMPILE=$pre TORCHINDUCTOR_CACHE_DIR=/tmp/ind-$v-$p TRITON_CACHE_DIR=/tmp/tri-$v-$p \
                timeout 280 python3 -m bench.compile_cache --shape "${SHAPE:-qwen2.5-7b}" --cache /tmp/persisted-cc-$v \
                --out "$out/cc-$v-$p.json" >"$out/cc-$v-$p.log" 2>&1
            echo "== $v $p"; grep -E "^\[|Error" "$out/cc-$v-$p.log" | cut -c1-400 | tail -6
        done
    done
fi
if has judge; then
    timeout 200 python3 -m bench.judge_hf --tokenizer "$TOKENIZER" --out "$out/judge.json" >"$out/judge.log" 2>&1
    tail -6 "$out/judge.log"
fi
if has attn; then
    timeout 200 python3 -m bench.decode_attention --out "$out/attn.json" >"$out/attn.log" 2>&1
    tail -3 "$out/attn.log"
    python3 -c "
import json; d = json.load(open('$out/attn.json'))
for s in ('llama-3.1-8b', 'qwen2.5-7b'):
    for f, row in d[s].items():
        if f.startswith('filled'):
            print(s, f, {k: v.get('us', v.get('error', '')[:40]) for k, v in row.items()}, 'floor', d[s]['floor_us'])"
fi
if has kernel; then
    for shape in ${SHAPES:-llama-3.1-8b qwen2.5-7b}; do
        timeout ${KERNEL_TIMEOUT:-500} python3 -m bench.run --shape "$shape" --parts sample --sample-variants kernel \
            --out "$out" >"$out/kernel-$shape.log" 2>&1
        grep -E "sample |Error" "$out/kernel-$shape.log" | cut -c1-230
    done
fi
if has train; then
    timeout 420 python3 -m bench.run --shape qwen2.5-7b --parts train --out "$out" ${TRAIN_ONLY:+--train-only "$TRAIN_ONLY"} \
        >"$out/train.log" 2>&1
    tail -12 "$out/train.log"
fi
