"""Data profile of an ingest: counts, per-channel statistics and the PNG chart."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from matplotlib import image as mpimg

from brainseg_ray.data.profile import CHANNEL_NAMES, build_profile, institution_of, plot_profile

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def stats_row(patient_id: str, has_tumor: bool | None, pixels: np.ndarray) -> dict:
    """The ingest job's per-slice row for an (H, W, 3) uint8 slice."""
    flat = pixels.reshape(-1, 3).astype(np.float64)
    return {
        "patient_id": patient_id,
        "has_tumor": has_tumor,
        "channel_sum": flat.sum(axis=0).tolist(),
        "channel_sumsq": (flat**2).sum(axis=0).tolist(),
        "pixels": flat.shape[0],
    }


def random_slice(rng: np.random.Generator, shape=(16, 16), mean=(20.0, 60.0, 25.0)) -> np.ndarray:
    return rng.normal(mean, 30.0, size=(*shape, 3)).clip(0, 255).round().astype(np.uint8)


# --- institution_of ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "patient_id,institution",
    [
        ("TCGA_CS_4943_20000902", "CS"),
        ("TCGA_HT_A61B_19991127", "HT"),
        ("TCGA_DU_5849", "DU"),
        ("TCGA_EZ", "EZ"),
        ("TCGA", ""),
        ("", ""),
        ("TCGA__4943", ""),
    ],
)
def test_institution_of(patient_id, institution):
    assert institution_of(patient_id) == institution


# --- build_profile: counts --------------------------------------------------------------------


def test_counts_hand_computed():
    flat = np.zeros((2, 2, 3), dtype=np.uint8)
    rows = [
        stats_row("TCGA_CS_0001_20000101", True, flat),
        stats_row("TCGA_CS_0001_20000101", False, flat),
        stats_row("TCGA_CS_0001_20000101", None, flat),
        stats_row("TCGA_CS_0002_20000101", False, flat),
        stats_row("TCGA_HT_0003_20000101", True, flat),
        stats_row("TCGA_HT_0003_20000101", True, flat),
        stats_row("TCGA_DU_0004_20000101", None, flat),
    ]
    profile = build_profile(rows)
    assert profile["patients"] == 4
    assert profile["slices"] == 7
    assert profile["tumour_slices"] == 3
    assert profile["unlabelled_slices"] == 2
    assert profile["patients_with_tumour"] == 2
    assert profile["institutions"] == {
        "CS": {"patients": 2, "slices": 4, "tumour_slices": 1, "unlabelled_slices": 1},
        "DU": {"patients": 1, "slices": 1, "tumour_slices": 0, "unlabelled_slices": 1},
        "HT": {"patients": 1, "slices": 2, "tumour_slices": 2, "unlabelled_slices": 0},
    }
    assert list(profile["institutions"]) == ["CS", "DU", "HT"]


def test_unlabelled_slices_are_not_tumour_free():
    flat = np.zeros((2, 2, 3), dtype=np.uint8)
    profile = build_profile([stats_row("TCGA_FG_0001_20000101", None, flat)] * 3)
    assert (profile["slices"], profile["tumour_slices"], profile["unlabelled_slices"]) == (3, 0, 3)
    counts = profile["institutions"]["FG"]
    assert counts["slices"] - counts["tumour_slices"] - counts["unlabelled_slices"] == 0


def test_missing_has_tumor_counts_as_unlabelled():
    row = stats_row("TCGA_CS_0001_20000101", True, np.zeros((2, 2, 3), dtype=np.uint8))
    del row["has_tumor"]
    assert build_profile([row])["unlabelled_slices"] == 1


def test_numpy_bools_are_counted():
    flat = np.zeros((2, 2, 3), dtype=np.uint8)
    rows = [stats_row("TCGA_CS_0001_20000101", flag, flat) for flag in (np.bool_(True), np.bool_(False))]
    assert build_profile(rows)["tumour_slices"] == 1


def test_ids_without_institution_group_under_empty_name():
    flat = np.zeros((2, 2, 3), dtype=np.uint8)
    profile = build_profile([stats_row("anonymous", False, flat)])
    assert profile["institutions"] == {
        "": {"patients": 1, "slices": 1, "tumour_slices": 0, "unlabelled_slices": 0}
    }


def test_empty_profile():
    profile = build_profile([])
    assert profile == {
        "patients": 0,
        "slices": 0,
        "tumour_slices": 0,
        "unlabelled_slices": 0,
        "patients_with_tumour": 0,
        "institutions": {},
        "channels": {"names": list(CHANNEL_NAMES), "mean": [None] * 3, "std": [None] * 3},
    }


def test_rows_without_pixels_leave_channel_stats_unknown():
    row = {"patient_id": "TCGA_CS_0001_20000101", "has_tumor": False, "channel_sum": [0, 0, 0],
           "channel_sumsq": [0, 0, 0], "pixels": 0}
    profile = build_profile([row])
    assert profile["slices"] == 1
    assert profile["channels"]["mean"] == [None] * 3


# --- build_profile: channel statistics --------------------------------------------------------


