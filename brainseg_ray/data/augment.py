"""Joint image/mask augmentation for training slices (albumentations 2.x), as in the classic LGG
segmentation notebooks.

Levels:
    none    identity: the arrays passed in are returned as they are (no copy).
    light   geometry only: horizontal and vertical flips, random 90-degree rotations, transpose, and
            a small affine (shift up to 6.25%, scale 0.9-1.1, rotation up to 15 degrees, black fill).
            Non-square inputs get no 90-degree rotation or transpose (they would swap H and W).
    natural only what a real scan varies by: left-right flips (brains are roughly symmetric),
            scale 0.95-1.05 and rotation up to 15 degrees (Buda et al.), a shift up to 4%, and
            a small brightness/contrast jitter; no vertical flips or 90-degree turns.
    scanner natural, plus what differs between the data set's scanners and protocols: each
            sequence's brightness on its own (x0.6-1.6; one patient's FLAIR is half as bright as
            another's), gamma 0.7-1.5, and a missing sequence filled with FLAIR the way the data set
            fills one (post-contrast, or both others; about 1 patient in 8 of the shared set).
    strong  light, plus a random resized crop back to the input size, brightness/contrast, gamma,
            a mild blur (Gaussian or motion) and one mild elastic/grid/optical distortion.

Every geometric transform moves the image and its mask together. Masks are resampled with nearest
interpolation: each output pixel takes one input label, so masks stay exactly {0, 1} and labels are
never blended across the tumour border; images use linear interpolation. Intensity transforms (brightness, contrast,
gamma, blur) are image-only and never touch the mask.

Pipelines are built once per input size (RandomResizedCrop needs the output size) and cached; each
is an A.Compose with `seed=`, so two Augmentations built with the same seed give the same outputs
for the same sequence of calls.
"""

from __future__ import annotations

import brainseg_ray  # noqa: F401  (sets NO_ALBUMENTATIONS_UPDATE before albumentations is imported)

import albumentations as A
import cv2
import numpy as np

from brainseg_ray.data.schema import FLAIR_CHANNEL, IMAGE_SIZE

AUGMENTATIONS = ("none", "light", "strong", "natural", "scanner")
# One line each, for a model card's recipe (the docstring above has the detail).
SUMMARIES = {
    "none": "none",
    "light": "flips, 90-degree rotations, transpose, shift-scale-rotate",
    "strong": "light, plus random resized crop, brightness/contrast, gamma, blur and a mild distortion",
    "natural": "left-right flips, scale 0.95-1.05, rotation up to 15 degrees, small shifts and brightness/contrast",
    "scanner": "natural, plus each sequence's brightness on its own (x0.6-1.6), gamma 0.7-1.5, and a missing "
               "sequence filled with FLAIR as the data set fills one",
}

_BLACK = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": 0}
_NEAREST = {"mask_interpolation": cv2.INTER_NEAREST}


def _light(height: int, width: int) -> list[A.BasicTransform]:
    # 90-degree rotations and transpose swap H and W, so a non-square slice gets flips only.
    square = [A.RandomRotate90(p=0.5), A.Transpose(p=0.5)] if height == width else []
    return [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        *square,
        A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-15, 15),
                 interpolation=cv2.INTER_LINEAR, **_NEAREST, **_BLACK, p=0.5),
    ]


