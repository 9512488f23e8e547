#!/usr/bin/env bash
# A reduced version of the full runs for CI (target: under 5 minutes on 2 cores): every method,
# every metric, Table 2 and Table 4, but 8 test images, 10 Fidelity runs, 3 Stability samples, and
# models trained briefly (1 epoch on 1000 scenes) into a throw-away cache.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
CACHE=${CACHE:-$(mktemp -d)}
start=$(date +%s)
srd-fx evaluate --n-images 8 --batch-size 8 --fidelity-runs 10 --stability-samples 3 --figure-images 2 \
  --train-setting epochs=1 --train-setting n_train=1000 --train-setting n_test=200 \
  --cache-dir "$CACHE" --threads "${THREADS:-1}" --out "$OUT" --no-progress > "$OUT/log.txt"
test -s "$OUT/table2.md" && test -s "$OUT/table4.md" && test -s "$OUT/fig_maps.png"
echo "reduced evaluation OK in $(( $(date +%s) - start )) s; outputs in $OUT"
