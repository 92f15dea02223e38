#!/usr/bin/env bash
# Fashion-MNIST at 32x32 on one GPU: an EDM teacher, consistency models trained from it or from
# scratch, and the classifier Frechet distance of each (teacher: Heun 18 steps = 35 NFE; the
# others: 1 and 2 steps) beside the real-vs-real floor.
#
#   bench/gpu_fashion_mnist.sh [OUT_DIR]          # GPU run (bf16, channels_last; fused AdamW for the teacher)
#   TINY=1 bench/gpu_fashion_mnist.sh OUT_DIR      # a smoke run on the CPU (what the tests run)
#
# Environment: CMKIT (the command, default "cmkit"), TEACHER_STEPS, CD_STEPS, BATCH, EVAL_N,
# PRESET, COMPILE=1 override the sizes below. METHODS="ect sct ict scd meanflow ct ect-half" adds
# methods, each trained for CD_STEPS steps at the same batch (ECT/sCT start from the teacher, sCD
# distils it; ect-half is ECT at CD_STEPS/2, for "ECT reaches CD's 2-step quality in half the
# steps"). CD_STEPS=auto sizes them from the teacher's measured speed so that all consistency
# training fits in BUDGET seconds (a method step is taken to cost STEP_COST teacher steps).
# Each model is evaluated as soon as it is trained and the table is reprinted, so a run cut off
# by a time limit still reports what finished.
set -euo pipefail
OUT=${1:-bench/out/gpu-fashion-mnist}
CMKIT=${CMKIT:-cmkit}
if [ "${TINY:-0}" = 1 ]; then
  : "${TEACHER_STEPS:=30}" "${CD_STEPS:=20}" "${BATCH:=16}" "${EVAL_N:=300}" "${PRESET:=tiny}"
  SPEED=(--set train.device=cpu --set train.sample_every=10)
else
  # Batch 512: on an H200 the small UNet is launch-bound at 128 (docs/benchmarks.md).
  : "${TEACHER_STEPS:=8000}" "${CD_STEPS:=4000}" "${BATCH:=512}" "${EVAL_N:=10000}" "${PRESET:=small}"
  SPEED=(--set train.device=cuda --set train.bf16=true --set train.channels_last=true --set train.sample_every=0)
  [ "${COMPILE:-0}" = 1 ] && SPEED+=(--set train.compile=true)
fi
: "${BUDGET:=300}" "${STEP_COST:=2.5}"
COMMON=(--data fashion-mnist --set data.resolution=32 --batch-size "$BATCH" --quiet --force "${SPEED[@]}")
mkdir -p "$OUT"
: >"$OUT/times.txt"

table() {  # the table of everything evaluated so far
  python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
times = dict(line.split() for line in open(f"{out}/times.txt"))
names = [n for n in times if os.path.exists(f"{out}/eval-{n}.json")]
rows = []
for name in names:
    result = json.load(open(f"{out}/eval-{name}.json"))
    floor = result["floor"]
    for r in result["results"]:
        rows.append((name, r["steps"], r["nfe"], r["fd"], floor["fd"], r["precision"], r["recall"]))
teacher_fd = rows[0][3]
print(f"\nFashion-MNIST 32x32, n = {result['n']} samples vs the 10k test set (classifier features)")
print(f"{'model':8} {'steps':>5} {'NFE':>4} {'FD':>8} {'floor':>7} {'FD/teacher':>10} {'prec':>5} {'rec':>5} "
      f"{'train s':>7}")
for name, steps, nfe, fd, fl, p, r in rows:
    print(f"{name:8} {steps:5d} {nfe:4d} {fd:8.3f} {fl:7.3f} {fd / teacher_fd:10.2f} {p:5.3f} {r:5.3f} "
          f"{times[name]:>7}")
PY
}

start=$(date +%s)
# shellcheck disable=SC2086
# Unconditional, like the papers' CIFAR-10 anchors (bench/gpu_fashion_mnist_guidance.sh is the conditional one).
$CMKIT train --method edm --out "$OUT/teacher" --steps "$TEACHER_STEPS" --set model.preset="$PRESET" --set model.num_classes=0 \
  --set train.optimizer=adamw --set train.fused_optimizer="$([ "${TINY:-0}" = 1 ] && echo false || echo true)" \
  "${COMMON[@]}"
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
