"""Bytes to validated slice arrays. Every rejection is a SliceError with a code and a reason that
a person can act on; the caller adds the file name."""

from __future__ import annotations

import io

import numpy as np

from brainseg_ray.data.schema import IMAGE_SIZE

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_OTHER_FORMATS = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF8": "GIF",
    b"BM": "BMP",
}
MASK_VALUES = (0, 1, 255)


class SliceError(ValueError):
    """A slice or mask that cannot be used. `code` is stable for tests and tables."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def sniff_format(data: bytes) -> str | None:
    """'TIFF', 'PNG', 'JPEG', ... from the first bytes; None when unknown."""
    if data.startswith(_TIFF_MAGIC):
        return "TIFF"
    for magic, name in _OTHER_FORMATS.items():
        if data.startswith(magic):
            return name
    return None


def read_pixels(data: bytes, allowed: tuple[str, ...] = ("TIFF",)) -> np.ndarray:
    """Decode an image file's bytes to an array, checking its format is one of `allowed`."""
    if not data:
        raise SliceError("empty_file", "empty file (0 bytes)")
    kind = sniff_format(data)
    if kind not in allowed:
        found = f"{kind} data" if kind else "unrecognised data"
        raise SliceError("not_tiff" if allowed == ("TIFF",) else "unsupported_format",
                         f"not a {'/'.join(allowed)} file ({found})")
    try:
        if kind == "TIFF":
            from brainseg_ray.data.tiff import decode_tiff

            return decode_tiff(data)
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB") if img.mode in ("P", "CMYK", "YCbCr") else img)
    except SliceError:
        raise
    except Exception as exc:  # decoders raise many types for damaged files
        raise SliceError("decode_error", f"cannot decode {kind}: {exc or type(exc).__name__}") from exc


def _as_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8)
    if pixels.dtype != np.uint8:
        raise SliceError("bad_dtype", f"expected 8-bit pixels, got {pixels.dtype}")
    return pixels


def to_image(pixels: np.ndarray, size: int = IMAGE_SIZE) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 [size,size,3], the source's (height, width)) from decoded pixels; 3-channel 8-bit only.
    Other sizes are resized bilinearly; the caller flags them by comparing the source size."""
    pixels = _as_uint8(pixels)
    if pixels.ndim == 3 and pixels.shape[0] == 3 and pixels.shape[-1] != 3:
        pixels = np.moveaxis(pixels, 0, -1)  # planar TIFF
    channels = 1 if pixels.ndim == 2 else pixels.shape[-1] if pixels.ndim == 3 else None
    if channels != 3:
        shape = "x".join(map(str, pixels.shape))
        raise SliceError(
            "bad_channels",
            f"expected 3 channels, got {channels}" if channels else f"expected a 2-D slice, got shape {shape}",
        )
    source_hw = (int(pixels.shape[0]), int(pixels.shape[1]))
    if source_hw == (size, size):
        return np.ascontiguousarray(pixels), source_hw
    import cv2

    return cv2.resize(pixels, (size, size), interpolation=cv2.INTER_LINEAR), source_hw


def to_mask(pixels: np.ndarray, image_hw: tuple[int, int], size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [size,size] in {0,1} from a decoded mask in {0,1} or {0,255} of the image's size."""
    pixels = _as_uint8(pixels)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim != 2:
        raise SliceError("bad_channels", f"expected a 1-channel mask, got shape {'x'.join(map(str, pixels.shape))}")
    if pixels.shape != tuple(image_hw):
        raise SliceError(
            "mask_shape",
            f"mask is {pixels.shape[1]}x{pixels.shape[0]} but its image is {image_hw[1]}x{image_hw[0]}",
        )
    counts = np.bincount(pixels.ravel(), minlength=256)  # faster than np.unique on uint8
    counts[list(MASK_VALUES)] = 0
    unexpected = np.flatnonzero(counts)
    if unexpected.size:
        shown = ", ".join(map(str, unexpected[:5])) + (", ..." if unexpected.size > 5 else "")
        raise SliceError("bad_mask_values", f"mask has values other than 0/1/255: {shown}")
    mask = (pixels > 0).astype(np.uint8)
    if mask.shape != (size, size):
        import cv2

        mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
    return mask