def _natural(height: int, width: int) -> list[A.BasicTransform]:
    return [
        A.HorizontalFlip(p=0.5),
        A.Affine(translate_percent=(-0.04, 0.04), scale=(0.95, 1.05), rotate=(-15, 15),
                 interpolation=cv2.INTER_LINEAR, **_NEAREST, **_BLACK, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
    ]


class FillWithFlair(A.ImageOnlyTransform):
    """The post-contrast channel, and half the time the pre-contrast one too, replaced by FLAIR: how
    the LGG data set fills a sequence that was not acquired."""

    def get_params(self) -> dict:
        return {"both": self.py_random.random() < 0.5}

    def apply(self, img: np.ndarray, both: bool = False, **params) -> np.ndarray:
        out = img.copy()
        others = (0, 2) if both else (2,)
        for channel in others:
            out[..., channel] = img[..., FLAIR_CHANNEL]
        return out


def _scanner(height: int, width: int) -> list[A.BasicTransform]:
    # Intensities differ far more between the data set's patients than natural's jitter covers
    # (FLAIR's 99th percentile runs from about 90 to 180), and a model that never saw a dim FLAIR or
    # a filled sequence can miss a whole patient's tumour.
    return [
        *_natural(height, width),
        A.MultiplicativeNoise(multiplier=(0.6, 1.6), per_channel=True, elementwise=False, p=0.5),
        A.RandomGamma(gamma_limit=(70, 150), p=0.3),
        FillWithFlair(p=0.15),  # last, so a filled channel is an exact copy, as in the data set
    ]


def _strong(height: int, width: int) -> list[A.BasicTransform]:
    aspect = width / height  # crops keep roughly the input's aspect ratio
    return [
        *_light(height, width),
        A.RandomResizedCrop(size=(height, width), scale=(0.7, 1.0), ratio=(0.9 * aspect, aspect / 0.9),
                            interpolation=cv2.INTER_LINEAR, **_NEAREST, p=0.3),
        A.OneOf([
            A.ElasticTransform(alpha=120, sigma=6, **_NEAREST, **_BLACK),
            A.GridDistortion(num_steps=5, distort_limit=0.2, **_NEAREST, **_BLACK),
            A.OpticalDistortion(distort_limit=0.1, **_NEAREST, **_BLACK),
        ], p=0.25),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        A.RandomGamma(gamma_limit=(80, 120), p=0.3),
        A.OneOf([
            A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.3, 1.0)),
            A.MotionBlur(blur_limit=(3, 5)),
        ], p=0.2),
    ]


class Augmentation:
    """Applies one level's pipeline to a batch, sample by sample. Build with build_augmentation."""

    def __init__(self, level: str, seed: int | None = None):
        if level not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation level {level!r}; allowed: {', '.join(AUGMENTATIONS)}")
        self.level = level
        self.seed = seed
        self._pipelines: dict[tuple[int, int], A.Compose] = {}
        if level != "none":
            self._pipeline(IMAGE_SIZE, IMAGE_SIZE)  # build the usual size now: bad arguments fail here

    def __repr__(self) -> str:
        return f"Augmentation(level={self.level!r}, seed={self.seed!r})"

    def _pipeline(self, height: int, width: int) -> A.Compose:
        key = (height, width)
        if key not in self._pipelines:
            levels = {"light": _light, "strong": _strong, "natural": _natural, "scanner": _scanner}
            transforms = levels[self.level](height, width)
            self._pipelines[key] = A.Compose(transforms, seed=self.seed)
        return self._pipelines[key]

    def __call__(self, images: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """images uint8 [N,H,W,3], masks uint8 [N,H,W] ({0,1}) -> new arrays of the same shapes and
        dtypes, masks still {0,1}. N may be 0. 'none' returns the inputs themselves."""
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N,H,W,3], got {images.dtype} {images.shape}")
        if masks.shape != images.shape[:3] or masks.dtype != np.uint8:
            raise ValueError(f"masks must be uint8 {list(images.shape[:3])}, got {masks.dtype} {masks.shape}")
        if self.level == "none":
            return images, masks
        out_images, out_masks = np.empty_like(images), np.empty_like(masks)
        if len(images):
            pipeline = self._pipeline(*images.shape[1:3])
            for i in range(len(images)):
                result = pipeline(image=images[i], mask=masks[i])
                out_images[i], out_masks[i] = result["image"], result["mask"]
        return out_images, out_masks


def build_augmentation(level: str, seed: int | None = None) -> Augmentation:
    """The augmentation for `level` (one of AUGMENTATIONS); ValueError naming them otherwise."""
    return Augmentation(level, seed)
