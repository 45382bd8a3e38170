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
set -euo pipefail
DATA=${1:-../shared/data/lgg-dev}
WORK=${2:-out/reference-cv}
shift $(( $# < 2 ? $# : 2 ))
PYTHON=${PYTHON:-python3}
K=5
FOLDS=("$@")
[ ${#FOLDS[@]} -gt 0 ] || FOLDS=(0 1 2 3 4)
for k in "${FOLDS[@]}"; do
  round=$WORK/fold-$k
  [ -f "$round/test-exported/report.json" ] ||  # the round's last step
    SPLIT="--folds $K --test-fold $k --fractions 0.875,0.125,0 --seed 0" DATASET="$WORK/dataset" PACKAGE=0 \
      bash "$(dirname "$0")/reference_model.sh" "$DATA" "$round"
  if [ ! -f "$round/web-check.json" ] && command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    $PYTHON "$(dirname "$0")/reference_web_check.py" "$round/test-source" --model "$round/model" \
      --out "$round/web-check.json"
  fi
done
$PYTHON "$(dirname "$0")/reference_cv.py" "$WORK"
for k in $(seq 0 $((K - 1))); do
  [ -f "$WORK/fold-$k/test-exported/report.json" ] || exit 0  # the final model only after every round
done
SPLIT="--folds $K --fractions 0.9,0.1,0 --seed 0" DATASET="$WORK/dataset" CV="$WORK" \
  bash "$(dirname "$0")/reference_model.sh" "$DATA" "$WORK/final"
