#!/usr/bin/env bash
# Rebuilds the shipped reference model (brainseg_ray/reference_model/) from the LGG patients in
# DATA with the project's own jobs: ingest -> split -> train -> evaluate (threshold and
# post-processing chosen on the validation patients) -> export. MODEL_CARD.md there records the
# figures this gave. On a cluster, run it on the head node (each step joins RAY_ADDRESS).
#   bash jobs/reference_model.sh [DATA] [WORK]
set -euo pipefail
DATA=${1:-../shared/data/lgg-dev}
WORK=${2:-out/reference}
BRAINSEG=${BRAINSEG:-brainseg}
# What the comparison chose (MODEL_CARD.md, "How it was chosen").
MODEL=(--model unet base_filters=16)
SIZE=128
EPOCHS=10
THRESHOLD=0.3
POSTPROCESS=(--largest-component-3d --min-component-px 0)

$BRAINSEG ingest "$DATA" --out "$WORK/dataset"
# 35 train / 8 validation / 7 test patients; the test patients are only scored at the end.
$BRAINSEG split "$WORK/dataset" --out "$WORK/split.json" --fractions 0.7,0.15,0.15 --folds 5 --seed 0
$BRAINSEG train --config jobs/train.yaml --data "$WORK/dataset" --out "$WORK/run" "${MODEL[@]}" \
  --epochs "$EPOCHS" --num-workers 1 "split_file=$WORK/split.json" image_size=$SIZE batch_size=8 \
  early_stopping_patience=20
# The threshold sweep and post-processing on the validation patients (report.md: "Threshold sweep").
$BRAINSEG evaluate --model "$WORK/run/model" --data "$WORK/dataset" --out "$WORK/val" \
  --split-file "$WORK/split.json" --split val "thresholds=[0.3,0.4,0.5,0.6,0.7]" largest_component_3d=true
$BRAINSEG export "$WORK/run/model" --out "$WORK/model" --half --threshold $THRESHOLD "${POSTPROCESS[@]}" \
  --card brainseg_ray/reference_model/MODEL_CARD.md
# The card's figures: the exported model on the validation and the untouched test patients.
for split in val test; do
  $BRAINSEG evaluate --model "$WORK/model" --data "$WORK/dataset" --out "$WORK/$split-exported" \
    --split-file "$WORK/split.json" --split $split
done
