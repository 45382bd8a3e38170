#!/usr/bin/env bash
# The shipped reference model's recipe (jobs/reference_model.sh), cross-validated, and then the
# model itself. In round K, fold K of 5 is the test split and the other 40 patients train (35) and
# choose (5); every patient is scored once, by a model that never saw it, through the bulk job's
# mask files, `brainseg evaluate` and (where Chromium is installed) the web page. The rounds share
# one ingested dataset; jobs/reference_cv.py pools their figures into WORK/cv-score.json. With all
# rounds done, the final model is built the same way on all 50 patients (45 train, 5 choose) in
# WORK/final and goes into the package, its card reporting the rounds' figures. Rerunning continues
# where it stopped: finished steps are skipped, training resumes from its checkpoints.
#   bash jobs/reference_cv.sh [DATA] [WORK] [FOLDS...]   (FOLDS: default 0 1 2 3 4 and the final model)
# RECORDS (a folder, e.g. docs/reference-cv/MODEL) keeps each finished round's figures: its split,
# scores, web check, exported settings and train histories, a few small files. A round found there
# is restored into WORK instead of run, so rounds run in different sessions or on different
# machines pool together.
# CHOICE=pooled chooses each round's stage, threshold and post-processing on the other rounds'
# test patients instead of its own 5 validation patients: a round trains and scores the grid of
# candidates on its test patients (jobs/reference_grid.py: grid.json, recorded), then, once the
# other four rounds have a grid (here or in RECORDS), takes the candidate jobs/reference_choice.py's
# pooled rule ranks first over their 40 patients, and is exported and scored with it, so one
# round finishes in one session; the final model takes the one ranked first over all 50 once
# every round is exported. A round's own grid counts only while the models it scored are on disk
# (or it is exported): a round without them trains and is scored again before it is exported.
set -euo pipefail
DATA=${1:-../shared/data/lgg-dev}
WORK=${2:-out/reference-cv}
shift $(( $# < 2 ? $# : 2 ))
PYTHON=${PYTHON:-python3}
JOBS=$(dirname "$0")
K=5
FOLDS=("$@")
[ ${#FOLDS[@]} -gt 0 ] || FOLDS=(0 1 2 3 4)
MODEL=${MODEL:-unet-efficientnet-lite2}  # reference_model.sh's default, named here for the records
RECORDS=${RECORDS:-}
CHOICE=${CHOICE:-validation}
case $CHOICE in validation|pooled) ;; *) echo "reference_cv.sh: CHOICE must be validation or pooled, got $CHOICE" >&2; exit 2 ;; esac
BROWSER=false  # the web check's Chromium
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then BROWSER=true; fi
RECORD=(split.json test-score.json test-exported/report.json test-exported/report.md web-check.json model/model.json
  stage1/history.json stage2/history.json grid.json chosen.json)
copy_record() {  # copy_record FROM TO: the record's files that FROM has
  local f
  for f in "${RECORD[@]}"; do
    [ ! -f "$1/$f" ] || { mkdir -p "$(dirname "$2/$f")" && cp "$1/$f" "$2/$f"; }
  done
}
record_model() {  # record_model ROUND: the model name its exported settings hold
  $PYTHON -c 'import json, sys; print(json.load(open(sys.argv[1]))["model"]["name"])' "$1/model/model.json"
}
split_of() {  # split_of K: round K's `brainseg split` options
  echo "--folds $K --test-fold $1 --fractions 0.875,0.125,0 --seed 0"
}
finish() {  # finish K: round K's web check, then its record
  local round=$WORK/fold-$1
  if [ ! -f "$round/web-check.json" ] && $BROWSER; then
    $PYTHON "$JOBS/reference_web_check.py" "$round/test-source" --model "$round/model" \
      --out "$round/web-check.json"
  fi
  [ -z "$RECORDS" ] || copy_record "$round" "$RECORDS/fold-$1"
}
for k in "${FOLDS[@]}"; do
  round=$WORK/fold-$k
  record=$RECORDS/fold-$k
  if [ -n "$RECORDS" ] && [ -f "$record/test-exported/report.json" ] && [ ! -f "$round/test-exported/report.json" ]; then
    recorded=$(record_model "$record")
    if [ "$recorded" != "$MODEL" ]; then
      echo "reference_cv.sh: $record is a round of $recorded, not of MODEL=$MODEL" >&2
      exit 2
    fi
    copy_record "$record" "$round"
    echo "round $k: restored from $record"
  fi
  if [ ! -f "$round/web-check.json" ] && ! $BROWSER; then  # said before a round's hours of training, not after
    echo "reference_cv.sh: round $k gets no web check: chromium and chromedriver are not on PATH" \
      "(make browser, then rerun the same command to add it)" >&2
  fi
  if [ "$CHOICE" = pooled ]; then
    if [ ! -f "$round/test-exported/report.json" ]; then
      if ! why=$($PYTHON "$JOBS/reference_choice.py" ready "$round"); then
        echo "round $k: $why: training it (a trained stage is kept, a part-trained one resumes) and scoring its grid"
        SPLIT=$(split_of "$k") DATASET="$WORK/dataset" TRAIN_ONLY=1 bash "$JOBS/reference_model.sh" "$DATA" "$round"
        $PYTHON "$JOBS/reference_grid.py" "$round" --data "$WORK/dataset"
        [ -z "$RECORDS" ] || copy_record "$round" "$record"
      fi
      missing=
      for j in $(seq 0 $((K - 1))); do  # the other rounds' grids, from their records where not here
        [ "$j" != "$k" ] || continue
        if [ ! -f "$WORK/fold-$j/grid.json" ] && [ -n "$RECORDS" ] && [ -f "$RECORDS/fold-$j/grid.json" ]; then
          mkdir -p "$WORK/fold-$j" && cp "$RECORDS/fold-$j/grid.json" "$WORK/fold-$j/grid.json"
        fi
        [ -f "$WORK/fold-$j/grid.json" ] || missing=$j
      done
      if [ -n "$missing" ]; then
        echo "reference_cv.sh: round $k chooses once the other $((K - 1)) rounds have a grid; round $missing has none (rerun with it)"
        continue
      fi
      $PYTHON "$JOBS/reference_choice.py" pooled "$WORK" "fold-$k" "$round/chosen.json"
      SPLIT=$(split_of "$k") DATASET="$WORK/dataset" PACKAGE=0 CHOICE="$round/chosen.json" \
        bash "$JOBS/reference_model.sh" "$DATA" "$round"
    fi
    finish "$k"
    continue
  fi
  [ -f "$round/test-exported/report.json" ] ||  # the round's last step
    SPLIT=$(split_of "$k") DATASET="$WORK/dataset" PACKAGE=0 bash "$JOBS/reference_model.sh" "$DATA" "$round"
  finish "$k"
done
# Pooled over the rounds exported so far (none yet: nothing to pool).
compgen -G "$WORK/fold-*/test-score.json" >/dev/null || exit 0
$PYTHON "$JOBS/reference_cv.py" "$WORK"
for k in $(seq 0 $((K - 1))); do
  [ -f "$WORK/fold-$k/test-exported/report.json" ] || exit 0  # the final model only after every round
done
FINAL_CHOICE=  # the pooled choice needs no training of the final model's own: made before it
if [ "$CHOICE" = pooled ]; then
  mkdir -p "$WORK/final"
  FINAL_CHOICE=$WORK/final/chosen.json
  $PYTHON "$JOBS/reference_choice.py" pooled "$WORK" final "$FINAL_CHOICE"
fi
SPLIT="--folds $K --fractions 0.9,0.1,0 --seed 0" DATASET="$WORK/dataset" CV="$WORK" CHOICE="$FINAL_CHOICE" \
  bash "$JOBS/reference_model.sh" "$DATA" "$WORK/final"
