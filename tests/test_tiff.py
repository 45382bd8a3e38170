"""decode_tiff must give exactly what tifffile.imread gives: same pixels, shape and dtype, and an
exception wherever tifffile raises. Simple files must take the fast path (decode_simple_tiff returns
an array); everything else must be left to tifffile (decode_simple_tiff returns None)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile

from brainseg_ray.data.decode import SliceError, read_pixels
from brainseg_ray.data.tiff import decode_simple_tiff, decode_tiff
from brainseg_ray.dev_data import SHARED_KAGGLE_3M


def _tifffile(data: bytes) -> np.ndarray:
    return np.asarray(tifffile.imread(io.BytesIO(data)))


def _assert_same(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    assert got.dtype == expected.dtype
    assert np.array_equal(got, expected)


def _assert_like_tifffile(data: bytes) -> None:
    """decode_tiff returns tifffile's array, or raises the same exception type as tifffile."""
    try:
        expected = _tifffile(data)
    except Exception as exc:  # tifffile raises several types for damaged files
        with pytest.raises(type(exc)):
            decode_tiff(data)
        return
    _assert_same(decode_tiff(data), expected)


def _encode(pixels: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, **options)
    return buffer.getvalue()


def _pixels(shape: tuple[int, ...], dtype=np.uint8, seed: int = 0) -> np.ndarray:
    """Smooth gradient plus noise: like a slice, and it exercises the predictor's wrap-around."""
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(shape[0]) * 7, np.arange(shape[1]) * 5)
    ramp = ramp.reshape(ramp.shape + (1,) * (len(shape) - 2))
    return ((ramp + rng.integers(0, 64, shape)) % (np.iinfo(dtype).max + 1)).astype(dtype)


# ------------------------------------------------------------------------------------- real data

def _real_files() -> list[Path]:
    if not SHARED_KAGGLE_3M.is_dir():
        return []
    patients = sorted(p for p in SHARED_KAGGLE_3M.iterdir() if p.is_dir())[:3]
    return sorted(f for p in patients for f in p.glob("*.tif"))


def test_real_slices_of_three_patients_match_tifffile():
    files = _real_files()
    if not files:
        pytest.skip(f"shared kaggle_3m data not found at {SHARED_KAGGLE_3M}")
    for file in files:
        data = file.read_bytes()
        fast = decode_simple_tiff(data)
        assert fast is not None, f"{file.name} did not take the fast path"
        _assert_same(fast, _tifffile(data))


# --------------------------------------------------------------------------- generated: fast path

COMPRESSIONS = {
    "none": {},
    "zlib": {"compression": "zlib"},
    "zlib+predictor": {"compression": "zlib", "predictor": True},
    "adobe_deflate": {"compression": "adobe_deflate"},
    "old_deflate+predictor": {"compression": "deflate", "predictor": True},
}
SHAPES = {"rgb": (64, 48, 3), "grey": (64, 48), "odd_rgb": (37, 53, 3), "odd_grey": (37, 53)}


@pytest.mark.parametrize("rowsperstrip", [1, 7, None], ids=["rps1", "rps7", "whole"])
@pytest.mark.parametrize("byteorder", ["<", ">"], ids=["little", "big"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("compression", COMPRESSIONS.values(), ids=COMPRESSIONS.keys())
def test_simple_variants_take_fast_path(compression, shape, byteorder, rowsperstrip):
    pixels = _pixels(shape)
    data = _encode(pixels, byteorder=byteorder, rowsperstrip=rowsperstrip, **compression)
    fast = decode_simple_tiff(data)
    assert fast is not None
    _assert_same(fast, _tifffile(data))
    _assert_same(fast, pixels)


@pytest.mark.parametrize("options", [
    {"data": _pixels((37, 53, 4)), "photometric": "rgb", "compression": "zlib", "predictor": True},
    {"data": _pixels((37, 53)), "photometric": "miniswhite"},
    {"data": _pixels((37, 53, 3)), "metadata": None, "compression": "zlib"},  # no description
    {"data": _pixels((1, 53)), "compression": "zlib", "predictor": True},  # one row
    {"data": _pixels((37, 1)), "compression": "zlib", "predictor": True},  # one column
    {"data": _pixels((37, 53, 3)), "software": "scanner 1.0", "metadata": None},
], ids=["rgba", "miniswhite", "no_description", "one_row", "one_column", "other_software"])
def test_other_simple_files_take_fast_path(options):
    options = dict(options)
    data = _encode(options.pop("data"), **options)
    fast = decode_simple_tiff(data)
    assert fast is not None
    _assert_same(fast, _tifffile(data))


def test_result_is_writable_and_owns_its_memory():
    data = _encode(_pixels((37, 53, 3)))  # uncompressed: the pixels lie in `data` itself
    pixels = decode_tiff(data)
    assert pixels.flags.writeable and pixels.flags.c_contiguous
    assert not np.shares_memory(pixels, np.frombuffer(data, np.uint8))


def test_all_zero_mask_with_predictor():
    data = _encode(np.zeros((64, 64), np.uint8), compression="zlib", predictor=True)
    _assert_same(decode_simple_tiff(data), np.zeros((64, 64), np.uint8))


# ---------------------------------------------------------------------------- generated: fallback

FALLBACKS = {
    "tiled": (_pixels((64, 64, 3)), {"tile": (16, 16), "compression": "zlib"}),
    "uint16": (_pixels((37, 53), np.uint16), {"compression": "zlib", "predictor": True}),
    "float32": (_pixels((37, 53)).astype(np.float32), {}),
    "planar_separate": (_pixels((3, 37, 53)), {"photometric": "rgb", "planarconfig": "separate"}),
    "bigtiff": (_pixels((37, 53, 3)), {"bigtiff": True, "compression": "zlib"}),
    "two_pages": (_pixels((2, 37, 53)), {"compression": "zlib"}),
    "shape_1xHxWx3": (_pixels((1, 37, 53, 3)), {}),  # tifffile keeps the leading 1
    "imagej": (_pixels((37, 53)), {"imagej": True}),
    "other_description": (_pixels((37, 53)), {"description": "a slice", "metadata": None}),
    "two_descriptions": (_pixels((37, 53)), {"description": ""}),  # tifffile reads both
    "minisblack_3_samples": (_pixels((37, 53, 3)), {"photometric": "minisblack"}),
}


@pytest.mark.parametrize("pixels, options", FALLBACKS.values(), ids=FALLBACKS.keys())
def test_other_files_fall_back_to_tifffile(pixels, options):
    data = _encode(pixels, **options)
    assert decode_simple_tiff(data) is None
    _assert_same(decode_tiff(data), _tifffile(data))


# ------------------------------------------------------------------------------ damaged inputs

@pytest.fixture(scope="module")
def zlib_files() -> dict[str, bytes]:
    pixels = _pixels((64, 48, 3))
    return {
        "one_strip": _encode(pixels, compression="zlib", predictor=True),
        "strips_of_7": _encode(pixels, compression="zlib", predictor=True, rowsperstrip=7),
        "uncompressed": _encode(pixels, rowsperstrip=7),
    }


@pytest.mark.parametrize("name", ["one_strip", "strips_of_7", "uncompressed"])
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.9, -10, -1])
def test_truncated_files_raise(zlib_files, name, keep):
    data = zlib_files[name]
    cut = int(len(data) * keep) if keep > 0 else len(data) + keep
    truncated = data[:cut]
    assert cut > 300  # past the IFD: the strips are what is missing
    assert decode_simple_tiff(truncated) is None
    with pytest.raises(Exception):
        decode_tiff(truncated)
    _assert_like_tifffile(truncated)


