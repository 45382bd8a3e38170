"""Segmentation/detection metrics against hand-computed values, edge cases included."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from brainseg_ray.train.metrics import (
    DetectionCounts,
    PixelCounts,
    SegmentationMetrics,
    detection_counts,
    dice,
    iou,
    patient_dice,
    pixel_counts,
    summarize,
)


def m(rows: str) -> np.ndarray:
    """A mask from '1100/1100/0000/0000' (rows split by '/')."""
    return np.array([[c == "1" for c in row] for row in rows.split("/")], dtype=bool)


EMPTY = m("0000/0000/0000/0000")
FULL = m("1111/1111/1111/1111")
TOP_LEFT = m("1100/1100/0000/0000")

# name, pred, truth, (tp, fp, fn, tn), dice, iou, precision, recall, specificity
PIXEL_CASES = [
    ("overlap", m("0110/0110/0000/0000"), TOP_LEFT, (2, 2, 2, 10), 0.5, 1 / 3, 0.5, 0.5, 10 / 12),
    ("perfect", TOP_LEFT, TOP_LEFT, (4, 0, 0, 12), 1.0, 1.0, 1.0, 1.0, 1.0),
    ("disjoint", m("0000/0000/0011/0011"), TOP_LEFT, (0, 4, 4, 8), 0.0, 0.0, 0.0, 0.0, 8 / 12),
    ("superset", m("1111/1111/0000/0000"), TOP_LEFT, (4, 4, 0, 8), 2 / 3, 0.5, 0.5, 1.0, 8 / 12),
    ("subset", m("1000/1000/0000/0000"), TOP_LEFT, (2, 0, 2, 12), 2 / 3, 0.5, 1.0, 0.5, 1.0),
    # empty truth: recall is 0.0 because something was predicted
    ("empty truth", TOP_LEFT, EMPTY, (0, 4, 0, 12), 0.0, 0.0, 0.0, 0.0, 12 / 16),
    # empty prediction: precision is 0.0 because tumour was missed
    ("empty pred", EMPTY, TOP_LEFT, (0, 0, 4, 12), 0.0, 0.0, 0.0, 0.0, 1.0),
    ("both empty", EMPTY, EMPTY, (0, 0, 0, 16), 1.0, 1.0, 1.0, 1.0, 1.0),
    # no negative pixel: specificity by agreement
    ("all tumour, found", FULL, FULL, (16, 0, 0, 0), 1.0, 1.0, 1.0, 1.0, 1.0),
    ("all tumour, one missed", m("0111/1111/1111/1111"), FULL, (15, 0, 1, 0),
     30 / 31, 15 / 16, 1.0, 15 / 16, 0.0),
]


@pytest.mark.parametrize(
    "pred, truth, counts, dsc, jac, prec, rec, spec",
    [case[1:] for case in PIXEL_CASES],
    ids=[case[0] for case in PIXEL_CASES],
)
def test_pixel_metrics(pred, truth, counts, dsc, jac, prec, rec, spec):
    c = pixel_counts(pred, truth)
    assert (c.tp, c.fp, c.fn, c.tn) == counts
    assert c.dice == pytest.approx(dsc)
    assert c.iou == pytest.approx(jac)
    assert c.precision == pytest.approx(prec)
    assert c.recall == pytest.approx(rec)
    assert c.specificity == pytest.approx(spec)
    assert dice(pred, truth) == pytest.approx(dsc)
    assert iou(pred, truth) == pytest.approx(jac)


def test_dice_and_iou_accept_0_1_numbers():
    as_uint8 = TOP_LEFT.astype(np.uint8)
    as_float = m("0110/0110/0000/0000").astype(np.float32)
    assert dice(as_float, as_uint8) == pytest.approx(0.5)
    assert iou(as_float, as_uint8) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "pred, truth",
    [
        (TOP_LEFT.astype(np.uint8) * 255, TOP_LEFT),  # 0/255 file convention
        (np.full((4, 4), 0.7), TOP_LEFT),  # probabilities, not thresholded
        (TOP_LEFT, np.full((4, 4), "1")),  # not numeric
        (np.zeros((4, 5), bool), TOP_LEFT),  # shape mismatch
    ],
    ids=["0-255", "probabilities", "strings", "shape"],
)
def test_bad_masks_are_rejected(pred, truth):
    with pytest.raises(ValueError):
        pixel_counts(pred, truth)


def test_pixel_counts_add_up():
    a = pixel_counts(m("0110/0110/0000/0000"), TOP_LEFT)
    b = pixel_counts(EMPTY, TOP_LEFT)
    assert a + b == PixelCounts(tp=2, fp=2, fn=6, tn=22)
    assert a + PixelCounts() == a


# --- patient (3-D) Dice -----------------------------------------------------------------------


def test_patient_dice_is_volumetric_not_a_slice_mean():
    # Slice 1: a 16-pixel lesion found exactly (Dice 1). Slice 2: a 1-pixel lesion missed by one
    # pixel (Dice 0). Slice 3: tumour-free, nothing predicted (Dice 1 by convention).
    preds = [FULL, m("0100/0000/0000/0000"), EMPTY]
    truths = [FULL, m("1000/0000/0000/0000"), EMPTY]
    slice_mean = np.mean([dice(p, t) for p, t in zip(preds, truths)])
    assert slice_mean == pytest.approx(2 / 3)
    # Pooled: tp=16, fp=1, fn=1 -> 32/34; the empty slice adds nothing.
    assert patient_dice(preds, truths) == pytest.approx(16 / 17)
    assert patient_dice(preds[:2], truths[:2]) == pytest.approx(16 / 17)
    assert patient_dice(preds[::-1], truths[::-1]) == pytest.approx(16 / 17)


@pytest.mark.parametrize(
    "preds, truths, expected",
    [
        ([EMPTY, EMPTY], [EMPTY, EMPTY], 1.0),  # tumour-free patient, nothing predicted
        ([EMPTY, TOP_LEFT], [EMPTY, EMPTY], 0.0),  # tumour-free patient, a false alarm
        ([EMPTY, EMPTY], [TOP_LEFT, EMPTY], 0.0),  # lesion missed everywhere
    ],
    ids=["free-clean", "free-false-alarm", "all-missed"],
)
def test_patient_dice_edge_cases(preds, truths, expected):
    assert patient_dice(preds, truths) == expected


def test_patient_dice_input_errors():
    with pytest.raises(ValueError):
        patient_dice([], [])
    with pytest.raises(ValueError):
        patient_dice([EMPTY], [EMPTY, EMPTY])


# --- slice detection --------------------------------------------------------------------------


def test_detection_counts_hand_case():
    pred = [True, True, False, False, True, False]
    truth = [True, False, True, False, True, False]
    d = detection_counts(pred, truth)
    assert d == DetectionCounts(tp=2, fp=1, fn=1, tn=2)
    assert d.sensitivity == pytest.approx(2 / 3)
    assert d.specificity == pytest.approx(2 / 3)
    assert d.far == pytest.approx(1 / 3)
    assert d.frr == pytest.approx(1 / 3)
    assert d.accuracy == pytest.approx(4 / 6)


# counts, names of the rates that are NaN
ZERO_DENOMINATORS = [
    (DetectionCounts(fp=1, tn=3), {"sensitivity", "frr"}),  # no tumour slice
    (DetectionCounts(tp=2, fn=1), {"specificity", "far"}),  # no tumour-free slice
    (DetectionCounts(), {"sensitivity", "frr", "specificity", "far", "accuracy"}),  # no slices
]


@pytest.mark.parametrize(
    "counts, undefined", ZERO_DENOMINATORS, ids=["no-tumour", "all-tumour", "none"]
)
def test_detection_zero_denominators_are_nan(counts, undefined):
    rates = ("sensitivity", "specificity", "far", "frr", "accuracy")
    for rate in rates:
        value = getattr(counts, rate)
        assert math.isnan(value) == (rate in undefined), rate
    as_json = counts.as_dict()
    assert {r for r in rates if as_json[r] is None} == undefined


def test_detection_rates_are_complements():
    d = DetectionCounts(tp=5, fp=2, fn=3, tn=7)
    assert d.far == pytest.approx(1 - d.specificity)
    assert d.frr == pytest.approx(1 - d.sensitivity)
    assert d + d == DetectionCounts(tp=10, fp=4, fn=6, tn=14)


def test_detection_counts_length_mismatch():
    with pytest.raises(ValueError):
        detection_counts([True], [True, False])


# --- accumulator and summary ------------------------------------------------------------------


def random_rows(seed: int = 0, patients: int = 4, slices: int = 7, size: int = 16) -> list[dict]:
    """Per-slice rows with a mix of tumour, tumour-free, missed and false-alarm slices."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        for s in range(slices):
            truth = rng.random((size, size)) < (0.3 if s % 3 else 0.0)  # every third slice free
            pred = truth ^ (rng.random((size, size)) < 0.1)
            if s == 4:
                pred[:] = False  # a slice where the model saw nothing
            rows.append({"patient_id": f"TCGA_CS_{p:04d}", "pred": pred, "truth": truth})
    return rows


