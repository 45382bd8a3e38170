"""The one check that an array is a binary mask, shared by the metrics and the post-processing."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_mask(a: Any, name: str = "mask") -> np.ndarray:
    """`a` as a bool array: bool as it is, or numbers that are all 0 or 1.

    Anything else (probabilities, logits, masks still in the 0/255 file convention, text) is a
    ValueError naming `name`: binarising it silently would hide a missing threshold step.
    """
    arr = np.asarray(a)
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be a bool or 0/1 numeric array, got dtype {arr.dtype}")
    if arr.size:
        # uint8, the masks' own type, is checked by its maximum: one pass instead of three.
        bad = int(arr.max()) > 1 if arr.dtype == np.uint8 else not bool(((arr == 0) | (arr == 1)).all())
        if bad:
            raise ValueError(f"{name} must hold only 0 and 1 (threshold probabilities first; 0/255 masks "
                             f"must be divided by 255), got values in [{arr.min()}, {arr.max()}]")
    return arr != 0
