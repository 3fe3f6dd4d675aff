#!/usr/bin/env bash
# One call on a GPU machine: environment facts, then named stages in order of what is least
# known (each with its own timeout; every benchmark appends its rows as it goes, so a stage cut
# short keeps what it measured), ending with one table:
#   tests     the kernel tests with compiled (not interpreted) kernels, the sampler, a tiny engine
#   engine    the decode step in a running engine, Llama-3.2-1B and -3-8B shapes at batch 1 and
#             64: ms per step against the bare jitted step and the weight + KV read floor
#   offline   jinfer vs transformers, random Llama-3.2-1B shape, with the device's busy share
#             from a profiler trace
#   sampler   every sampler variant on [64, 128256] logits, host-decided (the accelerators' way)
#   lowering  the control flow left in the GPU step programs
#   async     async scheduling against the synchronous loop
#   attention the decode-attention microbenchmark (GB/s vs a measured copy)
#   step8b    the decode step of a random Llama-3-8B shape, XLA vs Pallas attention
#   moe       a Qwen3-30B-A3B-shaped mixture of experts: grouped products and the decode step
#   cmdbuf    the 1B engine step at batch 64 with XLA's command buffers (CUDA graphs) off, and
#             with custom calls (the Pallas kernels) in them too: which launch path to keep
#
# Usage (repo root):  bash scripts/gpu_check.sh [OUT_DIR]     # on the GPU machine, every stage
#                     STAGES="tests engine offline" bash scripts/gpu_check.sh   # some stages
#                     bash scripts/gpu_check.sh --dry-run      # on CPU: every stage, tiny sizes
# Every stage fits one 10-minute call only in part: a 15-minute lease runs
# STAGES="tests engine offline sampler lowering" first, then the rest.
# The engine tests need SmolLM2's tokenizer, which travels as .gpu/smollm2-tokenizer (an HF dir;
# `make gpu-kit` writes it).
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
want() { [[ -z "${STAGES:-}" || " $STAGES " == *" $1 "* ]]; }
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
  TOK=$JINFER_SMOLLM2_TOKENIZER
  if want tests; then
    if [[ $DRY == 1 ]]; then
      stage "tests (dry run: one interpreted case each)"
      timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_ragged_gpu.py \
        tests/test_decode_gpu.py -k "gqa1" 2>&1 | tail -3
      timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_grouped_matmul_gpu.py \
        -k "one-row and float32" 2>&1 | tail -1
    else
      stage "tests: kernels compiled on the GPU (+ XLA attention, sampler, tiny engine e2e)"
      timeout 180 $PY -m pytest -q -p no:cacheprovider -m "not slow" -rfE tests/test_ragged_gpu.py \
        tests/test_decode_gpu.py tests/test_attention.py tests/test_pallas_backend.py \
        tests/test_sampling.py tests/test_grouped_matmul_gpu.py > "$OUT/pytest.log" 2>&1
      echo "pytest exit $?"; grep -E "passed|failed|error|FAILED|ERROR" "$OUT/pytest.log" | tail -12
    fi
  fi
  if want engine; then
    if [[ $DRY == 1 ]]; then
      stage "engine: the decode step in a running engine (dry run)"
      timeout 300 $PY scripts/bench_step.py --small --attention-backend xla --engine \
        --tokenizer "$TOK" --engine-steps 4 --json "$OUT/step.jsonl" | tail -1
    else
      stage "engine: the decode step in a running engine vs the bare step, 1B and 8B, bf16"
      for shape in llama3-1b llama3-8b; do
        timeout 120 $PY scripts/bench_step.py --shape $shape --batch 1 64 --context 1024 \
          --attention-backend pallas --engine --tokenizer "$TOK" --json "$OUT/step.jsonl"
      done
    fi
  fi
  if want offline; then
    stage "offline: jinfer vs transformers, Llama-3.2-1B shape, random weights, device busy share"
    if [[ $DRY == 1 ]]; then
      timeout 300 $PY scripts/bench_offline.py --random-shape tiny --small --device-trace \
        --tokenizer "$TOK" --json "$OUT/offline.jsonl" 2>&1 | grep -v INFO
    else
      timeout 170 $PY scripts/bench_offline.py --random-shape llama3-1b --device-trace \
        --profile-host 25 --tokenizer "$TOK" --json "$OUT/offline.jsonl" 2>&1 | grep -v INFO
    fi
  fi
  if want sampler; then
    stage "sampler: every variant, host-decided (the accelerators' programs)"
    if [[ $DRY == 1 ]]; then
      timeout 120 $PY scripts/bench_sampler.py --host-decided --rows 4 --vocab 4096 --reps 2
    else
      timeout 90 $PY scripts/bench_sampler.py --host-decided --rows 64 --vocab 128256 --reps 15
    fi
  fi
  if want lowering; then
    stage "lowering: the control flow left in the GPU step programs (lowered, not run)"
    if [[ $DRY == 1 ]]; then
      timeout 120 $PY scripts/lowered_ops.py --shape tiny --platform gpu --max-num-seqs 8 | tail -1
    else
      timeout 60 $PY scripts/lowered_ops.py --shape llama3-1b --platform gpu --max-num-seqs 64 \
        | tail -1
    fi
  fi
  if want async; then
    stage "async: async scheduling vs the synchronous loop"
    if [[ $DRY == 1 ]]; then
      timeout 300 $PY scripts/bench_async.py --shape tiny --tokenizer "$TOK" --output-len 16 \
        --rounds 2 --json "$OUT/async.json"
    else
      timeout 150 $PY scripts/bench_async.py --shape llama3-1b --tokenizer "$TOK" --batch 64 \
        --output-len 128 --rounds 3 --json "$OUT/async.json"
    fi
  fi
  if want attention; then
    stage "attention: decode-attention microbenchmark"
    if [[ $DRY == 1 ]]; then
      timeout 120 $PY scripts/bench_attention.py --small --json "$OUT/attention.jsonl"
    else
      timeout 130 $PY scripts/bench_attention.py --json "$OUT/attention.jsonl"
      timeout 30 $PY scripts/bench_attention.py --batch 64 --context 4096 --head-dim 128 \
        --ragged --xla --json "$OUT/attention.jsonl"
    fi
  fi
  if want step8b; then
    stage "step8b: decode step, Llama-3-8B shape, bf16, random weights: Pallas vs XLA attention"
    if [[ $DRY == 1 ]]; then
      timeout 120 $PY scripts/bench_step.py --small --matmul-only --json "$OUT/step.jsonl"
    else
      timeout 140 $PY scripts/bench_step.py --shape llama3-8b --batch 1 64 --context 4096 \
        --attention-backend pallas xla --matmul-only --json "$OUT/step.jsonl"
    fi
  fi
  if want moe; then
    stage "moe: Qwen3-30B-A3B's experts (Pallas grouped matmul vs ragged_dot), its decode step"
    if [[ $DRY == 1 ]]; then
      timeout 120 $PY scripts/bench_moe.py --experts 8 --top 2 --hidden 128 --expert-width 64 \
        --rows 1 8 --rounds 1 --reps 1 | tail -3
      timeout 120 $PY scripts/bench_step.py --shape moe-tiny --dtype float32 --batch 2 \
        --context 40 --copy-bytes 1048576 --json "$OUT/step.jsonl"
    else
      timeout 90 $PY scripts/bench_moe.py --experts 128 --top 8 --hidden 2048 \
        --expert-width 768 --rows 1 64 512 --rounds 3 | tail -6
      timeout 120 $PY scripts/bench_step.py --shape qwen3-30b-a3b --batch 1 64 --context 4096 \
        --json "$OUT/step.jsonl"
    fi
  fi
  if want cmdbuf; then
    stage "cmdbuf: the 1B engine step with XLA's command buffers off, then with custom calls in"
    if [[ $DRY == 1 ]]; then
      XLA_FLAGS="--xla_gpu_enable_command_buffer=" timeout 300 $PY scripts/bench_step.py --small \
        --attention-backend xla --engine --tokenizer "$TOK" --engine-steps 4 \
        --json "$OUT/step.jsonl" | tail -1
    else
      for flags in "--xla_gpu_enable_command_buffer=" \
        "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"; do
        XLA_FLAGS="$flags" timeout 90 $PY scripts/bench_step.py --shape llama3-1b --batch 64 \
          --context 1024 --attention-backend pallas --engine --tokenizer "$TOK" \
          --json "$OUT/step.jsonl"
      done
    fi
  fi
  stage "results"
  $PY scripts/gpu_table.py "$OUT/attention.jsonl" "$OUT/step.jsonl"
  stage "done"
} 2>&1 | tee "$OUT/gpu_check.log"
