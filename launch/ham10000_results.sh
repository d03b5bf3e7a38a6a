#!/usr/bin/env bash
# The HAM10000 comparison of docs/results.md: scratch vs SimCLR vs MICLe pretraining,
# fine-tuned on 10% and 100% of the lesions' labels, 3 pretraining x 3 fine-tuning seeds.
#
#   bash launch/ham10000_results.sh ROOT [MANUAL_DIR]
#
# MANUAL_DIR holds the published HAM10000 files (default: ../shared/data/ham10000 beside
# this checkout). Runs go to ROOT/pretrain/METHOD/seed=S and
# ROOT/finetune/INIT/fraction=F,seed=K (INIT: scratch, or METHOD-pS for the pretraining
# run of seed S); the data set is built once into ROOT/tfds. Every run resumes where it
# stopped and a finished one is skipped, so the script can be run again after an
# interruption. The report is written to ROOT/report.md (+ .csv, plots).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="${1:?usage: launch/ham10000_results.sh ROOT [MANUAL_DIR]}"
MANUAL_DIR="${2:-$REPO/../shared/data/ham10000}"
CONFIG="$REPO/configs/ham10000_small.py"
PY="${PYTHON:-python}"
DATA=(--config.data.data_dir="$ROOT/tfds" --config.data.manual_dir="$MANUAL_DIR")
SEEDS=(0 1 2)
FRACTIONS=(0.1 1.0)

for method in simclr micle; do
  for s in "${SEEDS[@]}"; do
    "$PY" "$REPO/main.py" --config="$CONFIG:$method" --workdir="$ROOT/pretrain/$method/seed=$s" \
        --config.seed="$s" "${DATA[@]}"
  done
done

finetune() {  # INIT_NAME INIT_FROM
  for f in "${FRACTIONS[@]}"; do
    for k in "${SEEDS[@]}"; do
      "$PY" "$REPO/main.py" --config="$CONFIG:finetune" \
          --workdir="$ROOT/finetune/$1/fraction=$f,seed=$k" --config.init="${1%-p*}" \
          --config.init_from="$2" --config.data.label_fraction="$f" --config.seed="$k" \
          "${DATA[@]}"
    done
  done
}
finetune scratch ''
for method in simclr micle; do
  for s in "${SEEDS[@]}"; do
    finetune "$method-p$s" "$ROOT/pretrain/$method/seed=$s"
  done
done

"$PY" -m bigssl_med.report "$ROOT/finetune" --out "$ROOT/report.md"
