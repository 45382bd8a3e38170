"""The synthetic kaggle_3m generator: layout, determinism and image content."""

from __future__ import annotations

import csv
import re
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from brainseg_ray.data.synthetic import CSV_HEADER, SyntheticSummary, write_synthetic_dataset
from brainseg_ray.data.synthetic_volume import synthesize_patient

ID_RE = re.compile(r"^SYN_(AA|BB|CC|DD)_[0-9A-Z]{4}_(\d{8})$")
SLICE_RE = re.compile(r"^(?P<pid>.+)_(?P<i>\d+)(?P<mask>_mask)?\.tif$")

# Small volumes keep the suite fast; the in-plane size stays the real 256.
SMALL = dict(slices_per_patient=(6, 9))


def _write(out: Path, **kwargs) -> SyntheticSummary:
    return write_synthetic_dataset(str(out), **{**SMALL, **kwargs})


def _files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def _patient_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def _volume(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    n = len(list(folder.glob("*_mask.tif")))
    images = np.stack([tifffile.imread(folder / f"{folder.name}_{i}.tif") for i in range(1, n + 1)])
    masks = np.stack([tifffile.imread(folder / f"{folder.name}_{i}_mask.tif")
                      for i in range(1, n + 1)])
    return images, masks


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[SyntheticSummary, Path]:
    summary = _write(tmp_path_factory.mktemp("syn"), patients=5, seed=3)
    return summary, Path(summary.root)


# ----------------------------------------------------------------------------- layout


def test_layout_names_and_slice_indexes(dataset):
    summary, root = dataset
    assert root.name == "kaggle_3m"
    assert sorted(p.name for p in root.iterdir() if p.is_file()) == ["data.csv"]
    dirs = _patient_dirs(root)
    assert len(dirs) == summary.patients == 5
    for folder in dirs:
        match = ID_RE.match(folder.name)
        assert match, folder.name
        date.fromisoformat(f"{match[2][:4]}-{match[2][4:6]}-{match[2][6:]}")  # a real date
        images, masks = [], []
        for f in folder.iterdir():
            m = SLICE_RE.match(f.name)
            assert m and m["pid"] == folder.name, f.name
            (masks if m["mask"] else images).append(int(m["i"]))
        n = len(images)
        assert 6 <= n <= 9
        assert sorted(images) == sorted(masks) == list(range(1, n + 1))  # 1..N, one mask each


def test_summary_counts_match_files(dataset):
    summary, root = dataset
    slices = tumour = 0
    for folder in _patient_dirs(root):
        _, masks = _volume(folder)
        slices += len(masks)
        tumour += int(masks.any(axis=(1, 2)).sum())
    assert (summary.slices, summary.tumour_slices) == (slices, tumour)


def test_data_csv_matches_patient_folders(dataset):
    _, root = dataset
    with open(root / "data.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_HEADER
    patients = sorted(r[0] for r in rows[1:])
    assert patients == sorted(p.name.rsplit("_", 1)[0] for p in _patient_dirs(root))
    for row in rows[1:]:
        assert len(row) == len(CSV_HEADER)
        assert all(v == "" or v.isdigit() for v in row[1:])


def test_dtypes_shapes_and_mask_values(dataset):
    _, root = dataset
    for folder in _patient_dirs(root):
        images, masks = _volume(folder)
        assert images.dtype == masks.dtype == np.uint8
        assert images.shape[1:] == (256, 256, 3) and masks.shape[1:] == (256, 256)
        assert set(np.unique(masks)) <= {0, 255}
        with tifffile.TiffFile(folder / f"{folder.name}_1.tif") as tif:
            assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.RGB
        with tifffile.TiffFile(folder / f"{folder.name}_1_mask.tif") as tif:
            assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.MINISBLACK


def test_lesion_slices_form_one_contiguous_run(dataset):
    _, root = dataset
    lesions = 0
    for folder in _patient_dirs(root):
        _, masks = _volume(folder)
        hit = np.flatnonzero(masks.any(axis=(1, 2)))
        if hit.size:
            lesions += 1
            assert np.all(np.diff(hit) == 1), hit
            assert ndimage.label(masks > 0)[1] == 1  # one 3-D blob
    assert lesions >= 1


def test_refuses_to_replace_foreign_data_but_replaces_its_own(tmp_path):
    foreign = tmp_path / "real" / "kaggle_3m"
    (foreign / "TCGA_CS_4941_19960909").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        write_synthetic_dataset(str(tmp_path / "real"), patients=1)
    assert (foreign / "TCGA_CS_4941_19960909").is_dir()

    root = Path(_write(tmp_path / "own", patients=2, size=64).root)
    _write(tmp_path / "own", patients=1, size=64)  # stale patient folders must go
    assert len(_patient_dirs(root)) == 1


@pytest.mark.parametrize("kwargs", [
    dict(patients=-1),
    dict(slices_per_patient=(0, 3)),
    dict(slices_per_patient=(5, 4)),
    dict(lesion_fraction=1.5),
    dict(size=16),
])
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_synthetic_dataset(str(tmp_path), **{"patients": 1, **kwargs})


# ----------------------------------------------------------------------------- determinism


def test_same_arguments_give_byte_identical_files(tmp_path):
    a = _files(Path(_write(tmp_path / "a", patients=2, seed=11).root))
    b = _files(Path(_write(tmp_path / "b", patients=2, seed=11).root))
    assert a.keys() == b.keys() and a == b
    c = _files(Path(_write(tmp_path / "c", patients=2, seed=12).root))
    assert a != c


def test_patient_k_does_not_depend_on_patient_count(tmp_path):
    three = Path(_write(tmp_path / "three", patients=3, size=128).root)
    five = Path(_write(tmp_path / "five", patients=5, size=128).root)
    dirs3, dirs5 = _patient_dirs(three), {p.name: p for p in _patient_dirs(five)}
    assert {p.name for p in dirs3} < set(dirs5)
    for folder in dirs3:
        assert _files(folder) == _files(dirs5[folder.name])


def test_compression_does_not_change_pixels(tmp_path):
    packed = Path(_write(tmp_path / "zlib", patients=1, compression="zlib").root)
    plain = Path(_write(tmp_path / "none", patients=1, compression=None).root)
    (folder,) = _patient_dirs(packed)
    for a, b in zip(_volume(folder), _volume(plain / folder.name)):
        np.testing.assert_array_equal(a, b)
    assert sum(map(len, _files(packed).values())) < sum(map(len, _files(plain).values()))


@pytest.mark.parametrize("fraction, patients, expected", [
    (0.0, 8, (0, 0)),
    (1.0, 8, (8, 8)),
    (0.5, 20, (8, 12)),
    (0.8, 20, (14, 18)),
])
def test_lesion_fraction(tmp_path, fraction, patients, expected):
    root = Path(_write(tmp_path, patients=patients, lesion_fraction=fraction, size=32,
                       slices_per_patient=(4, 4)).root)
    with_lesion = sum(_volume(folder)[1].any() for folder in _patient_dirs(root))
    assert expected[0] <= with_lesion <= expected[1]


# ----------------------------------------------------------------------------- image content


@pytest.mark.parametrize("size", [64, 128, 256])
def test_synthesize_patient_shapes(size):
    images, masks = synthesize_patient(np.random.default_rng(0), 7, True, size=size)
    assert images.shape == (7, size, size, 3) and images.dtype == np.uint8
    assert masks.shape == (7, size, size) and masks.dtype == np.uint8
    assert set(np.unique(masks)) == {0, 255}


def test_no_lesion_means_empty_masks():
    _, masks = synthesize_patient(np.random.default_rng(1), 12, False)
    assert not masks.any()


def test_head_is_largest_mid_volume_and_background_is_black():
    images, _ = synthesize_patient(np.random.default_rng(2), 21, False)
    area = (images[..., 1] > 20).sum(axis=(1, 2))
    assert area[10] > 1.5 * area[0] and area[10] > 1.5 * area[-1]
    assert area[10] > 0.4 * 256 * 256  # the head fills the frame like the real slices
    corners = images[:, :16, :16]
    assert not corners.any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lesion_is_bright_in_flair_and_sized_like_real_lesions(seed):
    images, masks = synthesize_patient(np.random.default_rng(seed), 16, True)
    lesion = masks > 0
    areas = lesion.sum(axis=(1, 2))
    run = areas[areas > 0]
    assert 3 <= run.size <= 14
    assert 300 <= run.max() <= 4000 and run.min() >= 20
    # Surrounding brain: a 4..8 px ring (square) around the lesion, in plane.
    hit = areas > 0
    lesion, images = lesion[hit], images[hit]
    ring = ndimage.maximum_filter(lesion, size=(1, 17, 17))
    ring &= ~ndimage.maximum_filter(lesion, size=(1, 7, 7))
    flair, t1 = images[..., 1].astype(float), images[..., 0].astype(float)
    assert flair[lesion].mean() - flair[ring].mean() >= 20
    assert abs(t1[lesion].mean() - t1[ring].mean()) < 20  # only faint in the T1 channels


def test_intensities_resemble_real_flair():
    images, masks = synthesize_patient(np.random.default_rng(4), 20, True)
    flair = images[10, ..., 1]
    brain = flair[flair > 20]
    assert 50 <= np.median(brain) <= 110
    assert images.max() < 255  # no saturation
