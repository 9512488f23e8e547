#!/usr/bin/env bash
# The full evaluation runs behind results/: the paper's Table 4 (Fidelity of every method on the
# six activation functions) and Table 2 (five metrics on the ReLU ResNet and the VGG) plus the
# figure of maps, on 200 digit-scene test images.  Models are trained first (or loaded from the
# cache, $SRD_FX_CACHE or ~/.cache/srd_fx).
#
#   bash experiments/run_paper_tables.sh            # THREADS=1 by default (see docs/evaluation.md)
#
# Wall-clock times are printed and stored per table in results/run.json.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-1}
N=${N_IMAGES:-200}
OUT=${OUT:-results}
SRD="${SRD:-srd-fx}"

python experiments/train_models.py --threads "$THREADS"

start=$(date +%s)
$SRD evaluate --models none --n-images "$N" --threads "$THREADS" --figure-images 0 --out "$OUT" --no-progress
echo "Table 4 run: $(( $(date +%s) - start )) s"

start=$(date +%s)
$SRD evaluate --table4-models none --n-images "$N" --threads "$THREADS" --figure-images 4 --out "$OUT" --no-progress
echo "Table 2 run (+ figure): $(( $(date +%s) - start )) s"
