"""Deterministic patient-level train/val/test splits and k-fold assignment.

Slices of one patient are strongly correlated, so the unit of splitting is always the patient:
splitting by slice would leak a patient's anatomy from training into evaluation.

Both functions take ``{patient_id: number of slices with tumour}`` and are stratified: patients
with tumour (count > 0) and tumour-free patients (count == 0) are each spread over the
splits/folds in proportion. Results depend only on the patients, their counts and ``seed`` --
never on the order of the input mapping, because ids are sorted before any random draw.

`read_split_file` reads a split back, in either form one is written: `brainseg split`'s
{"splits": {patient: name}, "folds": {patient: k}} or a train run's split.json
{"train": [...], "val": [...], ...}; training and evaluation both choose patients through it.
"""

from __future__ import annotations

import json
import math
import numbers
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from brainseg_ray import storage

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitFile:
    """The patients a split file assigns: to a split name, and to a fold where it has folds."""

    uri: str
    splits: dict[str, str] = field(default_factory=dict)  # patient -> train | val | test
    folds: dict[str, int] = field(default_factory=dict)  # patient -> fold (empty: no folds)

    def in_split(self, name: str) -> list[str]:
        return sorted(p for p, s in self.splits.items() if s == name)

    def in_fold(self, fold: int) -> list[str]:
        return sorted(p for p, f in self.folds.items() if f == fold)

    def outside_fold(self, fold: int) -> list[str]:
        return sorted(p for p, f in self.folds.items() if f != fold)


def read_split_file(uri: str, s3: storage.S3Options | None = None) -> SplitFile:
    """The split file at `uri` (local or s3://), from `brainseg split` or a train run's split.json."""
    record = json.loads(storage.read_bytes(uri, s3))
    if not isinstance(record, dict):
        raise ValueError(f"{uri}: a split file is a JSON object, got {type(record).__name__}")
    if isinstance(record.get("splits"), dict):  # `brainseg split`
        splits = dict(record["splits"])
    else:  # a train run's record: its patients listed by split name
        splits = {p: name for name in SPLITS if isinstance(record.get(name), list) for p in record[name]}
    # A train run records the number of folds it drew ("folds": 5); only a mapping assigns them.
    folds = record.get("folds") if isinstance(record.get("folds"), dict) else {}
    return SplitFile(uri=uri, splits=splits, folds=dict(folds))


