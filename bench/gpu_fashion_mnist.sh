#!/usr/bin/env bash
# Fashion-MNIST at 32x32 on one GPU: an EDM teacher, a CD student distilled from it, and the
# classifier Frechet distance of each (teacher: Heun 18 steps = 35 NFE; CD: 1 and 2 steps)
# beside the real-vs-real floor. Sized for about 8 minutes on one H100.
#
#   bench/gpu_fashion_mnist.sh [OUT_DIR]          # GPU run (bf16 + torch.compile)
#   TINY=1 bench/gpu_fashion_mnist.sh OUT_DIR      # a smoke run on the CPU (what the tests run)
#
# Environment: CMKIT (the command, default "cmkit"), TEACHER_STEPS, CD_STEPS, BATCH, EVAL_N,
# PRESET override the sizes below. METHODS="ict ect sct scd meanflow ct" adds those methods, each
# trained for CD_STEPS steps at the same batch (ECT/sCT start from the teacher, sCD distils it),
# to the table: the method comparison of the objectives issue (allow about 3 minutes per method).
set -euo pipefail
OUT=${1:-bench/out/gpu-fashion-mnist}
CMKIT=${CMKIT:-cmkit}
if [ "${TINY:-0}" = 1 ]; then
  : "${TEACHER_STEPS:=30}" "${CD_STEPS:=20}" "${BATCH:=16}" "${EVAL_N:=300}" "${PRESET:=tiny}"
  SPEED=(--set train.device=cpu --set train.sample_every=10)
else
  : "${TEACHER_STEPS:=8000}" "${CD_STEPS:=4000}" "${BATCH:=256}" "${EVAL_N:=10000}" "${PRESET:=small}"
  SPEED=(--set train.device=cuda --set train.bf16=true --set train.compile=true --set train.channels_last=true
         --set train.sample_every=2000)
fi
COMMON=(--data fashion-mnist --set data.resolution=32 --batch-size "$BATCH" --quiet --force "${SPEED[@]}")
mkdir -p "$OUT"
start=$(date +%s)
# shellcheck disable=SC2086
$CMKIT train --method edm --out "$OUT/teacher" --steps "$TEACHER_STEPS" --set model.preset="$PRESET" \
  --set train.optimizer=adamw --set train.fused_optimizer="$([ "${TINY:-0}" = 1 ] && echo false || echo true)" \
  "${COMMON[@]}"
t_teacher=$(date +%s)
$CMKIT train --method cd --teacher "$OUT/teacher" --out "$OUT/cd" --steps "$CD_STEPS" "${COMMON[@]}"
for m in ${METHODS:-}; do
  case "$m" in
    ect|sct) SRC=(--init "$OUT/teacher") ;;
    scd) SRC=(--teacher "$OUT/teacher") ;;
    *) SRC=(--set model.preset="$PRESET") ;;
  esac
  $CMKIT train --method "$m" --out "$OUT/$m" --steps "$CD_STEPS" "${SRC[@]}" "${COMMON[@]}"
done
t_cd=$(date +%s)
$CMKIT eval --checkpoint "$OUT/teacher" --steps 18 --n "$EVAL_N" --metric fd,pr --out "$OUT/eval-teacher.json" --quiet
for m in cd ${METHODS:-}; do
  $CMKIT eval --checkpoint "$OUT/$m" --steps 1,2 --n "$EVAL_N" --metric fd,pr --out "$OUT/eval-$m.json" --quiet
done
end=$(date +%s)
$CMKIT sample --checkpoint "$OUT/cd" --n 64 --steps 1 --out "$OUT/cd-1step.png" --quiet
python3 - "$OUT" "$((t_teacher - start))" "$((t_cd - t_teacher))" "$((end - t_cd))" cd ${METHODS:-} <<'PY'
import json, sys
out, t_teacher, t_cd, t_eval = sys.argv[1], *map(int, sys.argv[2:5])
rows = []
for name in ("teacher", *sys.argv[5:]):
    result = json.load(open(f"{out}/eval-{name}.json"))
    floor = result["floor"]
    for r in result["results"]:
        rows.append((name, r["steps"], r["nfe"], r["fd"], floor["fd"], r["precision"], r["recall"]))
teacher_fd = rows[0][3]
print(f"\nFashion-MNIST 32x32, n = {result['n']} samples vs the 10k test set (classifier features)")
print(f"{'model':8} {'steps':>5} {'NFE':>4} {'FD':>8} {'floor':>7} {'FD/teacher':>10} {'prec':>5} {'rec':>5}")
for name, steps, nfe, fd, fl, p, r in rows:
    print(f"{name:8} {steps:5d} {nfe:4d} {fd:8.3f} {fl:7.3f} {fd / teacher_fd:10.2f} {p:5.3f} {r:5.3f}")
print(f"\nseconds: teacher training {t_teacher}, consistency training {t_cd}, evaluation {t_eval}, "
      f"total {t_teacher + t_cd + t_eval}")
PY
