"""One uploaded slice, from request bytes to the model's uint8 [256,256,3] input.

Decoding and validation are the ingest's own (data/decode.py), so an upload is accepted or refused
for the same reasons as a file in a data set. Every refusal is an UploadError carrying the HTTP
status a client should get: 415 for a type we do not read, 400 for data we cannot use.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from brainseg_ray.data.decode import SliceError, read_pixels, sniff_format, to_image

FORMATS = ("TIFF", "PNG", "JPEG")
MEDIA_TYPES = {"image/tiff": "TIFF", "image/tif": "TIFF", "image/png": "PNG", "image/jpeg": "JPEG",
               "image/jpg": "JPEG", "image/pjpeg": "JPEG"}
# Declared types that say nothing about the bytes: the bytes decide. curl --data-binary sends
# application/x-www-form-urlencoded unless told otherwise.
NEUTRAL_TYPES = ("", "application/octet-stream", "binary/octet-stream", "application/x-www-form-urlencoded")


class UploadError(ValueError):
    def __init__(self, status: int, code: str, reason: str):
        super().__init__(reason)
        self.status, self.code, self.reason = status, code, reason


@dataclass(frozen=True)
class Upload:
    image: np.ndarray  # uint8 [256,256,3]
    format: str  # TIFF | PNG | JPEG
    width: int  # the upload's own size, before any resize
    height: int

    @property
    def resized(self) -> bool:
        return (self.height, self.width) != self.image.shape[:2]

    def describe(self) -> dict:
        return {"format": self.format, "width": self.width, "height": self.height, "resized": self.resized,
                "model_input": [int(self.image.shape[1]), int(self.image.shape[0])]}


def media_type(content_type: str | None) -> str:
    """'image/png; charset=x' -> 'image/png' (lower case, parameters dropped)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_upload(data: bytes, content_type: str | None, max_pixels: int) -> Upload:
    """The slice in `data`, or UploadError. The bytes' own signature decides the format; a
    declared type only matters when the bytes are not an image we know."""
    declared = media_type(content_type)
    if not data:
        raise UploadError(400, "empty_body", "the request has no image data (empty body or file)")
    kind = sniff_format(data)
    if kind is None:
        if declared in MEDIA_TYPES:
            raise UploadError(400, "decode_error", f"the data is not a valid {MEDIA_TYPES[declared]} file "
                                                   f"(declared {declared}, no {MEDIA_TYPES[declared]} signature)")
        raise UploadError(415, "unsupported_type",
                          f"unsupported type {declared or 'unknown'}: send a TIFF, PNG or JPEG slice")
    if kind not in FORMATS:
        raise UploadError(415, "unsupported_type", f"unsupported type {kind}: send a TIFF, PNG or JPEG slice")
    if declared not in NEUTRAL_TYPES and declared not in MEDIA_TYPES and not declared.startswith("image/"):
        # e.g. text/plain or application/json around image bytes: a client bug worth naming
        raise UploadError(415, "unsupported_type", f"unsupported Content-Type {declared}: use image/tiff, "
                                                   "image/png, image/jpeg or application/octet-stream")
    pixels_hw = _declared_size(data, kind)
    if pixels_hw is not None and pixels_hw[0] * pixels_hw[1] > max_pixels:
        raise UploadError(400, "too_many_pixels", f"the slice is {pixels_hw[1]}x{pixels_hw[0]} pixels; "
                                                  f"at most {max_pixels} pixels are accepted")
    try:
        image, (height, width) = to_image(read_pixels(data, allowed=FORMATS))
    except SliceError as exc:
        raise UploadError(400, exc.code, exc.reason) from exc
    return Upload(image=image, format=kind, width=width, height=height)


def _declared_size(data: bytes, kind: str) -> tuple[int, int] | None:
    """(height, width) from the file's header, without decoding pixels; None when unreadable
    (decoding then reports the damage)."""
    try:
        if kind == "TIFF":
            import tifffile

            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                page = tif.pages.first
                return int(page.imagelength), int(page.imagewidth)
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            return int(img.height), int(img.width)
    except Exception:  # damaged headers: read_pixels names the problem
        return None
