#!/usr/bin/env bash
# Rebuilds the shipped reference model (brainseg_ray/reference_model/) from the LGG patients in
# DATA with the project's own jobs: ingest -> split -> train (three stages) -> evaluate (threshold
# and post-processing chosen on the validation patients) -> export. MODEL_CARD.md there records
# the figures this gave. On a cluster, run it on the head node (each step joins RAY_ADDRESS).
#   bash jobs/reference_model.sh [DATA] [WORK]
set -euo pipefail
DATA=${1:-../shared/data/lgg-dev}
WORK=${2:-out/reference}
BRAINSEG=${BRAINSEG:-brainseg}
# What the comparison chose (MODEL_CARD.md, "How it was chosen").
MODEL=(--model unet base_filters=16)
THRESHOLD=0.3
POSTPROCESS=(--largest-component-3d --min-component-px 0)

$BRAINSEG ingest "$DATA" --out "$WORK/dataset"
# 35 train / 8 validation / 7 test patients; the test patients are only scored at the end.
$BRAINSEG split "$WORK/dataset" --out "$WORK/split.json" --fractions 0.7,0.15,0.15 --folds 5 --seed 0
train() {  # train RUN EPOCHS [key=value ...]: one stage; rerunning the script resumes a stopped stage
  local run=$1 epochs=$2; shift 2
  $BRAINSEG train --config jobs/train.yaml --data "$WORK/dataset" --out "$WORK/$run" "${MODEL[@]}" \
    --epochs "$epochs" --num-workers 1 "split_file=$WORK/split.json" batch_size=8 early_stopping_patience=20 "$@"
}
score() {  # score OUT SPLIT --model M... [key=value ...]: brainseg evaluate on SPLIT's patients
  local out=$1 split=$2; shift 2
  $BRAINSEG evaluate --data "$WORK/dataset" --split-file "$WORK/split.json" --split "$split" --out "$WORK/$out" "$@"
}
best_checkpoint() {  # best_checkpoint RUN [key=value ...]: of the epochs RUN kept (its best two by raw
  # validation Dice and its latest), the one with the best validation patient Dice after the 3-D
  # step, the measure the model is used with; evaluate's report.md there has the table.
  local run=$1; shift
  score "$run-checkpoints" val $(for c in "$WORK/$run"/checkpoints/epoch-*; do echo --model "$c"; done) \
    threshold=0.5 largest_component_3d=true min_component_px=0 worst_slices=0 "$@" >&2
  python3 -c 'import json, sys; models = json.load(open(sys.argv[1]))["models"]
print(max(models, key=lambda m: m["metrics"]["patient_dice_mean"])["model_uri"])' "$WORK/$run-checkpoints/report.json"
}
# Stage 1 is the comparison's run (10 epochs at 128 px, its best epoch kept). Stage 2 continues at
# 128 px with a lower one-cycle peak, stage 3 at the full 256 px; each starts from the previous
# stage's best checkpoint after the 3-D step.
train stage1 10 image_size=128
train stage2 8 image_size=128 lr=0.0005 "init_from=$WORK/stage1/model"
STAGE2=$(best_checkpoint stage2)
train stage3 3 image_size=256 lr=0.0002 "init_from=$STAGE2"
# Stage 3's checkpoints with the threshold sweep; then the other post-processing on the best one.
FINAL=$(best_checkpoint stage3 "thresholds=[0.3,0.4,0.5,0.6,0.7]")
score val-none val --model "$FINAL" threshold=0.5 largest_component_3d=false min_component_px=0
score val-cc64-3d val --model "$FINAL" threshold=0.5 largest_component_3d=true min_component_px=64
$BRAINSEG export "$FINAL" --out "$WORK/model" --half --threshold $THRESHOLD "${POSTPROCESS[@]}" \
  --card brainseg_ray/reference_model/MODEL_CARD.md
# The card's figures: the exported model on the validation and the untouched test patients.
for split in val test; do
  score "$split-exported" $split --model "$WORK/model"
done