def assert_close(a, b):
    """Recursive equality with float tolerance (sums may be taken in another order)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_close(a[k], b[k])
    elif isinstance(a, float):
        assert b == pytest.approx(a)
    else:
        assert a == b


@pytest.mark.parametrize("batch_size", [1, 3, 5, 28])
def test_accumulator_over_batches_equals_summarize(batch_size):
    rows = random_rows()
    acc = SegmentationMetrics()
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        acc.update(
            [r["patient_id"] for r in batch],
            np.stack([r["pred"] for r in batch]),
            np.stack([r["truth"] for r in batch]),
        )
    assert_close(summarize(rows), acc.compute())


def test_summary_ignores_row_order_and_merges_across_workers():
    rows = random_rows(seed=1)
    shuffled = [rows[i] for i in np.random.default_rng(2).permutation(len(rows))]
    expected = summarize(rows)
    assert_close(expected, summarize(iter(shuffled)))  # a generator is enough

    halves = [SegmentationMetrics(), SegmentationMetrics()]
    for i, r in enumerate(shuffled):
        halves[i % 2].update([r["patient_id"]], r["pred"][None], r["truth"][None])
    assert_close(expected, halves[0].merge(halves[1]).compute())


def test_summary_matches_the_single_metric_functions():
    rows = random_rows(seed=3)
    out = summarize(rows)
    by_patient: dict[str, list[dict]] = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], []).append(r)
    expected = {
        pid: patient_dice([r["pred"] for r in rs], [r["truth"] for r in rs])
        for pid, rs in by_patient.items()
    }
    assert out["patient_dice"] == pytest.approx(expected)
    assert out["patient_dice_mean"] == pytest.approx(np.mean(list(expected.values())))
    assert out["num_patients"] == 4 and out["num_slices"] == len(rows)

    pooled = pixel_counts(np.stack([r["pred"] for r in rows]), np.stack([r["truth"] for r in rows]))
    assert out["pixel"] == pytest.approx(pooled.as_dict())

    det = detection_counts([r["pred"].any() for r in rows], [r["truth"].any() for r in rows])
    assert out["detection"] == pytest.approx(det.as_dict())
    json.dumps(out, allow_nan=False)


def test_slice_means_use_tumour_slices_only():
    rows = [
        {"patient_id": "A", "pred": TOP_LEFT, "truth": TOP_LEFT},  # tumour, Dice 1, IoU 1
        {"patient_id": "A", "pred": m("0110/0110/0000/0000"), "truth": TOP_LEFT},  # 0.5, 1/3
        {"patient_id": "A", "pred": TOP_LEFT, "truth": EMPTY},  # free, false alarm: Dice 0
        {"patient_id": "B", "pred": EMPTY, "truth": EMPTY},  # free, clean: Dice 1
    ]
    out = summarize(rows)
    assert out["num_tumour_slices"] == 2
    assert out["slice_dice_mean"] == pytest.approx(0.75)
    assert out["slice_iou_mean"] == pytest.approx(2 / 3)
    # Patient B is tumour-free and clean: 1.0 by convention, left out of the tumour-only mean.
    assert out["patient_dice"]["B"] == 1.0
    assert out["patient_dice"]["A"] == pytest.approx(2 * 6 / (2 * 6 + 6 + 2))  # tp 6, fp 6, fn 2
    assert out["patient_dice_mean_tumour"] == pytest.approx(out["patient_dice"]["A"])
    assert out["detection"]["fp"] == 1 and out["detection"]["tn"] == 1


def test_summary_of_nothing_is_json_with_nones():
    out = summarize([])
    assert out["patient_dice_mean"] is None and out["slice_dice_mean"] is None
    assert out["num_slices"] == 0 and out["patient_dice"] == {}
    assert out["detection"]["sensitivity"] is None
    json.dumps(out, allow_nan=False)


def test_tumour_free_set_has_undefined_slice_figures():
    rows = [{"patient_id": "A", "pred": EMPTY, "truth": EMPTY}] * 3
    out = summarize(rows)
    assert out["patient_dice_mean"] == 1.0 and out["patient_dice_mean_tumour"] is None
    assert out["slice_dice_mean"] is None and out["slice_iou_mean"] is None
    assert out["detection"]["specificity"] == 1.0 and out["detection"]["sensitivity"] is None
    json.dumps(out, allow_nan=False)


def test_update_accepts_channel_axis_and_checks_inputs():
    acc = SegmentationMetrics()
    batch = np.stack([TOP_LEFT, EMPTY])[:, None].astype(np.uint8)  # [N,1,H,W] like a model output
    acc.update(["A", "A"], batch, batch)
    acc.update([], np.zeros((0, 4, 4), bool), np.zeros((0, 4, 4), bool))  # empty batch: no-op
    assert acc.compute()["patient_dice"] == {"A": 1.0}
    assert acc.num_slices == 2
    with pytest.raises(ValueError, match="patient ids"):
        acc.update(["A"], batch, batch)
    with pytest.raises(ValueError, match="shape"):
        acc.update(["A"], TOP_LEFT, TOP_LEFT)  # one slice without a batch axis
    with pytest.raises(ValueError):
        acc.update(["A", "A"], batch * 255, batch)
