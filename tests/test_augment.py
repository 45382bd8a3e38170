"""Augmentation levels on real albumentations: shapes, binary masks, joint image/mask geometry,
determinism by seed, and argument errors."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest

from brainseg_ray.data.augment import AUGMENTATIONS, Augmentation, FillWithFlair, build_augmentation


def _batch(n: int, height: int = 256, width: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n non-symmetric slices: masks of a few off-centre ellipses; image channel 0 is exactly
    mask*255, channels 1 and 2 random noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    masks = np.zeros((n, height, width), np.uint8)
    for i in range(n):
        for _ in range(3):
            cy, cx = rng.integers(height // 6, 5 * height // 6), rng.integers(width // 6, 5 * width // 6)
            ry, rx = rng.integers(height // 12, height // 4), rng.integers(width // 12, width // 4)
            masks[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
    images = rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)
    images[..., 0] = masks * 255
    return images, masks


def _border_band(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within `radius` (chessboard distance) of the mask's foreground/background border."""
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    return cv2.dilate(mask, kernel) != cv2.erode(mask, kernel)


def _check_joint(images: np.ndarray, masks: np.ndarray, radius: int, channel: int = 0, cut: int = 127) -> float:
    """`channel` thresholded at `cut` must equal the mask everywhere off the border band; returns
    the fraction of all pixels where they disagree."""
    bright = (images[..., channel] > cut).astype(np.uint8)
    for i in range(len(masks)):
        off_band = ~_border_band(masks[i], radius)
        np.testing.assert_array_equal(bright[i][off_band], masks[i][off_band], err_msg=f"sample {i}")
    return float(np.mean(bright != masks))


@pytest.mark.parametrize("level", AUGMENTATIONS)
def test_levels_keep_shape_dtype_and_binary_masks(level):
    images, masks = _batch(8)
    aug = build_augmentation(level, seed=0)
    assert isinstance(aug, Augmentation) and aug.level == level
    out_images, out_masks = aug(images, masks)
    assert out_images.shape == images.shape and out_images.dtype == np.uint8
    assert out_masks.shape == masks.shape and out_masks.dtype == np.uint8
    assert set(np.unique(out_masks)) <= {0, 1}
    assert out_masks.any()  # the foreground is not lost

    empty_images, empty_masks = aug(images[:0], masks[:0])
    assert empty_images.shape == (0, 256, 256, 3) and empty_images.dtype == np.uint8
    assert empty_masks.shape == (0, 256, 256) and empty_masks.dtype == np.uint8


@pytest.mark.parametrize("level", AUGMENTATIONS)
def test_non_square_input(level):
    images, masks = _batch(6, 64, 96)
    aug = build_augmentation(level, seed=3)
    for _ in range(2):  # the second call reuses the pipeline built for this size
        out_images, out_masks = aug(images, masks)
        assert out_images.shape == (6, 64, 96, 3) and out_masks.shape == (6, 64, 96)
        assert out_images.dtype == np.uint8 and out_masks.dtype == np.uint8
        assert set(np.unique(out_masks)) <= {0, 1}


def test_none_is_identity():
    images, masks = _batch(4)
    out_images, out_masks = build_augmentation("none")(images, masks)
    assert out_images is images and out_masks is masks


def test_light_moves_image_and_mask_together():
    images, masks = _batch(64)
    out_images, out_masks = build_augmentation("light", seed=11)(images, masks)
    # Flips, 90-degree rotations and transpose are exact; the affine resamples the image linearly
    # and the mask by nearest, which may round differently only on the mask's 1-pixel border.
    disagreement = _check_joint(out_images, out_masks, radius=1)
    assert disagreement < 0.002
    assert not np.array_equal(out_masks, masks)  # something was transformed


def test_strong_moves_image_and_mask_together():
    images, masks = _batch(64)
    out_images, out_masks = build_augmentation("strong", seed=5)(images, masks)
    # Brightness/contrast/gamma keep 0 and 255 on their side of 127; blur (kernel <= 5) and a few
    # successive resamplings may only blur the border by a few pixels.
    disagreement = _check_joint(out_images, out_masks, radius=4)
    assert disagreement < 0.01


def test_scanner_moves_image_and_mask_together():
    images, masks = _batch(64)
    images[..., 1] = masks * 255  # FLAIR too, since a filled sequence is a copy of it
    out_images, out_masks = build_augmentation("scanner", seed=2)(images, masks)
    # Scaling by 0.6 then gamma 1.5 leaves 255 at 118 at the least; the jitter lifts 0 by 26 at
    # most; so a cut at 64 still separates them, and only the affine's border may disagree.
    disagreement = _check_joint(out_images, out_masks, radius=1, channel=1, cut=64)
    assert disagreement < 0.002
    assert not np.array_equal(out_masks, masks)


