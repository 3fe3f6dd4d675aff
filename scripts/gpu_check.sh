#!/usr/bin/env bash
# One call on a GPU machine: environment facts, the device-independent kernel/sampler tests on
# the GPU, and decode-step benchmarks on random weights against the weight-read floor.
# Usage (repo root, on the GPU machine): bash scripts/gpu_check.sh [OUT_DIR]
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
{
  echo "== date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY - <<'PYEOF'
import importlib, jax
print("jax", jax.__version__, "devices", jax.devices())
for mod in ("jax.experimental.pallas.triton", "jax.experimental.pallas.mosaic_gpu",
            "jax.experimental.pallas.ops.gpu.paged_attention",
            "jax.experimental.pallas.ops.gpu.decode_attention"):
    try:
        importlib.import_module(mod)
        print("import ok  ", mod)
    except Exception as e:
        print("import FAIL", mod, type(e).__name__, str(e)[:120])
PYEOF
  echo "== tests on the GPU (XLA attention, sampler)"
  timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_sampling.py 2>&1 | tail -5
  echo "== decode step vs weight-read floor (random weights, bf16)"
  timeout 200 $PY scripts/bench_step.py --shape llama3-1b --batch 1 8 64 --context 1024 4096
  timeout 200 $PY scripts/bench_step.py --shape llama3-8b --batch 1 64 --context 1024 4096
} 2>&1 | tee "$OUT/gpu_check.log"
