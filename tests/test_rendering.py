"""Rendering (the stretched FLAIR, outlines and tints, PNGs) against hand-made arrays.

numpy/Pillow only: no torch, no Ray.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from brainseg_ray.rendering import encode_png, flair_channel, mask_png, overlay, stretch_flair


def m(rows: str) -> np.ndarray:
    """A uint8 {0,1} slice from '1100/1100/0000' (rows split by '/')."""
    return np.array([[int(c) for c in row] for row in rows.split("/")], dtype=np.uint8)


# -------------------------------------------------------------------------------------- overlay


def image_from_flair(flair: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint8 [H,W,3] with the given FLAIR channel and random other channels."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*flair.shape, 3), dtype=np.uint8)
    image[..., 1] = flair
    return image


def stretched(flair: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(flair, [1, 99])
    return np.rint(np.clip((flair.astype(np.float64) - lo) * 255.0 / (hi - lo), 0, 255)).astype(np.uint8)


RED = np.array([255, 0, 0], np.uint8)


def test_overlay_background_is_stretched_flair():
    flair = np.random.default_rng(1).integers(20, 200, (32, 40), dtype=np.uint8)
    out = overlay(image_from_flair(flair), np.zeros((32, 40), np.uint8))
    assert out.dtype == np.uint8 and out.shape == (32, 40, 3)
    expected = stretched(flair)
    assert expected.min() == 0 and expected.max() == 255
    for c in range(3):  # grey: every channel equals the stretched FLAIR; channels 0 and 2 unused
        np.testing.assert_array_equal(out[..., c], expected)


def test_flair_channel_and_its_stretch():
    flair = np.random.default_rng(4).integers(20, 200, (6, 7), dtype=np.uint8)
    image = image_from_flair(flair)
    np.testing.assert_array_equal(flair_channel(image), flair)
    np.testing.assert_array_equal(flair_channel(flair), flair)  # an [H,W] image is FLAIR already
    np.testing.assert_array_equal(stretch_flair(image), stretched(flair))
    with pytest.raises(ValueError, match="slice image"):
        flair_channel(np.zeros(4, np.uint8))


def test_overlay_outline_only_on_boundary():
    flair = np.arange(49, dtype=np.uint8).reshape(7, 7) * 5
    image = image_from_flair(flair)
    mask = np.zeros((7, 7), np.uint8)
    mask[1:6, 1:6] = 1  # 5x5 square: 16 boundary pixels around a 3x3 interior
    before = image.copy()
    out = overlay(image, mask, style="outline")
    boundary = mask.astype(bool)
    boundary[2:5, 2:5] = False
    red = (out == RED).all(axis=2)
    np.testing.assert_array_equal(red, boundary)
    grey = stretched(flair)
    np.testing.assert_array_equal(out[~boundary], np.repeat(grey[~boundary][:, None], 3, axis=1))
    np.testing.assert_array_equal(image, before)


# name, mask, expected outline (the image border counts as outside the mask)
OUTLINE_CASES = [
    # only (1,1) is interior: its four neighbours are in the mask
    ("block in the corner", "1110/1110/1110/0000", "1110/1010/1110/0000"),
    # (1,1) misses only its diagonal neighbour (0,0): interior, since the outline uses 4-neighbours
    ("notched corners", "01110/11111/11111/11111/01110", "01110/10001/10001/10001/01110"),
    ("one pixel", "000/010/000", "000/010/000"),
    ("whole image", "111/111/111", "111/101/111"),
]


@pytest.mark.parametrize("mask, expected", [c[1:] for c in OUTLINE_CASES], ids=[c[0] for c in OUTLINE_CASES])
def test_overlay_outline_shapes_and_color(mask, expected):
    mask = m(mask)
    image = image_from_flair(np.arange(mask.size, dtype=np.uint8).reshape(mask.shape) * 9)
    out = overlay(image, mask, style="outline", color=(0, 255, 0))
    colored = (out == np.array([0, 255, 0], np.uint8)).all(axis=2)
    np.testing.assert_array_equal(colored, m(expected).astype(bool))


def test_overlay_tint_on_constant_image():
    image = np.full((4, 5, 3), 100, np.uint8)
    mask = m("00000/01100/01100/00000")
    with np.errstate(all="raise"):  # a constant slice must not divide by zero
        out = overlay(image, mask, style="tint", color=(255, 0, 0), alpha=0.4)
    # mask: rint(0.6 * 100 + 0.4 * colour) = (162, 60, 60); elsewhere the grey stays 100
    np.testing.assert_array_equal(out[mask == 1], np.tile([162, 60, 60], (4, 1)))
    np.testing.assert_array_equal(out[mask == 0], np.full((16, 3), 100))


@pytest.mark.parametrize("alpha, expected", [(0.0, [100, 100, 100]), (1.0, [10, 20, 30]), (0.5, [55, 60, 65])])
def test_overlay_tint_alpha(alpha, expected):
    image = np.full((2, 2, 3), 100, np.uint8)
    out = overlay(image, m("10/00"), style="tint", color=(10, 20, 30), alpha=alpha)
    np.testing.assert_array_equal(out[0, 0], expected)
    np.testing.assert_array_equal(out[1, 1], [100, 100, 100])


def test_overlay_zero_image():
    with np.errstate(all="raise"):
        out = overlay(np.zeros((3, 3, 3), np.uint8), np.zeros((3, 3), np.uint8))
    np.testing.assert_array_equal(out, np.zeros((3, 3, 3), np.uint8))


def test_overlay_mostly_constant_image_uses_min_max():
    flair = np.full((10, 20), 50, np.uint8)
    flair[0, 0] = 150  # of 200 pixels: 1st and 99th percentiles are both 50, so min/max is used
    out = overlay(image_from_flair(flair), np.zeros((10, 20), np.uint8))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[5, 5].tolist() == [0, 0, 0]


@pytest.mark.parametrize("kwargs, match", [
    ({"style": "fill"}, "outline, tint"),
    ({"alpha": 1.5}, "alpha"),
    ({"color": (255, 0)}, "color"),
    ({"color": (256, 0, 0)}, "color"),
])
def test_overlay_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        overlay(np.zeros((3, 3, 3), np.uint8), np.zeros((3, 3), np.uint8), **kwargs)


@pytest.mark.parametrize("image, mask", [
    (np.zeros((3, 3, 3), np.float32), np.zeros((3, 3), np.uint8)),
    (np.zeros((3, 3), np.uint8), np.zeros((3, 3), np.uint8)),
    (np.zeros((3, 3, 3), np.uint8), np.zeros((3, 4), np.uint8)),
    (np.zeros((3, 3, 3), np.uint8), np.full((3, 3), 255, np.uint8)),
])
def test_overlay_bad_inputs(image, mask):
    with pytest.raises(ValueError):
        overlay(image, mask)


# ------------------------------------------------------------------------------------------ PNG


def decode(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize("shape, mode", [((17, 23), "L"), ((17, 23, 3), "RGB")])
def test_encode_png_round_trip(shape, mode):
    array = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    image = decode(encode_png(array))
    assert image.mode == mode
    np.testing.assert_array_equal(np.asarray(image), array)


def test_encode_png_non_contiguous():
    array = np.random.default_rng(3).integers(0, 256, (8, 10, 3), dtype=np.uint8)[:, ::2]
    np.testing.assert_array_equal(np.asarray(decode(encode_png(array))), array)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), np.zeros(4, np.uint8)])
def test_encode_png_rejects(bad):
    with pytest.raises(ValueError):
        encode_png(bad)


def test_mask_png_round_trip():
    mask = m("0110/1111/0000")
    image = decode(mask_png(mask))
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), mask * 255)
    np.testing.assert_array_equal(np.asarray(decode(mask_png(mask.astype(bool)))), mask * 255)
    with pytest.raises(ValueError):
        mask_png(mask * 255)