@pytest.mark.parametrize("n_slices,shape", [(1, (4, 4)), (5, (16, 16)), (40, (32, 8))])
def test_channel_mean_std_match_numpy(n_slices, shape):
    rng = np.random.default_rng(n_slices)
    slices = [random_slice(rng, shape, mean=rng.uniform(0, 200, 3)) for _ in range(n_slices)]
    rows = (stats_row(f"TCGA_CS_{i:04d}_20000101", bool(i % 2), s) for i, s in enumerate(slices))
    profile = build_profile(rows)  # a generator: the profile must need only one pass
    pixels = np.concatenate([s.reshape(-1, 3) for s in slices]).astype(np.float64)
    np.testing.assert_allclose(profile["channels"]["mean"], pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(profile["channels"]["std"], pixels.std(axis=0), rtol=1e-9)


def test_channel_stats_hand_computed():
    # Channel 0 holds 0 and 2 (mean 1, std 1); channel 1 is flat 10; channel 2 holds 0 and 255.
    first = np.array([[[0, 10, 0]]], dtype=np.uint8)
    second = np.array([[[2, 10, 255]]], dtype=np.uint8)
    profile = build_profile([stats_row("TCGA_CS_0001_20000101", True, first),
                             stats_row("TCGA_CS_0001_20000101", False, second)])
    assert profile["channels"]["mean"] == pytest.approx([1.0, 10.0, 127.5])
    assert profile["channels"]["std"] == pytest.approx([1.0, 0.0, 127.5])


def test_flat_slices_give_zero_std_not_nan():
    bright = np.full((64, 64, 3), 255, dtype=np.uint8)
    rows = [stats_row("TCGA_CS_0001_20000101", False, bright)] * 50
    # A producer's rounding can leave sumsq a hair below sum**2 / n: variance must clamp to 0.
    rows.append({**rows[0], "channel_sumsq": [s * (1 - 1e-12) for s in rows[0]["channel_sumsq"]]})
    std = build_profile(rows)["channels"]["std"]
    assert std == [0.0, 0.0, 0.0]


def test_std_is_stable_with_large_offset():
    # Values 254/255 over ~500k pixels: mean**2 dwarfs the variance. The one-shot
    # sqrt(sumsq/n - mean**2) is off by ~2e-11 relative here; merging per-slice moments stays
    # within ~4e-12. (Both are fine for 0..255 in float64; this guards against regressions.)
    rng = np.random.default_rng(0)
    slices = [rng.integers(254, 256, size=(128, 128, 3)).astype(np.uint8) for _ in range(30)]
    profile = build_profile(stats_row("TCGA_CS_0001_20000101", False, s) for s in slices)
    pixels = np.concatenate([s.reshape(-1, 3) for s in slices]).astype(np.float64)
    np.testing.assert_allclose(profile["channels"]["std"], pixels.std(axis=0), rtol=1e-11)


def test_profile_is_json_ready():
    rng = np.random.default_rng(1)
    rows = [stats_row("TCGA_HT_0001_20000101", True, random_slice(rng))]
    profile = build_profile(rows)
    assert json.loads(json.dumps(profile)) == profile
    assert all(type(v) is float for v in profile["channels"]["mean"] + profile["channels"]["std"])


@pytest.mark.parametrize(
    "change,message",
    [
        ({"channel_sum": [1.0, 2.0]}, "3 values"),
        ({"channel_sumsq": [1.0, 2.0, 3.0, 4.0]}, "3 values"),
        ({"pixels": -1}, "pixels must be >= 0"),
    ],
)
def test_bad_rows_are_rejected(change, message):
    row = stats_row("TCGA_CS_0001_20000101", False, np.zeros((2, 2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=message):
        build_profile([{**row, **change}])


# --- plot_profile -----------------------------------------------------------------------------


def sample_profile() -> dict:
    rng = np.random.default_rng(2)
    rows = []
    for institution, patients in {"CS": 3, "DU": 4, "HT": 2}.items():
        for p in range(patients):
            for s in range(6):
                has_tumor = None if institution == "DU" and s == 0 else bool(s % 3 == 0)
                rows.append(stats_row(f"TCGA_{institution}_{p:04d}_20000101", has_tumor, random_slice(rng)))
    return build_profile(rows)


def assert_png(data: bytes) -> None:
    assert data.startswith(PNG_SIGNATURE)
    image = mpimg.imread(io.BytesIO(data), format="png")
    height, width = image.shape[:2]
    assert height >= 200 and width >= 400
    assert image.std() > 0  # something was drawn


@pytest.mark.parametrize("profile", [sample_profile(), build_profile([])], ids=["sample", "empty"])
def test_plot_writes_png_file(tmp_path, profile):
    path = tmp_path / "profile.png"
    plot_profile(profile, path)
    assert_png(path.read_bytes())


def test_plot_accepts_str_path_and_binary_stream(tmp_path):
    profile = sample_profile()
    plot_profile(profile, str(tmp_path / "profile.png"))
    assert_png((tmp_path / "profile.png").read_bytes())
    buffer = io.BytesIO()
    plot_profile(profile, buffer)
    assert_png(buffer.getvalue())


def test_plot_reads_a_profile_back_from_json(tmp_path):
    # The chart may be drawn later from a manifest.json, where the profile went through JSON.
    profile = json.loads(json.dumps(sample_profile()))
    plot_profile(profile, tmp_path / "profile.png")
    assert_png((tmp_path / "profile.png").read_bytes())
