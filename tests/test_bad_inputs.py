"""A corpus of bad inputs: each gives the expected error row, and every good slice is still written."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from PIL import Image

from brainseg_ray.config import IngestConfig
from brainseg_ray.data import schema
from brainseg_ray.data.ingest import ingest
from brainseg_ray.data.tables import read_slices_table

RNG = np.random.default_rng(3)


def tiff(array: np.ndarray, compression=None) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, compression=compression)
    return buf.getvalue()


def image(h=256, w=256, c=3, dtype=np.uint8) -> np.ndarray:
    shape = (h, w) if c == 1 else (h, w, c)
    return RNG.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)


def mask(h=256, w=256, values=(0, 255)) -> np.ndarray:
    return RNG.choice(np.array(values, np.uint8), (h, w))


GOOD_IMAGE, GOOD_MASK = tiff(image(), "zlib"), tiff(mask())
PNG = io.BytesIO()
Image.fromarray(image()).save(PNG, format="PNG")

# name inside kaggle_3m -> bytes; (file that the error row names, expected code) or None for "written".
# Patient BAD holds the broken slices; patient GOOD must come through whole.
CORPUS: dict[str, tuple[dict[str, bytes], tuple[str, str] | None]] = {
    "zero-byte image": ({"BAD/BAD_1.tif": b"", "BAD/BAD_1_mask.tif": GOOD_MASK}, ("BAD/BAD_1.tif", "empty_file")),
    "zero-byte mask": ({"BAD/BAD_2.tif": GOOD_IMAGE, "BAD/BAD_2_mask.tif": b""}, ("BAD/BAD_2_mask.tif", "empty_file")),
    "truncated image": ({"BAD/BAD_3.tif": GOOD_IMAGE[:300], "BAD/BAD_3_mask.tif": GOOD_MASK},
                        ("BAD/BAD_3.tif", "decode_error")),
    "not a TIFF": ({"BAD/BAD_4.tif": b"hello, this is text", "BAD/BAD_4_mask.tif": GOOD_MASK}, ("BAD/BAD_4.tif", "not_tiff")),
    "PNG renamed .tif": ({"BAD/BAD_5.tif": PNG.getvalue(), "BAD/BAD_5_mask.tif": GOOD_MASK}, ("BAD/BAD_5.tif", "not_tiff")),
    "16-bit image": ({"BAD/BAD_6.tif": tiff(image(dtype=np.uint16)), "BAD/BAD_6_mask.tif": GOOD_MASK},
                     ("BAD/BAD_6.tif", "bad_dtype")),
    "1-channel image": ({"BAD/BAD_7.tif": tiff(image(c=1)), "BAD/BAD_7_mask.tif": GOOD_MASK}, ("BAD/BAD_7.tif", "bad_channels")),
    "4-channel image": ({"BAD/BAD_8.tif": tiff(image(c=4)), "BAD/BAD_8_mask.tif": GOOD_MASK}, ("BAD/BAD_8.tif", "bad_channels")),
    "mask values 0/7": ({"BAD/BAD_9.tif": GOOD_IMAGE, "BAD/BAD_9_mask.tif": tiff(mask(values=(0, 7)))},
                        ("BAD/BAD_9_mask.tif", "bad_mask_values")),
    "mask of another size": ({"BAD/BAD_10.tif": GOOD_IMAGE, "BAD/BAD_10_mask.tif": tiff(mask(128, 128))},
                             ("BAD/BAD_10_mask.tif", "mask_shape")),
    "mask without image": ({"BAD/BAD_11_mask.tif": GOOD_MASK}, ("BAD/BAD_11_mask.tif", "orphan_mask")),
    "image without mask": ({"BAD/BAD_12.tif": GOOD_IMAGE}, ("BAD/BAD_12.tif", "missing_mask")),
    "duplicate slice index": ({"BAD/BAD_13.tif": GOOD_IMAGE, "BAD/BAD_013.tif": GOOD_IMAGE,
                               "BAD/BAD_13_mask.tif": GOOD_MASK}, ("BAD/BAD_13.tif", "duplicate_index")),
    "unreadable patient folder name": ({"bad name!/bad name!_1.tif": GOOD_IMAGE}, ("bad name!/bad name!_1.tif", "bad_patient_name")),
    "slice number missing": ({"BAD/BAD_first.tif": GOOD_IMAGE}, ("BAD/BAD_first.tif", "bad_slice_name")),
    "file of another patient": ({"BAD/OTHER_1.tif": GOOD_IMAGE}, ("BAD/OTHER_1.tif", "bad_slice_name")),
    "truncated mask": ({"BAD/BAD_14.tif": GOOD_IMAGE, "BAD/BAD_14_mask.tif": tiff(mask(), "zlib")[:200]},
                       ("BAD/BAD_14_mask.tif", "decode_error")),
    "512x512 slice is resized, not rejected": ({"BIG/BIG_1.tif": tiff(image(512, 512)), "BIG/BIG_1_mask.tif": tiff(mask(512, 512))}, None),
    "mask in 0/1 accepted": ({"BIG/BIG_2.tif": GOOD_IMAGE, "BIG/BIG_2_mask.tif": tiff(mask(values=(0, 1)))}, None),
}
GOOD = {f"GOOD/GOOD_{i}.tif": tiff(image(), "zlib") for i in range(1, 6)}
GOOD |= {f"GOOD/GOOD_{i}_mask.tif": tiff(mask()) for i in range(1, 6)}


def write_corpus(root: Path) -> None:
    files = dict(GOOD)
    for members, _ in CORPUS.values():
        files.update(members)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "README.txt").write_text("not a slice: ignored, and counted as ignored")


@pytest.fixture(scope="module")
def corpus_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "kaggle_3m"
    write_corpus(root)
    out = tmp_path_factory.mktemp("corpus-out")
    result = ingest(IngestConfig(source=str(root), out=str(out)))
    errors = pq.read_table(out / schema.ERRORS_FILE).to_pylist()
    return root, out, result, errors


@pytest.mark.parametrize("case", [c for c, (_, expected) in CORPUS.items() if expected])
def test_each_bad_input_gives_its_error_row(corpus_run, case):
    root, _, _, errors = corpus_run
    name, code = CORPUS[case][1]
    rows = [e for e in errors if e["file"] == str(root / name)]
    assert len(rows) == 1, f"{case}: expected one error row for {name}, got {rows}"
    assert rows[0]["code"] == code, f"{case}: {rows[0]}"
    assert name.split("/")[-1] in rows[0]["reason"], "the reason names the file"


def test_good_slices_are_all_written_and_counts_add_up(corpus_run):
    root, out, result, errors = corpus_run
    table = read_slices_table(str(out))
    written = {(p, i) for p, i in zip(table.column("patient_id").to_pylist(), table.column("slice_index").to_pylist())}
    assert {("GOOD", i) for i in range(1, 6)} <= written
    assert {("BIG", 1), ("BIG", 2)} <= written
    assert not any(p == "BAD" for p, _ in written)
    # duplicate: both files of slice 13 are errors; every other bad case one row.
    expected_errors = sum(1 for _, e in CORPUS.values() if e) + 1
    assert len(errors) == result.errors == expected_errors
    assert result.written == table.num_rows == 7
    assert result.found == result.written + result.errors
    assert result.manifest["counts"]["ignored_files"] == 1


def test_resized_slice_is_flagged_and_resampled(corpus_run):
    root, out, _, _ = corpus_run
    table = read_slices_table(str(out)).to_pylist()
    big = next(r for r in table if (r["patient_id"], r["slice_index"]) == ("BIG", 1))
    normal = next(r for r in table if r["patient_id"] == "GOOD")
    assert big["resized"] is True and normal["resized"] is False
    source_mask = tifffile.imread(root / "BIG" / "BIG_1_mask.tif") > 0
    got = np.frombuffer(big["mask"], np.uint8).reshape(schema.MASK_SHAPE)
    assert set(np.unique(got)) <= {0, 1}  # nearest-neighbour keeps a binary mask
    assert abs(got.mean() - source_mask.mean()) < 0.01


def test_archive_member_escaping_root_and_corrupt_archive(ray_local, tmp_path):
    good_tar = tmp_path / "in" / "a.tar.gz"
    good_tar.parent.mkdir()
    with tarfile.open(good_tar, "w:gz") as tar:
        for name, data in {**GOOD, "../evil/EVIL_1.tif": GOOD_IMAGE}.items():
            info = tarfile.TarInfo(f"kaggle_3m/{name}" if not name.startswith("..") else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "in" / "b.tar.gz").write_bytes(b"\x1f\x8b\x08 not really gzip")
    result = ingest(IngestConfig(source=str(tmp_path / "in" / "*.tar.gz"), out=str(tmp_path / "out")))
    errors = pq.read_table(tmp_path / "out" / schema.ERRORS_FILE).to_pylist()
    assert sorted(e["code"] for e in errors) == ["archive_unreadable", "unsafe_member"]
    assert any(e["file"] == str(tmp_path / "in" / "b.tar.gz") for e in errors)
    assert result.written == 5 and result.found == 7
    assert not (tmp_path / "evil").exists()
