#!/usr/bin/env bash
# One call on a GPU machine (< 10 minutes on one H100/H200): environment facts, the kernel tests
# with compiled (not interpreted) kernels plus a tiny engine end to end, the decode-attention
# microbenchmark (GB/s vs a measured copy), the decode step of a random-weight Llama-3-8B-shaped
# model (XLA vs Pallas attention, ms per step vs the weight-read floor), the decode step of a
# Qwen3-30B-A3B-shaped mixture of experts (vs the weights its tokens' experts read) and its
# experts' grouped products (the Pallas grouped matmul vs ragged_dot), the offline
# benchmark (jinfer vs transformers, random Llama-3.2-1B shape), the control flow left in the
# GPU step programs, and async scheduling against the synchronous loop; ends with one table.
#
# Usage (repo root):  bash scripts/gpu_check.sh [OUT_DIR]     # on the GPU machine
#                     bash scripts/gpu_check.sh --dry-run      # on CPU: every stage, tiny sizes
# The engine tests need SmolLM2's tokenizer, which travels as .gpu/smollm2-tokenizer (an HF dir;
# `make gpu-kit` writes it). Each stage has its own timeout (180 + 130 + 30 + 140 + 90 + 120 +
# 170 + 60 + 150 s) and every benchmark appends its rows as it goes, so a stage cut short keeps
# what it measured.
# Keep the log: copy OUT_DIR/gpu_check.log to docs/gpu_runs/DATE-CARD.log and the table into
# docs/benchmarks.md.
set -uo pipefail
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
rm -f "$OUT"/attention.jsonl "$OUT"/step.jsonl "$OUT"/offline.jsonl
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export JINFER_SMOLLM2_TOKENIZER=${JINFER_SMOLLM2_TOKENIZER:-$PWD/.gpu/smollm2-tokenizer}
PY=${PY:-python3}
SECONDS=0
stage() { echo "== [$(printf '%3d' "$SECONDS") s] $*"; }
{
  stage "date: $(date -u +%FT%TZ)  git: $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
    --format=csv,noheader 2>/dev/null || echo "no nvidia-smi (dry run?)"
  $PY -W always - <<'PYEOF'
import importlib, warnings, jax
print("jax", jax.__version__, "devices", jax.devices())
for mod in ("jax.experimental.pallas.triton", "jax.experimental.pallas.mosaic_gpu"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            importlib.import_module(mod)
            print("import ok  ", mod, *[f"[{w.category.__name__}: {str(w.message)[:100]}]" for w in caught])
        except Exception as e:
            print("import FAIL", mod, type(e).__name__, str(e)[:120])
PYEOF
  if [[ $DRY == 1 ]]; then
    stage "kernel tests (dry run: one interpreted case each)"
    timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_ragged_gpu.py tests/test_decode_gpu.py \
      -k "gqa1" 2>&1 | tail -3
    timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_grouped_matmul_gpu.py \
      -k "one-row and float32" 2>&1 | tail -1
    stage "mixture-of-experts layer: grouped products (dry run)"
    timeout 120 $PY scripts/bench_moe.py --experts 8 --top 2 --hidden 128 --expert-width 64 \
      --rows 1 8 --rounds 1 --reps 1 | tail -3
    stage "attention microbenchmark (dry run)"
    timeout 120 $PY scripts/bench_attention.py --small --json "$OUT/attention.jsonl"
    stage "decode step (dry run)"
    timeout 120 $PY scripts/bench_step.py --small --matmul-only --json "$OUT/step.jsonl"
    stage "decode step, a mixture of experts (dry run)"
    timeout 120 $PY scripts/bench_step.py --shape moe-tiny --dtype float32 --batch 2 --context 40 \
      --copy-bytes 1048576 --json "$OUT/step.jsonl"
    stage "offline: jinfer vs transformers (dry run)"
    timeout 300 $PY scripts/bench_offline.py --random-shape tiny --small \
      --tokenizer "$JINFER_SMOLLM2_TOKENIZER" --json "$OUT/offline.jsonl" 2>&1 | grep -v INFO
    stage "control flow left in the GPU step programs (dry run)"
    timeout 120 $PY scripts/lowered_ops.py --shape tiny --platform gpu --max-num-seqs 8 | tail -1
    stage "async scheduling vs the synchronous loop (dry run)"
    timeout 300 $PY scripts/bench_async.py --shape tiny --tokenizer "$JINFER_SMOLLM2_TOKENIZER" \
      --output-len 16 --rounds 2 --json "$OUT/async.json"
  else
    stage "kernel tests, compiled on the GPU (+ XLA attention, sampler, tiny engine e2e)"
    timeout 180 $PY -m pytest -q -p no:cacheprovider -m "not slow" -rfE tests/test_ragged_gpu.py \
      tests/test_decode_gpu.py tests/test_attention.py tests/test_pallas_backend.py \
      tests/test_sampling.py tests/test_grouped_matmul_gpu.py > "$OUT/pytest.log" 2>&1
    echo "pytest exit $?"; grep -E "passed|failed|error|FAILED|ERROR" "$OUT/pytest.log" | tail -12
    stage "attention microbenchmark: batch 1/8/64 x context 1k/4k/16k x head_dim 64/128/256"
    timeout 130 $PY scripts/bench_attention.py --json "$OUT/attention.jsonl"
    timeout 30 $PY scripts/bench_attention.py --batch 64 --context 4096 --head-dim 128 --ragged \
      --xla --json "$OUT/attention.jsonl"
    stage "decode step, Llama-3-8B shape, bf16, random weights: Pallas vs XLA attention"
    timeout 140 $PY scripts/bench_step.py --shape llama3-8b --batch 1 64 --context 4096 \
      --attention-backend pallas xla --matmul-only --json "$OUT/step.jsonl"
    stage "mixture-of-experts layer, Qwen3-30B-A3B's experts: Pallas grouped matmul vs ragged_dot"
    timeout 90 $PY scripts/bench_moe.py --experts 128 --top 8 --hidden 2048 --expert-width 768 \
      --rows 1 64 512 --rounds 3 | tail -6
    stage "decode step, Qwen3-30B-A3B shape (128 experts, top 8), bf16, random weights"
    timeout 120 $PY scripts/bench_step.py --shape qwen3-30b-a3b --batch 1 64 --context 4096 \
      --json "$OUT/step.jsonl"
    stage "offline: jinfer vs transformers, Llama-3.2-1B shape, random weights, bf16"
    timeout 170 $PY scripts/bench_offline.py --random-shape llama3-1b --profile-host 25 \
      --tokenizer "$JINFER_SMOLLM2_TOKENIZER" --json "$OUT/offline.jsonl" 2>&1 | grep -v INFO
    stage "control flow left in the GPU step programs, Llama-3.2-1B shape (lowered, not run)"
    timeout 60 $PY scripts/lowered_ops.py --shape llama3-1b --platform gpu --max-num-seqs 64 \
      | tail -1
    stage "async scheduling vs the synchronous loop, Llama-3.2-1B shape, batch 64"
    timeout 150 $PY scripts/bench_async.py --shape llama3-1b \
      --tokenizer "$JINFER_SMOLLM2_TOKENIZER" --batch 64 --output-len 128 --rounds 3 \
      --json "$OUT/async.json"
  fi
  stage "results"
  $PY scripts/gpu_table.py "$OUT/attention.jsonl" "$OUT/step.jsonl"
  stage "done"
} 2>&1 | tee "$OUT/gpu_check.log"
