"""Post-processing (masks, 2-D/3-D components, findings) against hand-made arrays.

numpy/scipy only: no torch, no Ray.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from brainseg_ray.inference.postprocess import (
    Findings,
    PostprocessOptions,
    binarize,
    findings,
    keep_largest_component_3d,
    patient_volume_mm3,
    postprocess,
    remove_faint_components,
    remove_small_components,
)


def m(rows: str) -> np.ndarray:
    """A uint8 {0,1} slice from '1100/1100/0000' (rows split by '/')."""
    return np.array([[int(c) for c in row] for row in rows.split("/")], dtype=np.uint8)


def vol(*slices: str) -> np.ndarray:
    return np.stack([m(s) for s in slices])


def assert_mask(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.uint8
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual, expected)


# ------------------------------------------------------------------------------------ binarize

# name, probabilities, threshold, expected
BINARIZE_CASES = [
    ("strictly greater", [0.49, 0.5, 0.51, 0.0, 1.0], 0.5, [0, 0, 1, 0, 1]),
    ("threshold 0: zero is background", [0.0, 1e-6, 0.0, 0.2, 0.0], 0.0, [0, 1, 0, 1, 0]),
    ("threshold 1: nothing passes", [1.0, 0.99, 1.0, 0.5, 0.0], 1.0, [0, 0, 0, 0, 0]),
    # float32(0.3) != 0.3 in float64: the threshold is compared in the map's dtype either way
    ("float32 at python-float threshold", [0.3, 0.30000004, 0.29999998, 0.3, 0.3], 0.3, [0, 1, 0, 0, 0]),
    ("float32 at numpy-float64 threshold", [0.3, 0.30000004, 0.29999998, 0.3, 0.3], np.float64(0.3),
     [0, 1, 0, 0, 0]),
    ("NaN is background", [np.nan, 0.9, np.nan, 0.1, 0.6], 0.5, [0, 1, 0, 0, 1]),
]


@pytest.mark.parametrize("probs, threshold, expected", [c[1:] for c in BINARIZE_CASES],
                         ids=[c[0] for c in BINARIZE_CASES])
def test_binarize(probs, threshold, expected):
    p = np.array(probs, dtype=np.float32).reshape(1, 1, 5)
    assert_mask(binarize(p, threshold), np.array(expected, np.uint8).reshape(1, 1, 5))
    assert_mask(binarize(p[0], threshold), np.array(expected, np.uint8).reshape(1, 5))


def test_binarize_does_not_modify_input():
    p = np.array([[0.2, 0.8]], np.float32)
    binarize(p, 0.5)
    np.testing.assert_array_equal(p, np.array([[0.2, 0.8]], np.float32))


# --------------------------------------------------------------------- remove_small_components

# name, masks [N,H,W], min_px, expected
SMALL_CASES = [
    ("diagonal chain is one component of 3, kept at exactly min_px",
     vol("1000/0100/0010"), 3, vol("1000/0100/0010")),
    ("diagonal chain of 3 removed at min_px 4",
     vol("1000/0100/0010"), 4, vol("0000/0000/0000")),
    # four pixels touching only at corners: one 8-connected component (4 singletons if 4-connected)
    ("checker row joins through diagonals",
     vol("1010/0101/0000"), 4, vol("1010/0101/0000")),
    ("speck dropped, block kept",
     vol("1100/1100/0001"), 2, vol("1100/1100/0000")),
    ("per slice: block of 4 kept, pair removed at min_px 3",
     vol("1100/1100/0000", "0000/0000/0011"), 3, vol("1100/1100/0000", "0000/0000/0000")),
    # the same two pixels in consecutive slices: 2 + 2, never 4, because slices do not connect
    ("no connection across slices",
     vol("1100/0000/0000", "1100/0000/0000"), 3, vol("0000/0000/0000", "0000/0000/0000")),
    ("empty stays empty",
     vol("0000/0000/0000"), 5, vol("0000/0000/0000")),
]


@pytest.mark.parametrize("masks, min_px, expected", [c[1:] for c in SMALL_CASES],
                         ids=[c[0] for c in SMALL_CASES])
def test_remove_small_components(masks, min_px, expected):
    before = masks.copy()
    assert_mask(remove_small_components(masks, min_px), expected)
    np.testing.assert_array_equal(masks, before)


def test_remove_small_components_single_slice_and_bool():
    out = remove_small_components(m("1100/1100/0001").astype(bool), 2)
    assert_mask(out, m("1100/1100/0000"))


@pytest.mark.parametrize("min_px", [0, 1, -3])
def test_remove_small_components_identity(min_px):
    masks = vol("1000/0001/0000", "0100/0000/0010")
    assert remove_small_components(masks, min_px) is masks


@pytest.mark.parametrize("bad", [np.full((1, 2, 2), 255, np.uint8), np.full((1, 2, 2), 0.7, np.float32)])
def test_remove_small_components_rejects_non_binary(bad):
    with pytest.raises(ValueError, match="0 and 1"):
        remove_small_components(bad, 2)


# -------------------------------------------------------------------- keep_largest_component_3d

# name, volume [S,H,W], expected
LARGEST_CASES = [
    # (0,0) -> (1,1) -> (2,2) one slice apart each (corner neighbours): 3 px only through
    # 26-connectivity; the 2-px bar in the last slice would win under 6- or 18-connectivity
    ("corner diagonal across slices joins",
     vol("10000/00000/00000", "00000/01000/00000", "00011/00000/00100"),
     vol("10000/00000/00000", "00000/01000/00000", "00000/00000/00100")),
    ("face neighbours across slices join",
     vol("00000/01100/00000/00000", "00000/01100/00000/00000", "00000/00000/00000/00001"),
     vol("00000/01100/00000/00000", "00000/01100/00000/00000", "00000/00000/00000/00000")),
    # two 2-px components: the one in slice 0 holds the lowest flat index although it sits in
    # the last row of its slice
    ("tie goes to lowest flat index",
     vol("0000/0000/0011", "1100/0000/0000"),
     vol("0000/0000/0011", "0000/0000/0000")),
    ("single component unchanged",
     vol("0110/0110/0000", "0010/0000/0000"),
     vol("0110/0110/0000", "0010/0000/0000")),
    ("two slices apart do not connect",
     vol("1100/0000", "0000/0000", "1000/0000"),
     vol("1100/0000", "0000/0000", "0000/0000")),
    ("empty stays empty",
     vol("000/000", "000/000"),
     vol("000/000", "000/000")),
]


@pytest.mark.parametrize("volume, expected", [c[1:] for c in LARGEST_CASES],
                         ids=[c[0] for c in LARGEST_CASES])
def test_keep_largest_component_3d(volume, expected):
    before = volume.copy()
    assert_mask(keep_largest_component_3d(volume), expected)
    np.testing.assert_array_equal(volume, before)


def test_keep_largest_component_3d_no_slices_and_bad_shape():
    assert_mask(keep_largest_component_3d(np.zeros((0, 4, 4), np.uint8)), np.zeros((0, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\[S,H,W\]"):
        keep_largest_component_3d(m("10/01"))


# ---------------------------------------------------------------------------------- postprocess


def probs_from(masks: np.ndarray, on: float = 0.9, off: float = 0.1) -> np.ndarray:
    return np.where(masks > 0, on, off).astype(np.float32)


def test_postprocess_orders_by_slice_index_not_input_order():
    # True order 0,1,2: (0,0) -> (1,1) -> (2,2) is a 3-px diagonal chain, beating the 2-px bar in
    # slice 2. Stacked in the input order (2,0,1) the chain would break and the bar would win.
    slice0, slice1, slice2 = "10000/00000/00000", "00000/01000/00000", "00011/00000/00100"
    given = vol(slice2, slice0, slice1)
    out = postprocess(probs_from(given), PostprocessOptions(largest_component_3d=True),
                      patient_ids=["p", "p", "p"], slice_indices=[2, 0, 1])
    assert_mask(out, vol("00000/00000/00100", slice0, slice1))
    # the same slices given in slice order agree, and stacking in input order would not
    in_order = postprocess(probs_from(vol(slice0, slice1, slice2)), PostprocessOptions(largest_component_3d=True),
                           patient_ids=["p", "p", "p"], slice_indices=[0, 1, 2])
    np.testing.assert_array_equal(in_order[[2, 0, 1]], out)
    assert_mask(keep_largest_component_3d(given), vol("00011/00000/00000", "00000/00000/00000", "00000/00000/00000"))


def test_postprocess_patients_are_independent():
    # Interleaved patients sharing slice indices. "a" keeps its 4-px block, "b" keeps its lone
    # pixel although it is smaller than a's dropped pair: components never cross patients.
    given = vol("1100/1100/0000", "0000/0000/0010", "0001/0001/0000", "0000/0000/0000")
    out = postprocess(probs_from(given), PostprocessOptions(largest_component_3d=True),
                      patient_ids=["a", "b", "a", "b"], slice_indices=[0, 0, 1, 1])
    assert_mask(out, vol("1100/1100/0000", "0000/0000/0010", "0000/0000/0000", "0000/0000/0000"))


def test_postprocess_full_pipeline():
    probs = np.array([
        [[0.9, 0.8, 0.0, 0.0],
         [0.7, 0.5, 0.0, 0.6],   # 0.5 is not > 0.5; 0.6 is a 1-px speck
         [0.0, 0.0, 0.0, 0.0]],
        [[0.0, 0.0, 0.0, 0.0],
         [0.0, 0.0, 0.0, 0.0],
         [0.0, 0.0, 0.95, 0.95]],  # a pair, not touching the block: dropped by the 3-D step
    ], dtype=np.float32)
    options = PostprocessOptions(threshold=0.5, min_component_px=2, largest_component_3d=True)
    out = postprocess(probs, options, patient_ids=["p", "p"], slice_indices=[4, 5])
    assert_mask(out, vol("1100/1000/0000", "0000/0000/0000"))
    # without the 3-D step the pair stays and ids are not needed
    out = postprocess(probs, dataclasses.replace(options, largest_component_3d=False))
    assert_mask(out, vol("1100/1000/0000", "0000/0000/0011"))


def test_postprocess_defaults_and_single_slice():
    p = np.array([[0.2, 0.6], [0.5, 0.51]], np.float32)
    assert_mask(postprocess(p), m("01/01"))
    out = postprocess(p, PostprocessOptions(largest_component_3d=True), patient_ids=["p"], slice_indices=[0])
    assert_mask(out, m("01/01"))


@pytest.mark.parametrize("ids, indices, match", [
    (None, [0, 1], "patient_ids"),
    (["p", "p"], None, "slice_indices"),
    (None, None, "patient_ids and slice_indices"),
    (["p"], [0, 1], "2 slices"),
    (["p", "p"], [3, 3], "more than once"),
])
def test_postprocess_3d_needs_ids(ids, indices, match):
    probs = np.zeros((2, 3, 3), np.float32)
    with pytest.raises(ValueError, match=match):
        postprocess(probs, PostprocessOptions(largest_component_3d=True), patient_ids=ids, slice_indices=indices)


@pytest.mark.parametrize("kwargs", [
    {"threshold": float("nan")},
    {"min_component_px": -1},
    {"min_component_px": 2.5},
    {"pixel_spacing_mm": 0.0},
    {"slice_thickness_mm": -1.0},
    {"min_component_peak": 1.5},
    {"keep_3d_fraction": 0.0},
    {"keep_3d_fraction": 1.2},
])
def test_options_validation(kwargs):
    with pytest.raises(ValueError):
        PostprocessOptions(**kwargs)


# (name, probabilities of one slice, min_peak, expected mask at threshold 0.5)
FAINT_CASES = [
    ("both kept at 0", [[0.6, 0, 0, 0.9]], 0.0, "1001"),
    ("faint speck dropped", [[0.6, 0, 0, 0.9]], 0.8, "0001"),
    ("peak equal to the limit is kept", [[0.6, 0, 0, 0.8]], 0.8, "0001"),
    ("a faint pixel joined to a sure one survives", [[0.6, 0.95, 0, 0.7]], 0.9, "1100"),
    ("nothing sure: empty", [[0.6, 0, 0, 0.7]], 0.9, "0000"),
    ("diagonal neighbours are one component", [[0.6, 0], [0, 0.99]], 0.9, "10/01"),
]


@pytest.mark.parametrize("probs, min_peak, expected", [c[1:] for c in FAINT_CASES], ids=[c[0] for c in FAINT_CASES])
def test_remove_faint_components(probs, min_peak, expected):
    probs = np.array(probs, np.float32)
    out = remove_faint_components(binarize(probs, 0.5), probs, min_peak)
    assert_mask(out, m(expected))
    # The same through postprocess, which Serve runs on one slice.
    assert_mask(postprocess(probs, PostprocessOptions(min_component_peak=min_peak)), m(expected))


def test_remove_faint_components_is_per_slice_and_checks_shapes():
    probs = np.array([[[0.6, 0.0]], [[0.0, 0.95]]], np.float32)  # one weak, one sure slice
    assert_mask(remove_faint_components(binarize(probs, 0.5), probs, 0.9), vol("00", "01"))
    with pytest.raises(ValueError, match="differ in shape"):
        remove_faint_components(np.zeros((2, 2), np.uint8), np.zeros((3, 3), np.float32), 0.5)


# (name, volume, fraction, expected): sizes 4 (slices 0-1), 2 and 1
FRACTION_CASES = [
    ("largest only", 1.0, vol("1100/0000/0001", "1100/0000/0001"), vol("1100/0000/0000", "1100/0000/0000")),
    ("half keeps the size-4 and size-2 ones", 0.5, vol("1100/0000/0001", "1100/0000/0001"),
     vol("1100/0000/0001", "1100/0000/0001")),
    ("0.6 keeps the largest only", 0.6, vol("1100/0000/0001", "1100/0000/0001"), vol("1100/0000/0000", "1100/0000/0000")),
    ("a tiny fraction keeps all", 0.01, vol("1100/0000/0001", "1100/0000/0000"), vol("1100/0000/0001", "1100/0000/0000")),
]


@pytest.mark.parametrize("fraction, volume, expected", [c[1:] for c in FRACTION_CASES], ids=[c[0] for c in FRACTION_CASES])
def test_keep_3d_fraction(fraction, volume, expected):
    assert_mask(keep_largest_component_3d(volume, fraction), expected)
    options = PostprocessOptions(largest_component_3d=True, keep_3d_fraction=fraction)
    out = postprocess(volume.astype(np.float32), options, ["p"] * len(volume), list(range(len(volume))))
    assert_mask(out, expected)


def test_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PostprocessOptions().threshold = 0.3


# ------------------------------------------------------------------------------------- findings


def test_findings_hand_made():
    mask = m("000000/001110/000100/000000/000000")  # 4 px: rows 1..2, columns 2..4
    probs = np.zeros((5, 6), np.float32)
    probs[1, 2:5] = [0.6, 0.8, 1.0]
    probs[2, 3] = 0.6
    (f,) = findings(mask[None], probs[None], pixel_spacing_mm=0.5)
    assert f.tumor_present is True
    assert f.tumor_area_px == 4
    assert f.tumor_area_mm2 == pytest.approx(4 * 0.25)
    assert f.bbox == (2, 1, 5, 3)  # x0, y0 inclusive; x1, y1 exclusive
    assert mask[f.bbox[1]:f.bbox[3], f.bbox[0]:f.bbox[2]].sum() == 4
    assert f.mean_probability == pytest.approx(3.0 / 4)
    assert f.confidence == pytest.approx(0.75)
    assert f.max_probability == pytest.approx(1.0)


def test_findings_empty_mask():
    probs = np.full((4, 4), 0.1, np.float32)
    probs[3, 0] = 0.3
    (f,) = findings(np.zeros((4, 4), np.uint8), probs)  # a single [H,W] slice
    assert f == Findings(tumor_present=False, tumor_area_px=0, tumor_area_mm2=0.0, bbox=None,
                         confidence=pytest.approx(0.7), max_probability=pytest.approx(0.3),
                         mean_probability=0.0)
    assert f.as_dict() == {"tumor_present": False, "tumor_area_px": 0, "tumor_area_mm2": 0.0, "bbox": None,
                           "confidence": pytest.approx(0.7), "max_probability": pytest.approx(0.3),
                           "mean_probability": 0.0}


# name, mask, expected bbox
BBOX_CASES = [
    ("single pixel", "0000/0000/0001/0000", (3, 2, 4, 3)),
    ("full slice", "1111/1111/1111/1111", (0, 0, 4, 4)),
    ("two far pixels", "0100/0000/0000/1000", (0, 0, 2, 4)),
    ("bottom-right corner", "0000/0000/0000/0001", (3, 3, 4, 4)),
]


def test_findings_batch_matches_per_slice():
    masks = np.stack([m(c[1]) for c in BBOX_CASES] + [m("0000/0000/0000/0000")])
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.0, 1.0, masks.shape).astype(np.float32)
    batch = findings(masks, probs, pixel_spacing_mm=2.0)
    assert len(batch) == len(masks)
    for i, (name, _, bbox) in enumerate(BBOX_CASES):
        assert batch[i].bbox == bbox, name
        assert batch[i].tumor_area_px == int(masks[i].sum())
        assert batch[i].tumor_area_mm2 == pytest.approx(4.0 * masks[i].sum())
        assert batch[i].mean_probability == pytest.approx(float(probs[i][masks[i] == 1].mean()))
        assert batch[i] == findings(masks[i], probs[i], pixel_spacing_mm=2.0)[0]
    assert batch[-1].bbox is None
    assert batch[-1].confidence == pytest.approx(1.0 - float(probs[-1].max()))


def test_findings_as_dict_is_json():
    (f,) = findings(m("0110/0000")[None], np.full((1, 2, 4), 0.75, np.float32))
    d = json.loads(json.dumps(f.as_dict()))
    assert d == {"tumor_present": True, "tumor_area_px": 2, "tumor_area_mm2": 2.0, "bbox": [1, 0, 3, 1],
                 "confidence": 0.75, "max_probability": 0.75, "mean_probability": 0.75}
    assert all(type(v) in (bool, int, float) for k, v in f.as_dict().items() if k != "bbox")


def test_findings_edge_cases():
    assert findings(np.zeros((0, 4, 4), np.uint8), np.zeros((0, 4, 4), np.float32)) == []
    with pytest.raises(ValueError, match="shape"):
        findings(np.zeros((1, 4, 4), np.uint8), np.zeros((1, 4, 5), np.float32))
    with pytest.raises(ValueError, match="0 and 1"):
        findings(np.full((1, 2, 2), 255, np.uint8), np.zeros((1, 2, 2), np.float32))


# -------------------------------------------------------------------------------------- volume

@pytest.mark.parametrize("areas, spacing, thickness, expected", [
    ([10, 0, 30], 0.5, 3.0, 40 * 0.25 * 3.0),   # 30.0
    ([100], 1.0, 1.0, 100.0),
    ([7, 5], 2.0, 0.5, 12 * 4.0 * 0.5),          # 24.0
    ([], 0.5, 3.0, 0.0),
])
def test_patient_volume_mm3(areas, spacing, thickness, expected):
    assert patient_volume_mm3(areas, spacing, thickness) == pytest.approx(expected)


def test_patient_volume_mm3_rejects_bad_input():
    with pytest.raises(ValueError):
        patient_volume_mm3([3, -1], 1.0, 1.0)
    with pytest.raises(ValueError):
        patient_volume_mm3([3], 0.0, 1.0)