@pytest.mark.parametrize("cut", [0, 4, 7, 8, 20, 100])
def test_truncated_headers_behave_like_tifffile(zlib_files, cut):
    # Cut at 8 bytes, tifffile returns an empty array (with a warning); the slice checks reject it.
    _assert_like_tifffile(zlib_files["one_strip"][:cut])


def _strip_offset(data: bytes) -> tuple[int, int]:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        return page.dataoffsets[0], page.databytecounts[0]


@pytest.mark.parametrize("name", ["one_strip", "strips_of_7"])
@pytest.mark.parametrize("where", [0.0, 0.3, 0.6, 1.0])
def test_corrupt_strip_bytes_raise(zlib_files, name, where):
    data = bytearray(zlib_files[name])
    offset, count = _strip_offset(bytes(data))
    start = offset + min(int(count * where), count - 4)
    data[start : start + 4] = bytes(b ^ 0x5A for b in data[start : start + 4])
    damaged = bytes(data)
    assert decode_simple_tiff(damaged) is None
    with pytest.raises(Exception):
        decode_tiff(damaged)
    _assert_like_tifffile(damaged)


def test_strip_longer_than_its_rows_is_left_to_tifffile(zlib_files):
    data = bytearray(zlib_files["uncompressed"])
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        tag = tif.pages[0].tags["StripByteCounts"]
        counts, at = tag.value, tag.valueoffset
    fmt = {3: "H", 4: "I"}[int(tag.dtype)]
    # The first strip claims a byte more than the rows need: a layout the fast path does not trust.
    np_counts = np.frombuffer(bytes(data[at : at + len(counts) * np.dtype(fmt).itemsize]), "<" + fmt).copy()
    np_counts[0] += 1
    data[at : at + np_counts.nbytes] = np_counts.tobytes()
    assert decode_simple_tiff(bytes(data)) is None
    _assert_like_tifffile(bytes(data))


def test_width_far_beyond_what_the_strip_can_hold_is_left_to_tifffile():
    # No description, so only the strip's size can tell the fast path that the width is wrong.
    data = bytearray(_encode(_pixels((64, 48, 3)), compression="zlib", predictor=True, metadata=None))
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        tag = tif.pages[0].tags["ImageWidth"]
    fmt = {3: "<u2", 4: "<u4"}[int(tag.dtype)]
    data[tag.valueoffset : tag.valueoffset + np.dtype(fmt).itemsize] = np.array([60000], fmt).tobytes()
    assert decode_simple_tiff(bytes(data)) is None
    _assert_like_tifffile(bytes(data))


def test_zero_length_raises():
    with pytest.raises(Exception):
        decode_tiff(b"")
    with pytest.raises(SliceError) as caught:
        read_pixels(b"")
    assert caught.value.code == "empty_file"


def test_read_pixels_reports_damaged_tiff_as_decode_error(zlib_files):
    data = zlib_files["one_strip"]
    with pytest.raises(SliceError) as caught:
        read_pixels(data[: len(data) // 2])
    assert caught.value.code == "decode_error"
    _assert_same(read_pixels(data), _tifffile(data))