def assign_splits(
    tumour_slices_by_patient: Mapping[str, int],
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> dict[str, str]:
    """Assign every patient to exactly one of ``SPLITS`` ('train', 'val', 'test').

    Sizes: the split sizes are ``n_patients * fractions`` rounded by largest remainder (ties go
    to the earlier split), so each size is within one patient of its target. Within that, the
    tumour and tumour-free patients are divided so that each group is as close as possible to
    its own ``fractions`` share.

    Edge cases:

    * A fraction of 0 gives an empty split.
    * Every split with a non-zero fraction gets at least one patient when there are at least as
      many patients as such splits, and at least one *tumour* patient when there are at least
      as many tumour patients as such splits. These minimums win over the proportional sizes
      (e.g. 3 patients at 0.7/0.15/0.15 give 1/1/1, not 2/1/0).
    * With fewer patients than non-zero splits, some of those splits stay empty.

    Raises:
        ValueError: empty input; a negative tumour-slice count; ``fractions`` not of length 3,
            not finite, negative, or not summing to 1 (tolerance 1e-6).

    Returns:
        ``{patient_id: split}`` with the ids in sorted order.
    """
    _check_patients(tumour_slices_by_patient)
    shares = _check_fractions(fractions)

    ids = sorted(tumour_slices_by_patient)
    tumour = [p for p in ids if tumour_slices_by_patient[p] > 0]
    tumour_free = [p for p in ids if tumour_slices_by_patient[p] == 0]

    totals = _with_minimum(_largest_remainder(len(ids), shares), shares)
    n_tumour = _tumour_counts(len(tumour), len(tumour_free), totals, shares)
    n_tumour_free = [total - t for total, t in zip(totals, n_tumour)]

    rng = random.Random(seed)
    assignment: dict[str, str] = {}
    for group, counts in ((tumour, n_tumour), (tumour_free, n_tumour_free)):
        shuffled = list(group)
        rng.shuffle(shuffled)
        start = 0
        for split, count in zip(SPLITS, counts):
            for patient in shuffled[start : start + count]:
                assignment[patient] = split
            start += count
    return {p: assignment[p] for p in ids}


def assign_folds(tumour_slices_by_patient: Mapping[str, int], k: int = 5, seed: int = 0) -> dict[str, int]:
    """Assign every patient to one of ``k`` cross-validation folds, numbered ``0..k-1``.

    Patients are dealt to folds in rounds of ``k``, so fold sizes differ by at most one. Tumour
    patients are dealt first, heaviest tumour burden first (ties in random order), each to the
    fold with the least burden so far in the current round; tumour-free patients follow in
    random order. Hence tumour patients per fold, tumour-free patients per fold, and fold sizes
    each differ by at most one, and the total tumour-slice burden is balanced across folds.

    Edge cases: ``k == len(patients)`` is leave-one-patient-out. A cohort with no tumour patients
    (or no tumour-free ones) is simply dealt as one group.

    Raises:
        TypeError: ``k`` is not an integer.
        ValueError: empty input; a negative tumour-slice count; ``k < 2``; ``k`` larger than the
            number of patients (a fold would be empty).

    Returns:
        ``{patient_id: fold}`` with the ids in sorted order.
    """
    _check_patients(tumour_slices_by_patient)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an integer, got {k!r}")
    n = len(tumour_slices_by_patient)
    if k < 2:
        raise ValueError(f"k must be at least 2 folds, got k={k}")
    if k > n:
        raise ValueError(f"k={k} folds is more than the {n} patients; some folds would be empty")

    rng = random.Random(seed)
    ids = sorted(tumour_slices_by_patient)
    tumour = [p for p in ids if tumour_slices_by_patient[p] > 0]
    tumour_free = [p for p in ids if tumour_slices_by_patient[p] == 0]
    rng.shuffle(tumour)
    rng.shuffle(tumour_free)
    # Stable sort after the shuffle: heaviest burden first, equal burdens in random order.
    tumour.sort(key=lambda p: tumour_slices_by_patient[p], reverse=True)
    tie_break = list(range(k))
    rng.shuffle(tie_break)

    size = [0] * k
    burden = [0] * k
    assignment: dict[str, int] = {}
    for group in (tumour, tumour_free):
        in_group = [0] * k
        for patient in group:
            # Fullest-round first keeps sizes within one; then spread this group, then burden.
            fold = min(range(k), key=lambda f: (size[f], in_group[f], burden[f], tie_break[f]))
            assignment[patient] = fold
            size[fold] += 1
            in_group[fold] += 1
            burden[fold] += tumour_slices_by_patient[patient]
    return {p: assignment[p] for p in ids}


def assign_test_fold(
    tumour_slices_by_patient: Mapping[str, int],
    k: int,
    test_fold: int,
    fractions: tuple[float, float, float],
    seed: int = 0,
) -> tuple[dict[str, str], dict[str, int]]:
    """One round of k-fold cross-validation as a train/val/test split: the patients of fold
    ``test_fold`` (of ``assign_folds(..., k, seed)``) are the test split, and the other folds'
    patients are split into train and val by ``assign_splits`` at ``fractions``, whose test share
    must be 0. Run once for each fold, every patient is tested exactly once, by a model that
    never trained or chose anything on it.

    Raises:
        ValueError: ``test_fold`` outside ``0..k-1``; a non-zero test fraction; and what
            ``assign_folds`` and ``assign_splits`` raise.

    Returns:
        ``({patient_id: split}, {patient_id: fold})``, ids in sorted order.
    """
    if isinstance(test_fold, bool) or not isinstance(test_fold, numbers.Integral) or not 0 <= test_fold < k:
        raise ValueError(f"test fold must be one of 0..{k - 1}, got {test_fold!r}")
    if len(fractions) != 3 or fractions[2] != 0:
        raise ValueError(f"with a test fold the test patients are that fold's: give a test fraction of 0, "
                         f"got fractions {tuple(fractions)}")
    folds = assign_folds(tumour_slices_by_patient, k, seed)
    rest = {p: n for p, n in tumour_slices_by_patient.items() if folds[p] != test_fold}
    inner = assign_splits(rest, fractions, seed)
    return {p: inner.get(p, "test") for p in sorted(tumour_slices_by_patient)}, folds


# --- validation -------------------------------------------------------------------------------


def _check_patients(tumour_slices_by_patient: Mapping[str, int]) -> None:
    if not tumour_slices_by_patient:
        raise ValueError("no patients to split: the tumour-slice mapping is empty")
    negative = sorted(p for p, count in tumour_slices_by_patient.items() if count < 0)
    if negative:
        raise ValueError(f"tumour-slice counts must be >= 0; negative for {negative[:5]}")


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    """Validate ``fractions`` and return them rescaled to sum to exactly 1."""
    if len(fractions) != len(SPLITS):
        raise ValueError(f"fractions needs one value per split {SPLITS}, got {tuple(fractions)}")
    if not all(math.isfinite(f) for f in fractions):
        raise ValueError(f"fractions must be finite numbers, got {tuple(fractions)}")
    if any(f < 0 for f in fractions):
        raise ValueError(f"fractions must not be negative, got {tuple(fractions)}")
    total = math.fsum(fractions)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(
            f"fractions must sum to 1 (within 1e-6), got {tuple(fractions)} summing to {total!r}"
        )
    # Rescale so rounding-level slack in the sum cannot shift a seat.
    return [f / total for f in fractions]


# --- sizes ------------------------------------------------------------------------------------


def _largest_remainder(n: int, shares: Sequence[float]) -> list[int]:
    """Round ``n * shares`` to integers summing to ``n``; ties go to the earlier split."""
    targets = [n * s for s in shares]
    counts = [math.floor(t) for t in targets]
    # Splits with a zero share never take a remainder seat, so they stay empty.
    by_remainder = sorted(
        (i for i, s in enumerate(shares) if s > 0), key=lambda i: (-(targets[i] - counts[i]), i)
    )
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _with_minimum(counts: list[int], shares: Sequence[float]) -> list[int]:
    """Give each non-zero split at least one seat when there are enough seats to go round."""
    counts = list(counts)
    active = [i for i, s in enumerate(shares) if s > 0]
    if sum(counts) < len(active):
        return counts
    n = sum(counts)
    for i in active:
        if counts[i] == 0:
            # Take from the split furthest above its target that can spare one.
            donor = max((j for j in active if counts[j] > 1), key=lambda j: (counts[j] - n * shares[j], -j))
            counts[donor] -= 1
            counts[i] = 1
    return counts


def _tumour_counts(n_tumour: int, n_free: int, totals: Sequence[int], shares: Sequence[float]) -> list[int]:
    """How many tumour patients each split gets, given the split sizes ``totals``.

    Minimises the squared distance of both groups from their proportional targets, subject to
    the sizes and to one tumour patient per non-zero split when there are enough. The cost is
    separable and convex, so adding patients one at a time by least marginal cost is optimal.
    """
    active = [i for i, s in enumerate(shares) if s > 0]
    lower = [0] * len(totals)
    if n_tumour >= len(active):
        for i in active:
            lower[i] = 1

    def cost(i: int, t: int) -> float:
        return (t - n_tumour * shares[i]) ** 2 + (totals[i] - t - n_free * shares[i]) ** 2

    counts = list(lower)
    for _ in range(n_tumour - sum(lower)):
        i = min(
            (i for i in range(len(totals)) if counts[i] < totals[i]),
            key=lambda i: (cost(i, counts[i] + 1) - cost(i, counts[i]), i),
        )
        counts[i] += 1
    return counts
