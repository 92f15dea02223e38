#!/usr/bin/env bash
# An EDM teacher and a CD model on scikit-learn's 8x8 digits (tiny UNet), FD/PR against the held-out
# digits, and sample grids: the CPU stand-in of the images issue, about 12 minutes on 2 cores.
# DATA=digits DEVICE=cpu bench/compare_images.sh compares every method the same way.
#   bench/cpu_digits.sh [OUT_DIR]   (CMKIT overrides the command)
set -euo pipefail
O=${1:-bench/out/digits}
C=${CMKIT:-cmkit}
$C train --method edm --data digits --set model.preset=tiny --set model.num_classes=0 --batch-size 128 --lr 2e-3 --set train.lr_warmup=100 \
  --steps 3000 --out "$O/teacher" --force --quiet
$C train --method cd --data digits --teacher "$O/teacher" --batch-size 128 --steps 2000 --out "$O/cd" --force --quiet
$C eval --checkpoint "$O/teacher" --steps 18 --n 180 --metric fd,pr --out "$O/eval-teacher.json" --quiet
$C eval --checkpoint "$O/cd" --steps 1,2,3 --n 180 --metric fd,pr --out "$O/eval-cd.json" --quiet
$C sample --checkpoint "$O/cd" --n 64 --out "$O/cd-1step.png" --quiet
$C sample --checkpoint "$O/teacher" --n 64 --steps 18 --out "$O/teacher.png" --quiet
