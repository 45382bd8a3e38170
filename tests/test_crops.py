"""Training crops: their shape, the share centred near tumour, and image and mask cut together."""

from __future__ import annotations

import numpy as np
import pytest

from brainseg_ray.data.crops import CropSampler


def _coordinate_images(n: int, size: int = 256) -> np.ndarray:
    """Slices whose channels say where a pixel came from: (row, column, slice number)."""
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        images[i, ..., 0], images[i, ..., 1], images[i, ..., 2] = rows, cols, i
    return images


def _masks(n: int, tumour_slices: list[int], size: int = 256, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), np.uint8)
    for i in tumour_slices:
        y, x = rng.integers(10, size - 30, size=2)
        masks[i, y:y + 12, x:x + 20] = 1
    return masks


@pytest.mark.parametrize("crop_size", [64, 128, 256])
def test_crops_have_the_crop_shape_and_dtypes(crop_size):
    images, masks = _coordinate_images(6), _masks(6, [1, 4])
    out_images, out_masks, foreground = CropSampler(crop_size, 0.5, seed=0)(images, masks)
    assert out_images.shape == (6, crop_size, crop_size, 3) and out_images.dtype == np.uint8
    assert out_masks.shape == (6, crop_size, crop_size) and out_masks.dtype == np.uint8
    assert foreground.shape == (6,) and foreground.dtype == bool


def test_image_and_mask_are_cut_with_the_same_window():
    """Each crop's image names, pixel by pixel, the slice and position it came from; the mask crop
    must be the source mask at exactly those positions, and the window must be contiguous."""
    images, masks = _coordinate_images(8), _masks(8, [0, 3, 5])
    sampler = CropSampler(64, 0.5, seed=3)
    for _ in range(20):
        out_images, out_masks, _ = sampler(images, masks)
        for image, mask in zip(out_images, out_masks):
            rows, cols, source = image[..., 0].astype(int), image[..., 1].astype(int), image[..., 2].astype(int)
            assert (source == source[0, 0]).all()
            assert (np.diff(rows, axis=0) == 1).all() and (np.diff(cols, axis=1) == 1).all()
            np.testing.assert_array_equal(mask, masks[source[0, 0], rows, cols])


@pytest.mark.parametrize("fraction", [0.0, 0.33, 0.5, 1.0])
def test_realised_foreground_share_and_what_it_means(fraction):
    images, masks = _coordinate_images(8), _masks(8, [2, 6])
    sampler = CropSampler(64, fraction, seed=1)
    centred, total = 0, 0
    for _ in range(200):
        _, out_masks, foreground = sampler(images, masks)
        centred += int(foreground.sum())
        total += len(foreground)
        # A foreground crop always holds tumour pixels (the lesion is within crop_size // 3 of
        # its centre, and the lesions here are smaller than that).
        assert out_masks[foreground].any(axis=(1, 2)).all()
    assert centred / total == pytest.approx(fraction, abs=0.02)


def test_random_crops_rarely_meet_small_lesions():
    """Without oversampling most crops are background: the reason foreground_fraction exists."""
    images, masks = _coordinate_images(8), _masks(8, [2, 6])
    sampler = CropSampler(64, 0.0, seed=2)
    hits = sum(int(sampler(images, masks)[1].reshape(8, -1).any(axis=1).sum()) for _ in range(100))
    assert hits / 800 < 0.15


def test_a_batch_without_tumour_draws_from_earlier_tumour_slices():
    images = _coordinate_images(8)
    sampler = CropSampler(64, 0.5, seed=4)
    empty = np.zeros((8, 256, 256), np.uint8)
    _, _, foreground = sampler(images, empty)  # nothing seen yet: random crops only
    assert not foreground.any()
    sampler(images, _masks(8, [7]))
    out_images, out_masks, foreground = sampler(images, empty)
    assert foreground.sum() == 4 and out_masks[foreground].any(axis=(1, 2)).all()
    assert (out_images[foreground][..., 2] == 7).all()  # all cut from the one tumour slice seen


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="foreground_fraction"):
        CropSampler(64, 1.5)
    with pytest.raises(ValueError, match="larger than the 256x256"):
        CropSampler(320, 0.5)(_coordinate_images(1), _masks(1, []))
