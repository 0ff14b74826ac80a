#!/usr/bin/env bash
# Runs the whole demo DAG (persona arm with DPO, EM training, fast sampling, hf judge, tables, figures) on a GPU
# machine: checks the GPU code paths end to end (not a speed measurement). Needs the project's wheels for what the
# machine lacks (snakemake, trl, datasets, openai, ...) in .whl/ (see BENCHMARKS.md, "GPU path check").
set -euo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
fi
export PYTHONUNBUFFERED=1
cfg=$(mktemp --suffix=.yaml)
python3 - "$cfg" <<'PY'
import sys, yaml
c = yaml.safe_load(open("config/demo.yaml"))
c.update(results_dir="results/gpu", work_dir="results/gpu/.work", cache_dir="results/gpu/cache")
c["grid"]["seeds"] = [0]
c["training"]["per_device_batch_size"] = "auto"  # the GPU plan: packed micro-batches, varlen flash attention
open(sys.argv[1], "w").write(yaml.safe_dump(c, sort_keys=False))
PY
python3 -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print(torch.cuda.get_device_name())"
python3 -m snakemake --profile profiles/local --configfile "$cfg" --cores "$(nproc)"
python3 - <<'PY'
import glob, json
for f in sorted(glob.glob("results/gpu/samples/**/*.jsonl", recursive=True)):
    rows = [json.loads(line) for line in open(f)]
    print(f, len(rows), "active adapters:", sorted({tuple(r["active_adapters"]) for r in rows}))
PY