def test_scanner_scales_each_sequence_on_its_own():
    # Flat slices (each channel one value) keep their flatness, so each channel's factor is read off
    # directly; natural's jitter moves all three together, by 10 % at most.
    images = np.empty((200, 32, 32, 3), np.uint8)
    images[...] = (60, 100, 80)
    masks = np.zeros((200, 32, 32), np.uint8)
    out, _ = build_augmentation("scanner", seed=0)(images, masks)
    centre = out[:, 16, 16].astype(float)
    ratio = (centre[:, 0] / 60) / (centre[:, 2] / 80)  # pre- against post-contrast: 1 unless apart
    assert (ratio < 0.8).mean() > 0.05 and (ratio > 1.25).mean() > 0.05
    flair = centre[:, 1] / 100
    assert flair.min() < 0.6 and flair.max() > 1.4  # as dim as and brighter than the shared set's spread
    filled = (centre[:, 2] == centre[:, 1]) & (centre[:, 0] != centre[:, 1])
    assert 0.0 < filled.mean() < 0.2  # some post-contrast channels are filled with FLAIR, not most


@pytest.mark.parametrize(("seed", "both"), [(s, b) for s in range(3) for b in (False, True)])
def test_fill_with_flair_copies_flair_exactly(seed, both):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    out = FillWithFlair(p=1).apply(image, both=both)
    np.testing.assert_array_equal(out[..., 1], image[..., 1])
    np.testing.assert_array_equal(out[..., 2], image[..., 1])
    np.testing.assert_array_equal(out[..., 0], image[..., 1] if both else image[..., 0])
    assert not np.shares_memory(out, image)


def test_fill_with_flair_fills_both_others_about_half_the_time():
    fill = FillWithFlair(p=1)
    fill.set_random_seed(0)
    image = np.stack([np.full((4, 4), v, np.uint8) for v in (10, 20, 30)], axis=-1)
    outs = [fill(image=image)["image"] for _ in range(400)]
    assert all((o[..., 2] == 20).all() for o in outs)
    both = np.mean([(o[..., 0] == 20).all() for o in outs])
    assert 0.4 < both < 0.6


def test_light_changes_most_of_a_batch():
    images, masks = _batch(16, seed=7)
    out_images, out_masks = build_augmentation("light", seed=0)(images, masks)
    changed = [not (np.array_equal(out_images[i], images[i]) and np.array_equal(out_masks[i], masks[i]))
               for i in range(16)]
    # A sample comes out untouched only when the flips/rotations compose to the identity and the
    # affine is skipped (about 1 in 6 here), so most of the batch must change.
    assert sum(changed) >= 8


@pytest.mark.parametrize("level", ["light", "strong", "scanner"])
def test_same_seed_same_output_different_seed_different_output(level):
    images, masks = _batch(16)
    first, second, other = (build_augmentation(level, seed=s) for s in (42, 42, 43))
    for _ in range(2):  # also the second call of each: the random streams advance in step
        a_images, a_masks = first(images, masks)
        b_images, b_masks = second(images, masks)
        np.testing.assert_array_equal(a_images, b_images)
        np.testing.assert_array_equal(a_masks, b_masks)
    c_images, _ = other(images, masks)
    d_images, _ = build_augmentation(level, seed=42)(images, masks)
    assert not np.array_equal(c_images, d_images)


def test_no_warnings_when_building_or_running():
    images, masks = _batch(2)
    small_images, small_masks = _batch(2, 64, 96)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for level in AUGMENTATIONS:
            aug = build_augmentation(level, seed=1)
            aug(images, masks)
            aug(small_images, small_masks)  # builds the pipeline for a new size
        build_augmentation("strong")  # seed None


def test_unknown_level_names_the_allowed_ones():
    with pytest.raises(ValueError) as info:
        build_augmentation("medium")
    message = str(info.value)
    assert "medium" in message
    for level in ("none", "light", "strong"):
        assert level in message


@pytest.mark.parametrize("level", AUGMENTATIONS)
def test_bad_arrays_are_rejected(level):
    images, masks = _batch(2)
    aug = build_augmentation(level)
    with pytest.raises(ValueError, match="images"):
        aug(images[..., :2], masks)
    with pytest.raises(ValueError, match="images"):
        aug(images.astype(np.float32), masks)
    with pytest.raises(ValueError, match="masks"):
        aug(images, masks[:1])


def test_every_level_has_a_one_line_summary():
    from brainseg_ray.data.augment import SUMMARIES

    assert set(SUMMARIES) == set(AUGMENTATIONS) and all("\n" not in s for s in SUMMARIES.values())
