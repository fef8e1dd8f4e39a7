#!/usr/bin/env bash
# The one-command GPU check (`make gpu-check`): from the repo root on a machine with a CUDA GPU
# (H100/H200 targets), within a global deadline (GPU_CHECK_DEADLINE_S, default 450 s):
#   1. install: a CUDA torch only if none is importable, then fastlora itself
#      (pip install --no-build-isolation -e ".[test]"; falls back to --no-deps offline)
#   2. every GPU test: FASTLORA_TEST_GPU=1 on tests/test_*triton*.py and
#      tests/test_lowrank.py::test_family_on_device, sharded over parallel pytest processes
#   3. micro-benchmarks: top-k 1% of 64M vs torch.topk and a device copy, sparse_aggregate vs
#      index_add_ and a device copy, LoRA fwd+bwd vs the cuBLAS base layer and eager PEFT
#      (bf16, fp32), kernel names, host-sync counts, torch.compile
#   4. fastlora bench --device cuda (float32 and bfloat16, small budget)
#   5. probes of known hazards, each in its own process (a CUDA fault cannot poison the rest)
#   6. one SUMMARY block, also written to $GPU_CHECK_OUT/summary.txt
# Every step has a timeout and the check goes on after a failure. Outputs: $GPU_CHECK_OUT
# (default build/gpu-check). GPU_CHECK_DRY=1 checks the script's logic on a CPU machine (no
# install, tiny sizes, interpreter tests filtered by GPU_CHECK_PYTEST_K); CI runs it that way.
set -o pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
T0=$(date +%s)
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-450}
OUT=${GPU_CHECK_OUT:-$PWD/build/gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
# absolute, since some steps run from $OUT (a relative venv path would not resolve there)
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")";; esac
DRY=${GPU_CHECK_DRY:-0}
NSHARDS=${GPU_CHECK_SHARDS:-8}
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}
export GPU_CHECK_OUT="$OUT" GPU_CHECK_DRY="$DRY"
STEPS="$OUT/steps.tsv"
: > "$STEPS"

remaining() { echo $(( DEADLINE_S - ($(date +%s) - T0) )); }
# step NAME CAP_SECONDS CMD...: runs CMD with timeout min(CAP, remaining-10), logs to $OUT/NAME.log
step() {
  local name=$1 cap=$2; shift 2
  local rem; rem=$(( $(remaining) - 10 ))
  local lim=$(( cap < rem ? cap : rem ))
  if [ "$lim" -lt 5 ]; then
    printf '%s\tSKIPPED(deadline)\t0\n' "$name" >> "$STEPS"; return 0
  fi
  local s; s=$(date +%s)
  echo "== $name (limit ${lim}s)"
  timeout --kill-after=5 "$lim" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local st=OK; [ $rc -ne 0 ] && st="FAIL(rc=$rc)"; { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && st="TIMEOUT(${lim}s)"
  printf '%s\t%s\t%s\n' "$name" "$st" "$(( $(date +%s) - s ))" >> "$STEPS"
  tail -n 15 "$OUT/$name.log"
  return 0
}

# ---------------------------------------------------------------- 1. install
if [ "$DRY" != "1" ]; then
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    step install_torch 240 $PY -m pip install torch
  fi
  step install_fastlora 240 $PY -m pip install --no-build-isolation -e ".[test]"
  # no index reachable, or an extra failed to resolve: build the extension alone
  if ! $PY -c "import fastlora, fastlora.kernels.lora_linear" >/dev/null 2>&1; then
    step install_fastlora_nodeps 240 $PY -m pip install --no-build-isolation --no-deps -e .
  fi
fi
step env 60 $PY "$HERE/gpu_micro.py" env

# ---------------------------------------------------------------- 2. GPU tests
TL=$(( $(remaining) - 200 )); [ "$TL" -gt 170 ] && TL=170; [ "$TL" -lt 20 ] && TL=20
TEST_PATHS="tests/test_lora_linear_triton.py tests/test_lora_quantized_linear_triton.py tests/test_lora_grouped_linear_triton.py tests/test_sparsify_triton.py tests/test_aggregate_triton.py tests/test_lowrank.py::test_family_on_device"
if [ "$DRY" = "1" ]; then
  step tests $((TL + 10)) env TRITON_INTERPRET=1 $PY "$HERE/run_shards.py" "$OUT" "$NSHARDS" "$TL" $TEST_PATHS
else
  step tests $((TL + 10)) env -u TRITON_INTERPRET FASTLORA_TEST_GPU=1 $PY "$HERE/run_shards.py" "$OUT" "$NSHARDS" "$TL" $TEST_PATHS
fi

# ---------------------------------------------------------------- 3. micro-benchmarks
for s in topk aggregate lora; do step "micro_$s" 60 $PY "$HERE/gpu_micro.py" $s; done

# ---------------------------------------------------------------- 4. fastlora bench
# On a GPU each takes seconds; the dry run's CPU bench runs the same full-size shapes in float32,
# which take 20-45 s on 2 busy cores: its limit only guards against a hang. Its bfloat16 bench
# runs two small shapes instead: on a CPU without native bf16 GEMMs (AVX2) ATen emulates the
# base layer's and PEFT's bf16 products, a full-size step taking 1-15 s (on an AVX2-only EPYC
# the full-size cases ran past the 240 s limit).
BENCH_DEV=cuda; BENCH_LIMIT=45
[ "$DRY" = "1" ] && BENCH_DEV=cpu && BENCH_LIMIT=240
for dt in bfloat16 float32; do
  cases=()
  [ "$DRY" = "1" ] && [ "$dt" = bfloat16 ] && cases=(--case 8,1024,1024,16,0 --case 64,512,512,16,0.05)
  step "bench_$dt" $BENCH_LIMIT env -C "$OUT" $PY -m fastlora.cli bench --device $BENCH_DEV --dtype $dt --budget 0.25 "${cases[@]}"
done

# ---------------------------------------------------------------- 5. dispatch, probes
for s in dispatch syncs probe_tf32_new_api probe_grouped_r1024 probe_misc compiled probe_big_lora probe_big_topk probe_cuda_graph; do
  step "micro_$s" 60 $PY "$HERE/gpu_micro.py" $s
done

# ---------------------------------------------------------------- 6. summary
$PY "$HERE/gpu_micro.py" summary
echo "outputs: $OUT   (total $(( $(date +%s) - T0 ))s)"
# The check fails when a test or a step failed (the summary says which).
! grep -q -E 'FAIL|TIMEOUT' "$STEPS"
