#!/usr/bin/env bash
# The GPU evidence in one script, sized for one H100/H200 from a cold start (each phase has a time
# limit, and every table is printed as soon as it is complete, so a cut run still reports):
#
#   bench/gpu.sh [OUT]            # on the GPU: about 9 minutes
#   bench/gpu.sh --smoke [OUT]    # tiny sizes on the CPU, end to end (tests/test_bench.py runs it)
#
# 1. Training-step throughput (bench/train_speed.py), as images/s and as a multiple of the bare
#    UNet's forward+backward (eager, and compiled the same way): EDM, CD and sCT steps at batch
#    128, eager fp32 against the compiled bf16 step with CUDA graphs (reduce-overhead); then the
#    EDM step at batch 512, eager / bf16 / bf16+compile / bf16+CUDA graphs. (Each compiled
#    variant compiles for tens of seconds in its warm-up, so not every pair is measured.)
# 2. One-step sampling speed (bench/inference.py).
# 3. Quality on Fashion-MNIST 32x32 (bench/compare_images.sh): a teacher, then CD, ECT and sCT
#    with 1- and 2-step FD and precision/recall, each evaluated as soon as it is trained.
#
# Environment: PYTHON (one that imports cmkit), CMKIT (the command), SPEED_S, SAMPLING_S and
# QUALITY_S (each phase's time limit in seconds), BUDGET (the consistency models' training seconds).
# On the device machine, carry diffusers as a wheel and Fashion-MNIST into an ignored folder
# (CMKIT_FASHION_MNIST) as the device tool's README says.
set -uo pipefail
SMOKE=0
if [ "${1:-}" = --smoke ]; then SMOKE=1; shift; fi
OUT=${1:-bench/out/gpu}
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
CMKIT=${CMKIT:-cmkit}
mkdir -p "$OUT"
if [ "$SMOKE" = 1 ]; then
  SPEED=(--device cpu --data digits --resolution 8 --preset tiny --warmup 1 --repeats 1)
  SPEED_RUNS=("8 edm,cd,sct eager,bf16")
  SAMPLING=(--device cpu --data digits --resolution 8 --preset tiny --batch 8 --repeats 1)
  QUALITY=(TINY=1 DEVICE=cpu TEACHER_STEPS=10 CD_STEPS=10 EVAL_N=200)  # end to end, not quality
  # ect-half (the half-budget variant) trains ECT through the same branch as sct and the GPU run's
  # ect, so the smoke runs it instead of a full-budget ect: one model fewer, every branch covered.
  QUALITY_METHODS="sct ect-half"
  : "${SPEED_S:=300}" "${SAMPLING_S:=300}" "${QUALITY_S:=600}"
else
  # First sizes, not yet run on a GPU: the first session with one tunes them to the 9 minutes.
  SPEED=(--device cuda --data fashion-mnist --resolution 32 --preset small --warmup 3 --repeats 10)
  SPEED_RUNS=("128 edm,cd,sct eager,bf16+cudagraphs" "512 edm eager,bf16,bf16+compile,bf16+cudagraphs")
  SAMPLING=(--device cuda --data fashion-mnist --resolution 32 --preset small --batch 256 --repeats 20)
  QUALITY=(DEVICE=cuda COMPILE=1 CD_STEPS=auto "BUDGET=${BUDGET:-90}" "TEACHER_STEPS=${TEACHER_STEPS:-2000}")
  QUALITY_METHODS="ect sct"
  : "${SPEED_S:=150}" "${SAMPLING_S:=45}" "${QUALITY_S:=200}"
fi
status=0
phase() {  # phase NAME SECONDS COMMAND...: run with a time limit, keep going if it fails or is cut
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s) =="
  timeout "$limit" "$@"
  local rc=$?
  if [ $rc -ne 0 ]; then
    echo "gpu.sh: $name ended with status $rc (124: cut at the time limit)" >&2
    status=1
  fi
}
{
  echo "machine: $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch", torch.__version__)')"
  for run in "${SPEED_RUNS[@]}"; do
    read -r b methods variants <<< "$run"
    phase "training-step throughput, batch $b" "$SPEED_S" "$PYTHON" "$HERE/train_speed.py" --methods "$methods" \
      --variants "$variants" --batch "$b" "${SPEED[@]}"
  done
  phase "one-step sampling" "$SAMPLING_S" "$PYTHON" "$HERE/inference.py" "${SAMPLING[@]}"
  phase "quality: Fashion-MNIST teacher, CD, ECT, sCT" "$QUALITY_S" \
    env "${QUALITY[@]}" DATA=fashion-mnist METHODS="$QUALITY_METHODS" CMKIT="$CMKIT" PYTHON="$PYTHON" \
    bash "$HERE/compare_images.sh" "$OUT/quality"
  exit "$status"
} 2>&1 | tee "$OUT/gpu.log"
exit "${PIPESTATUS[0]}"
