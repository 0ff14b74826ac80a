set -u
out=$1
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TORCHINDUCTOR_DETERMINISTIC=1
python3 -c "import torch._inductor.config as c; print('inductor deterministic flag:', c.deterministic)"
job() {  # name
    TORCHINDUCTOR_CACHE_DIR=/tmp/ind-$1 TRITON_CACHE_DIR=/tmp/tri-$1 timeout 140 \
        python3 -m bench.compile_cache --shape qwen2.5-7b --cache /tmp/pcc --out "$out/cc-$1.json" >"$out/cc-$1.log" 2>&1
    echo "== $1"; grep -E "steady state|first call [0-9]|Error" "$out/cc-$1.log" | cut -c1-250 | tail -2
}
job det-cold; job det-warmA; job det-warmB
