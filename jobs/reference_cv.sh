#!/usr/bin/env bash
# k-fold cross-validation of the reference model's recipe (jobs/reference_model.sh): in round K,
# fold K of 5 is the test split and the other 40 patients train (35) and choose (5); every
# patient is scored once, by a model that never saw it. The rounds share one ingested dataset;
# rerunning continues where it stopped (finished rounds are skipped, training resumes from its
# checkpoints). Then jobs/reference_cv.py pools the rounds' test scores into WORK/cv-score.json.
#   bash jobs/reference_cv.sh [DATA] [WORK] [FOLDS...]   (FOLDS: default 0 1 2 3 4)
set -euo pipefail
DATA=${1:-../shared/data/lgg-dev}
WORK=${2:-out/reference-cv}
shift $(( $# < 2 ? $# : 2 ))
PYTHON=${PYTHON:-python3}
K=5
FOLDS=("$@")
[ ${#FOLDS[@]} -gt 0 ] || FOLDS=(0 1 2 3 4)
for k in "${FOLDS[@]}"; do
  [ -f "$WORK/fold-$k/test-exported/report.json" ] && continue  # the round's last step is done
  SPLIT="--folds $K --test-fold $k --fractions 0.875,0.125,0 --seed 0" DATASET="$WORK/dataset" PACKAGE=0 \
    bash "$(dirname "$0")/reference_model.sh" "$DATA" "$WORK/fold-$k"
done
$PYTHON "$(dirname "$0")/reference_cv.py" "$WORK"
