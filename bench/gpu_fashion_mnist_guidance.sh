#!/usr/bin/env bash
# Class-conditional Fashion-MNIST at 32x32 with classifier-free guidance: a conditional EDM teacher
# trained with label dropout, a conditional CD student, and a guided-distilled CD student (guidance
# scale drawn from GUIDANCE_RANGE and given to the student as an input). Each is scored by the
# classifier Frechet distance and by the accuracy of cmkit's feature classifier on the requested
# classes (overall and the worst class), without guidance (w = 1) and with it.
#
#   bench/gpu_fashion_mnist_guidance.sh [OUT_DIR]        # GPU run (bf16, channels_last)
#   TINY=1 bench/gpu_fashion_mnist_guidance.sh OUT_DIR    # a smoke run on the CPU
#
# Environment: CMKIT (the command, default "cmkit"), TEACHER_STEPS, CD_STEPS, BATCH, EVAL_N, PRESET,
# SCALES (the guidance scales evaluated, default "1 2 3"), GUIDANCE_RANGE (default 1,4),
# LABEL_DROPOUT (default 0.1). Each model is evaluated as soon as it is trained.
set -euo pipefail
OUT=${1:-bench/out/gpu-fashion-mnist-guidance}
CMKIT=${CMKIT:-cmkit}
if [ "${TINY:-0}" = 1 ]; then
  : "${TEACHER_STEPS:=30}" "${CD_STEPS:=20}" "${BATCH:=16}" "${EVAL_N:=200}" "${PRESET:=tiny}"
  SPEED=(--set train.device=cpu --set train.sample_every=0)
else
  : "${TEACHER_STEPS:=4000}" "${CD_STEPS:=2000}" "${BATCH:=512}" "${EVAL_N:=10000}" "${PRESET:=small}"
  SPEED=(--set train.device=cuda --set train.bf16=true --set train.channels_last=true --set train.sample_every=0)
fi
: "${SCALES:=1 2 3}" "${GUIDANCE_RANGE:=1,4}" "${LABEL_DROPOUT:=0.1}"
COMMON=(--data fashion-mnist --set data.resolution=32 --batch-size "$BATCH" --quiet --force "${SPEED[@]}")
mkdir -p "$OUT"
start=$(date +%s)

table() {  # every evaluation so far: FD and the classifier's accuracy on the requested classes
  python3 - "$OUT" <<'PY'
import glob, json, os, sys
rows = []
for path in sorted(glob.glob(f"{sys.argv[1]}/eval-*.json"), key=os.path.getmtime):  # in training order
    result = json.load(open(path))
    model = os.path.basename(path)[5:-5].rsplit("-w", 1)[0]
    for r in result["results"]:
        per_class = [a for a in r["class_accuracy_per_class"] if a is not None]
        rows.append((model, result.get("guidance", 1.0), r["steps"], r["nfe"], r["fd"], result["floor"]["fd"],
                     r["class_accuracy"], min(per_class)))
print(f"\nclass-conditional Fashion-MNIST 32x32, n = {result['n']} samples with the test set's labels")
print(f"{'model':8} {'w':>4} {'steps':>5} {'NFE':>4} {'FD':>8} {'floor':>7} {'acc':>6} {'worst':>6}")
for model, w, steps, nfe, fd, floor, acc, worst in rows:
    print(f"{model:8} {w:4g} {steps:5d} {nfe:4d} {fd:8.3f} {floor:7.3f} {acc:6.3f} {worst:6.3f}")
PY
}

evaluate() {  # evaluate NAME STEPS: without guidance, then at each scale > 1 the run accepts
  local name=$1 steps=$2
  for w in $SCALES; do
    if [ "$w" = 1 ] && [ "$name" != gcd ]; then
      $CMKIT eval --checkpoint "$OUT/$name" --steps "$steps" --n "$EVAL_N" --out "$OUT/eval-$name-w1.json" --quiet
    elif [ "$name" != cd ]; then
      $CMKIT eval --checkpoint "$OUT/$name" --steps "$steps" --n "$EVAL_N" --guidance "$w" \
        --out "$OUT/eval-$name-w$w.json" --quiet
    fi
  done
  table
}

$CMKIT train --method edm --out "$OUT/teacher" --steps "$TEACHER_STEPS" --set model.preset="$PRESET" \
  --label-dropout "$LABEL_DROPOUT" "${COMMON[@]}"
echo "teacher trained: $(($(date +%s) - start)) s"
evaluate teacher 18
$CMKIT train --method cd --teacher "$OUT/teacher" --out "$OUT/cd" --steps "$CD_STEPS" "${COMMON[@]}"
evaluate cd 1,2
$CMKIT train --method cd --teacher "$OUT/teacher" --out "$OUT/gcd" --steps "$CD_STEPS" --guidance "$GUIDANCE_RANGE" \
  "${COMMON[@]}"
evaluate gcd 1,2
for w in $SCALES; do
  $CMKIT sample --checkpoint "$OUT/gcd" --n 100 --steps 1 --class 0,1,2,3,4,5,6,7,8,9 --guidance "$w" \
    --out "$OUT/gcd-1step-w$w.png" --quiet
done
echo "seconds in all: $(($(date +%s) - start))"
