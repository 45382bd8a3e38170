"""Patient-level splits and folds: determinism, stratification, sizes and input checks."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from brainseg_ray.data.split import SPLITS, assign_folds, assign_splits, assign_test_fold, read_split_file


def cohort(n_tumour: int, n_free: int, seed: int = 0) -> dict[str, int]:
    """Synthetic cohort in the kaggle_3m id style; tumour patients have 1..40 tumour slices."""
    rng = random.Random(seed)
    institutions = ["CS", "DU", "EZ", "FG", "HT"]
    ids = [f"TCGA_{rng.choice(institutions)}_{i:04d}_20000101" for i in range(n_tumour + n_free)]
    return {pid: (rng.randint(1, 40) if i < n_tumour else 0) for i, pid in enumerate(ids)}


LGG = cohort(n_tumour=70, n_free=40)  # roughly the size of the real data set (110 patients)

FRACTIONS = [
    (0.7, 0.15, 0.15),
    (0.8, 0.1, 0.1),
    (0.6, 0.2, 0.2),
    (1 / 3, 1 / 3, 1 / 3),
    (0.5, 0.5, 0.0),
]


def tumour_patients(patients: dict[str, int]) -> list[str]:
    return [p for p, n in patients.items() if n > 0]


def tumour_free_patients(patients: dict[str, int]) -> list[str]:
    return [p for p, n in patients.items() if n == 0]


# --- assign_splits ----------------------------------------------------------------------------


@pytest.mark.parametrize("fractions", FRACTIONS)
def test_splits_are_deterministic(fractions):
    assert assign_splits(LGG, fractions, seed=3) == assign_splits(LGG, fractions, seed=3)


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_splits_ignore_input_order(seed):
    items = list(LGG.items())
    random.Random(seed).shuffle(items)
    assert assign_splits(dict(items), seed=seed) == assign_splits(LGG, seed=seed)
    assert assign_splits(dict(reversed(items)), seed=seed) == assign_splits(LGG, seed=seed)


def test_different_seeds_give_different_splits():
    splits = [assign_splits(LGG, seed=s) for s in range(5)]
    assert len({tuple(sorted(s.items())) for s in splits}) == 5


@pytest.mark.parametrize("fractions", FRACTIONS)
def test_every_patient_in_exactly_one_split(fractions):
    split = assign_splits(LGG, fractions)
    # A dict cannot hold a patient twice; check it holds exactly the input patients and valid names.
    assert sorted(split) == sorted(LGG)
    assert set(split.values()) <= set(SPLITS)
    members = {s: {p for p, v in split.items() if v == s} for s in SPLITS}
    assert sum(len(m) for m in members.values()) == len(LGG)
    for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not members[a] & members[b]


@pytest.mark.parametrize("fractions", FRACTIONS)
@pytest.mark.parametrize("n_tumour,n_free", [(70, 40), (33, 17), (12, 9), (101, 0), (20, 80)])
def test_split_sizes_within_one_patient_of_target(fractions, n_tumour, n_free):
    patients = cohort(n_tumour, n_free, seed=n_tumour)
    split = assign_splits(patients, fractions, seed=7)
    for group in (list(patients), tumour_patients(patients), tumour_free_patients(patients)):
        counts = Counter(split[p] for p in group)
        for name, fraction in zip(SPLITS, fractions):
            assert abs(counts[name] - fraction * len(group)) <= 1, (name, counts, len(group))


# The guarantee holds when there is at least one tumour patient per non-zero split.
@pytest.mark.parametrize(
    "fractions,n_tumour,n_free",
    [
        (fractions, n_tumour, n_free)
        for fractions in FRACTIONS
        for n_tumour, n_free in [(70, 40), (3, 50), (2, 1), (3, 0), (5, 200)]
        if n_tumour >= sum(f > 0 for f in fractions)
    ],
)
def test_every_nonzero_split_gets_a_tumour_patient(fractions, n_tumour, n_free):
    patients = cohort(n_tumour, n_free)
    active = [s for s, f in zip(SPLITS, fractions) if f > 0]
    for seed in range(10):
        split = assign_splits(patients, fractions, seed=seed)
        assert {split[p] for p in tumour_patients(patients)} >= set(active)


def test_minimum_wins_over_proportion_for_tiny_cohorts():
    # 0.7/0.15/0.15 of 3 would round to 2/1/0; the tumour minimum makes it 1/1/1.
    split = assign_splits(cohort(3, 0), (0.7, 0.15, 0.15))
    assert Counter(split.values()) == {"train": 1, "val": 1, "test": 1}


def test_fewer_patients_than_splits_follows_plain_rounding():
    # No minimum applies below one patient per split: 2 * 0.7 = 1.4 takes the remainder seat.
    split = assign_splits({"TCGA_CS_0001_20000101": 4, "TCGA_CS_0002_20000101": 0})
    assert Counter(split.values()) == {"train": 2}


def test_zero_fraction_gives_empty_split():
    split = assign_splits(LGG, (0.8, 0.2, 0.0))
    assert "test" not in split.values()
    assert Counter(split.values()) == {"train": 88, "val": 22}


def test_all_in_one_split():
    assert set(assign_splits(LGG, (0.0, 0.0, 1.0)).values()) == {"test"}


def test_fractions_within_tolerance_are_accepted():
    split = assign_splits(LGG, (0.7, 0.15, 0.15 + 5e-7))
    assert sorted(split) == sorted(LGG)


@pytest.mark.parametrize(
    "patients,fractions,message",
    [
        ({}, (0.7, 0.15, 0.15), "empty"),
        (LGG, (0.7, 0.2, 0.2), "sum to 1"),
        (LGG, (0.7, 0.15, 0.1), "sum to 1"),
        (LGG, (1.2, -0.1, -0.1), "negative"),
        (LGG, (0.5, 0.5), "one value per split"),
        (LGG, (float("nan"), 0.5, 0.5), "finite"),
        ({"TCGA_CS_0001_20000101": -1}, (0.7, 0.15, 0.15), ">= 0"),
    ],
)
def test_split_rejects_bad_input(patients, fractions, message):
    with pytest.raises(ValueError, match=message):
        assign_splits(patients, fractions)


# --- assign_folds -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_folds_are_deterministic_and_order_independent(k):
    items = list(LGG.items())
    random.Random(k).shuffle(items)
    assert assign_folds(dict(items), k, seed=1) == assign_folds(LGG, k, seed=1)


def test_different_seeds_give_different_folds():
    folds = [assign_folds(LGG, 5, seed=s) for s in range(5)]
    assert len({tuple(sorted(f.items())) for f in folds}) == 5


@pytest.mark.parametrize(
    "n_tumour,n_free,k",
    [(70, 40, 5), (70, 40, 10), (33, 17, 3), (7, 0, 7), (0, 9, 4), (1, 1, 2), (13, 6, 19)],
)
def test_folds_partition_with_balanced_sizes(n_tumour, n_free, k):
    patients = cohort(n_tumour, n_free, seed=k)
    folds = assign_folds(patients, k, seed=2)
    assert sorted(folds) == sorted(patients)
    assert set(folds.values()) == set(range(k))
    for group in (list(patients), tumour_patients(patients), tumour_free_patients(patients)):
        sizes = [sum(folds[p] == f for p in group) for f in range(k)]
        assert max(sizes) - min(sizes) <= 1, sizes


@pytest.mark.parametrize("k", [3, 5, 10])
def test_fold_tumour_burden_is_balanced(k):
    folds = assign_folds(LGG, k)
    burden = [sum(n for p, n in LGG.items() if folds[p] == f) for f in range(k)]
    # Dealing heaviest-first in rounds keeps each fold within one heavy patient of the mean.
    assert max(burden) - min(burden) <= max(LGG.values())
    assert all(sum(1 for p in tumour_patients(LGG) if folds[p] == f) > 0 for f in range(k))


@pytest.mark.parametrize(
    "patients,k,message",
    [
        ({}, 5, "empty"),
        (LGG, 1, "at least 2"),
        (LGG, 0, "at least 2"),
        (LGG, -3, "at least 2"),
        (cohort(3, 1), 5, "more than the 4 patients"),
        ({"TCGA_CS_0001_20000101": -2, "TCGA_CS_0002_20000101": 0}, 2, ">= 0"),
    ],
)
def test_folds_reject_bad_input(patients, k, message):
    with pytest.raises(ValueError, match=message):
        assign_folds(patients, k)


def test_folds_reject_non_integer_k():
    with pytest.raises(TypeError, match="integer"):
        assign_folds(LGG, 2.5)


# --- assign_test_fold (one round of cross-validation) ----------------------------------------


@pytest.mark.parametrize("k, fractions", [(5, (0.875, 0.125, 0.0)), (3, (0.8, 0.2, 0.0)), (10, (1.0, 0.0, 0.0))])
def test_test_folds_test_every_patient_once_and_never_train_on_it(k, fractions):
    patients = cohort(n_tumour=33, n_free=17)
    tested = Counter()
    for fold in range(k):
        splits, folds = assign_test_fold(patients, k, fold, fractions, seed=0)
        assert folds == assign_folds(patients, k, 0)
        test = sorted(p for p, s in splits.items() if s == "test")
        assert test == sorted(p for p, f in folds.items() if f == fold)
        rest = {p: n for p, n in patients.items() if folds[p] != fold}
        # train and val are assign_splits' split of the other folds, test share 0
        assert {p: s for p, s in splits.items() if s != "test"} == assign_splits(rest, fractions, 0)
        assert splits == assign_test_fold(dict(reversed(list(patients.items()))), k, fold, fractions, 0)[0]
        tested.update(test)
    assert set(tested) == set(patients) and set(tested.values()) == {1}


@pytest.mark.parametrize("fold, fractions, message", [
    (5, (0.8, 0.2, 0.0), "test fold must be one of 0..4"),
    (-1, (0.8, 0.2, 0.0), "test fold must be one of 0..4"),
    (0, (0.7, 0.15, 0.15), "give a test fraction of 0"),
])
def test_test_fold_rejects_bad_input(fold, fractions, message):
    with pytest.raises(ValueError, match=message):
        assign_test_fold(cohort(10, 5), 5, fold, fractions)


# --- split files read back --------------------------------------------------------------------

SPLIT_COMMAND_FILE = {"seed": 0, "fractions": [0.5, 0.25, 0.25],
                      "splits": {"a": "train", "b": "val", "c": "test", "d": "train"},
                      "folds": {"a": 0, "b": 1, "c": 0, "d": 1}}
# What a train run writes as its split.json: the patients by split, and how they were chosen
# (here a fold drawn by the run: "folds" is a count, not an assignment).
TRAIN_RUN_FILE = {"folds": 5, "fold": 1, "seed": 0, "train": ["d", "a"], "val": ["b"],
                  "settings": {"model": "unet", "image_size": 256}}


def test_read_split_file_of_brainseg_split(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps(SPLIT_COMMAND_FILE))
    split_file = read_split_file(str(path))
    assert split_file.in_split("train") == ["a", "d"] and split_file.in_split("test") == ["c"]
    assert split_file.in_fold(0) == ["a", "c"] and split_file.outside_fold(0) == ["b", "d"]


def test_read_split_file_of_a_train_run(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps(TRAIN_RUN_FILE))
    split_file = read_split_file(str(path))
    assert split_file.in_split("train") == ["a", "d"] and split_file.in_split("val") == ["b"]
    assert split_file.folds == {} and split_file.in_split("test") == []


def test_training_takes_its_patients_from_a_train_runs_split_json(tmp_path):
    """A run's own split.json starts another run on the same patients (it was not readable)."""
    from brainseg_ray.config import TrainConfig
    from brainseg_ray.train.trainer import TrainingError, choose_patients

    path = tmp_path / "split.json"
    path.write_text(json.dumps(TRAIN_RUN_FILE))
    tumour = {"a": 3, "b": 1, "c": 0, "d": 2}
    train, val, how = choose_patients(TrainConfig(data="dataset", split_file=str(path)), tumour)
    assert (train, val) == (["a", "d"], ["b"]) and how["split_file"] == str(path)
    with pytest.raises(TrainingError, match="has no folds"):
        choose_patients(TrainConfig(data="dataset", split_file=str(path), fold=0), tumour)
    path.write_text(json.dumps(SPLIT_COMMAND_FILE))
    train, val, _ = choose_patients(TrainConfig(data="dataset", split_file=str(path), fold=1), tumour)
    assert (train, val) == (["a", "c"], ["b", "d"])
