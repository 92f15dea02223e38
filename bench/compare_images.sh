#!/usr/bin/env bash
# Every method on equal footing on images: an EDM teacher, consistency models trained from it or
# from scratch with the same UNet, batch and number of steps, and the classifier Frechet distance
# of each (teacher: Heun 18 steps = 35 NFE; the others: 1 and 2 steps) beside the real-vs-real
# floor. Prints a table and writes OUT/quality_vs_nfe.png after each model.
#
#   bench/compare_images.sh [OUT_DIR]              # Fashion-MNIST 32x32 on one GPU (bf16, channels_last)
#   DATA=digits DEVICE=cpu bench/compare_images.sh  # the CPU-sized comparison: 8x8 digits, tiny UNet
#   TINY=1 bench/compare_images.sh OUT_DIR          # a smoke run on the CPU (what the tests run)
#
# Environment: CMKIT (the command, default "cmkit"), PYTHON (one that imports cmkit, for the table),
# DATA (fashion-mnist or digits), DEVICE (cuda or cpu), C_NOISE (edm or openai), TEACHER_STEPS, CD_STEPS, BATCH, EVAL_N,
# PRESET, TEACHER_LR, COMPILE=1 override the sizes below. METHODS="ect sct ict scd meanflow ct
# ect-half" adds methods, each trained for CD_STEPS steps at the same batch (ECT/sCT start from the
# teacher, sCD distils it; ect-half is ECT at CD_STEPS/2, for "ECT reaches CD's 2-step quality in
# half the steps"). CD_STEPS=auto sizes them from the teacher's measured speed so that all
# consistency training fits in BUDGET seconds (a method step is taken to cost STEP_COST teacher
# steps). Each model is evaluated as soon as it is trained and the table is reprinted, so a run cut
# off by a time limit still reports what finished.
set -euo pipefail
DATA=${DATA:-fashion-mnist}
OUT=${1:-bench/out/compare-$DATA}
CMKIT=${CMKIT:-cmkit}
PYTHON=${PYTHON:-python3}
if [ "${TINY:-0}" = 1 ]; then
  : "${TEACHER_STEPS:=30}" "${CD_STEPS:=20}" "${BATCH:=16}" "${EVAL_N:=300}" "${PRESET:=tiny}" "${DEVICE:=cpu}"
elif [ "${DEVICE:-cuda}" = cpu ]; then
  # About 45 minutes on 2 cores for all eight methods on digits (docs/benchmarks.md).
  : "${TEACHER_STEPS:=3000}" "${CD_STEPS:=2000}" "${BATCH:=128}" "${EVAL_N:=10000}" "${PRESET:=tiny}"
else
  # Batch 512: on an H200 the small UNet is launch-bound at 128 (docs/benchmarks.md).
  : "${TEACHER_STEPS:=8000}" "${CD_STEPS:=4000}" "${BATCH:=512}" "${EVAL_N:=10000}" "${PRESET:=small}"
fi
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then
  SPEED=(--set train.device=cpu --set train.sample_every=0)
else
  SPEED=(--set train.device="$DEVICE" --set train.bf16=true --set train.channels_last=true --set train.sample_every=0)
  [ "${COMPILE:-0}" = 1 ] && SPEED+=(--set train.compile=true)
fi
case "$DATA" in
  fashion-mnist) DATA_ARGS=(--data fashion-mnist --set data.resolution=32); TITLE="Fashion-MNIST 32x32" ;;
  digits) DATA_ARGS=(--data digits); TITLE="digits 8x8" ;;
  *) echo "compare_images.sh: DATA must be fashion-mnist or digits, not '$DATA'" >&2; exit 2 ;;
esac
# The teacher's time input (also CT's and iCT's). EDM's ln(sigma)/4, not OpenAI's 250 ln(sigma): sCT
# and sCD differentiate the network along t, and 250 ln(sigma) makes that derivative explode near
# both ends (docs/benchmarks.md). C_NOISE=openai gives CD/CT models that export to diffusers.
: "${C_NOISE:=edm}"
TEACHER_OPTS=(--set model.c_noise="$C_NOISE" --set train.optimizer=adamw --set train.fused_optimizer="$([ "$DEVICE" = cpu ] && echo false || echo true)")
[ -n "${TEACHER_LR:-}" ] && TEACHER_OPTS+=(--lr "$TEACHER_LR")
: "${BUDGET:=300}" "${STEP_COST:=2.5}"
COMMON=("${DATA_ARGS[@]}" --batch-size "$BATCH" --quiet --force "${SPEED[@]}")
mkdir -p "$OUT"
: >"$OUT/times.txt"

table() {  # the table and plot of everything evaluated so far
  "$PYTHON" "$(dirname "$0")/image_table.py" "$OUT" --title "$TITLE" --plot "$OUT/quality_vs_nfe.png"
}

start=$(date +%s)
# shellcheck disable=SC2086
# Unconditional, like the papers' CIFAR-10 anchors (bench/gpu_fashion_mnist_guidance.sh is the conditional one).
$CMKIT train --method edm --out "$OUT/teacher" --steps "$TEACHER_STEPS" --set model.preset="$PRESET" --set model.num_classes=0 \
  "${TEACHER_OPTS[@]}" "${COMMON[@]}"
t_teacher=$(($(date +%s) - start))
echo "teacher $t_teacher" >>"$OUT/times.txt"
$CMKIT eval --checkpoint "$OUT/teacher" --steps 18 --n "$EVAL_N" --metric fd,pr --out "$OUT/eval-teacher.json" --quiet
table

METHODS=(cd ${METHODS:-})
if [ "$CD_STEPS" = auto ]; then
  CD_STEPS=$(python3 -c "import sys; b, c, t, n, k = map(float, sys.argv[1:]); \
print(max(100, int(b / (n * c * t / k)) // 100 * 100))" "$BUDGET" "$STEP_COST" "$t_teacher" "${#METHODS[@]}" "$TEACHER_STEPS")
fi
echo "consistency models: $CD_STEPS steps each, batch $BATCH"

for m in "${METHODS[@]}"; do
  steps=$CD_STEPS method=$m
  case "$m" in
    cd) SRC=(--teacher "$OUT/teacher") ;;
    ect|sct) SRC=(--init "$OUT/teacher") ;;
    ect-half) SRC=(--init "$OUT/teacher"); method=ect; steps=$((CD_STEPS / 2)) ;;
    scd) SRC=(--teacher "$OUT/teacher") ;;
    ct|ict) SRC=(--set model.preset="$PRESET" --set model.num_classes=0 --set model.c_noise="$C_NOISE") ;;
    *) SRC=(--set model.preset="$PRESET" --set model.num_classes=0) ;;
  esac
  t0=$(date +%s)
  if ! $CMKIT train --method "$method" --out "$OUT/$m" --steps "$steps" "${SRC[@]}" "${COMMON[@]}"; then
    echo "cmkit: $m failed to train; left out of the table" >&2
    continue
  fi
  echo "$m $(($(date +%s) - t0))" >>"$OUT/times.txt"
  $CMKIT eval --checkpoint "$OUT/$m" --steps 1,2 --n "$EVAL_N" --metric fd,pr --out "$OUT/eval-$m.json" --quiet
  table
done
$CMKIT sample --checkpoint "$OUT/cd" --n 64 --steps 1 --out "$OUT/cd-1step.png" --quiet
echo "seconds in all: $(($(date +%s) - start))"
