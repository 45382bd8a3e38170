"""One synthetic LGG-like patient: a seeded stack of 3-channel slices and its lesion mask.

Every slice is a 3-channel 8-bit image (pre-contrast T1, FLAIR, post-contrast T1) of an
elliptical head with scalp, skull, cortex with sulci, white matter and ventricles; a patient with
a lesion carries one irregular 3-D lesion that is clearly bright in FLAIR and only faintly visible
in the T1 channels. The mask is exactly the lesion region (0 / 255). synthetic.py writes
patients in the kaggle_3m layout.

Pixels come from elementwise arithmetic, ``sqrt`` and scipy filters only (no vectorised exp/sin
or BLAS, whose SIMD code paths may round differently on other CPUs), to keep files identical
across machines as far as practical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["synthesize_patient"]

# Tissue intensities (T1, FLAIR, T1c) on 0..255, close to the real slices' values.
_SCALP = np.array([125.0, 105.0, 135.0])
_BONE = np.array([14.0, 10.0, 16.0])
_CSF = np.array([30.0, 24.0, 34.0])
_GREY = np.array([56.0, 72.0, 58.0])
_WHITE = np.array([68.0, 60.0, 66.0])
_VENTRICLE = np.array([26.0, 20.0, 30.0])
# Lesion = white matter + FLAIR delta * these factors: bright in FLAIR, faintly dark in T1/T1c.
_LESION_GAIN = np.array([-0.25, 1.0, -0.15])


# ----------------------------------------------------------------------------- small helpers

_F32 = np.float32


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """0 below lo, 1 above hi, C1-smooth in between (a polynomial, so bit-stable on any CPU)."""
    t = x - _F32(lo)
    t *= _F32(1.0 / (hi - lo))
    np.clip(t, 0.0, 1.0, out=t)
    out = t * t
    t *= -2.0
    t += 3.0
    out *= t
    return out


def _ramp_down(x: np.ndarray, width: float) -> np.ndarray:
    """1 at x == 0 falling linearly to 0 at |x| >= width: thin lines along zero-crossings."""
    out = np.abs(x)
    out *= _F32(-1.0 / width)
    out += 1.0
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], scale_px: float,
                  z_sigma: float = 1.0) -> np.ndarray:
    """Zero-mean, unit-std float32 noise smooth over ~scale_px pixels and ~z_sigma slices.

    Filtered at quarter resolution and upsampled bilinearly: much cheaper than a wide filter at
    full resolution, and the field is smooth enough that the interpolation does not show.
    """
    n, h, w = shape
    field = rng.standard_normal((n, -(-h // 4) + 1, -(-w // 4) + 1))
    sigma_xy = max(scale_px / 4.0, 0.5)
    field = ndimage.gaussian_filter(field, (z_sigma if n > 1 else 0.0, sigma_xy, sigma_xy),
                                    mode="wrap")
    field = (field - field.mean()) / (field.std() + 1e-12)
    rows = _upsample4_rows(field.astype(_F32), h)
    cols = _upsample4_rows(np.ascontiguousarray(rows.transpose(0, 2, 1)), w)
    return np.ascontiguousarray(cols.transpose(0, 2, 1))


_UP_W = ((2 * np.arange(4) + 1) / 8).astype(_F32)[:, None]


def _upsample4_rows(field: np.ndarray, length: int) -> np.ndarray:
    """Bilinear x4 along axis 1: output row 4i+k blends coarse rows i and i+1 with weight
    (2k+1)/8. Broadcasting over contiguous rows is several times faster than scipy's zoom."""
    n, m, k = field.shape
    rows = field[:, :-1, None, :] * (1 - _UP_W) + field[:, 1:, None, :] * _UP_W
    return rows.reshape(n, 4 * (m - 1), k)[:, :length]


def _slice_positions(n: int) -> np.ndarray:
    """Relative position 0..1 of each slice along the volume."""
    return np.linspace(0.0, 1.0, n) if n > 1 else np.array([0.5])


def _slice_scale(n: int) -> np.ndarray:
    """Head size factor per slice: largest mid-volume, shrinking towards both ends."""
    t = _slice_positions(n)
    return np.maximum(np.sqrt(np.maximum(1.0 - ((t - 0.5) / 0.62) ** 2, 0.0)), 0.35)


@dataclass(frozen=True)
class _Head:
    """Per-volume geometry inside `box`, the head's bounding box: everything outside it is 0
    in every channel, so all further work is done on the box only."""
    box: tuple[slice, slice]  # rows, cols of the full image
    u: np.ndarray       # (1, h, w) head-frame coordinate, left-right (pixels)
    v: np.ndarray       # (1, h, w) head-frame coordinate, anterior(-) / posterior(+)
    depth: np.ndarray   # (n, h, w) approximate distance inside the head outline (<0 outside)
    brain0: float       # depth at which the brain starts (below scalp, skull and CSF rim)
    px: float           # pixels per pixel of the 256 grid, so anatomy scales with size

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.depth.shape


def _head_geometry(rng: np.random.Generator, n: int, size: int) -> _Head:
    px = size / 256.0
    cy, cx = size / 2 + np.clip(rng.normal(0, 3, 2), -6, 6) * px  # stays inside the frame
    phi = rng.uniform(-0.15, 0.15)
    a, b = rng.uniform(88, 98) * px, rng.uniform(104, 116) * px  # semi-axes: LR, AP
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c, s = float(np.cos(phi)), float(np.sin(phi))
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    # Normalised elliptic radius on the largest slice; egg-shaped (narrower at the front) and
    # with an irregular outline that is the same on every slice.
    rho = np.sqrt((u / (a * (1.0 + 0.07 * v / b))) ** 2 + (v / b) ** 2).astype(_F32)
    rho *= 1.0 + _F32(0.025) * _smooth_noise(rng, (1, size, size), 40 * px)[0]
    scale = _slice_scale(n).astype(_F32)
    radius = _F32(np.sqrt(a * b))
    # The head's soft edge ends 1 px outside the outline; 2 px of margin keeps it whole.
    inside = rho <= scale.max() + 2 * px / radius
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    # A slice scaled by s has radius rho / s, so depth = (1 - rho / s) * radius * s.
    depth = scale[:, None, None] - rho[box][None]
    depth *= radius
    scalp, bone = rng.uniform(4, 7) * px, rng.uniform(3, 5) * px
    return _Head(box=box, u=u[box].astype(_F32)[None], v=v[box].astype(_F32)[None],
                 depth=depth, brain0=scalp + bone + 2 * px, px=px)


def _ventricles(rng: np.random.Generator, head: _Head) -> tuple[slice, np.ndarray]:
    """Soft weight of two crescent-shaped lateral ventricles over the mid slices they occupy."""
    px, (n, h, w) = head.px, head.shape
    presence = np.maximum(1.0 - ((_slice_positions(n) - 0.5) / 0.2) ** 2, 0.0)
    du, vc = rng.uniform(9, 13) * px, rng.uniform(-8, 0) * px
    ru, rv = rng.uniform(5, 8) * px, rng.uniform(20, 28) * px
    tilt = rng.uniform(0.15, 0.35)
    present = np.flatnonzero(presence > 0)
    if present.size == 0:
        return slice(0, 0), np.zeros((0, h, w), _F32)
    zs = slice(int(present[0]), int(present[-1]) + 1)
    grow = np.sqrt(presence[zs]).astype(_F32)[:, None, None] + _F32(1e-3)
    weight = np.zeros((zs.stop - zs.start, h, w), _F32)
    for side in (-1.0, 1.0):
        c, s = float(np.cos(side * tilt)), float(np.sin(side * tilt))
        du_, dv_ = head.u - _F32(side * du), head.v - _F32(vc)
        uu, vv = (du_ * c + dv_ * s) / grow, (-du_ * s + dv_ * c) / grow
        outer = _smoothstep(1.0 - ((uu / ru) ** 2 + (vv / rv) ** 2), 0.0, 0.3)
        # The same ellipse shifted outwards carves the crescent (the caudate nucleus indent).
        inner = _smoothstep(
            1.0 - (((uu - _F32(side * 0.9 * ru)) / ru) ** 2 + (vv / (0.8 * rv)) ** 2), 0.0, 0.3)
        np.maximum(weight, outer * (1.0 - inner), out=weight)
    return zs, weight


# ----------------------------------------------------------------------------- lesion


def _lesion_mask(rng: np.random.Generator, head: _Head) -> np.ndarray:
    """Boolean (n, h, w): one connected irregular blob over a contiguous run of slices."""
    for _ in range(20):  # redraw in the rare case the blob ends up clipped away
        mask = _draw_blob(rng, head)
        if mask.any():
            return mask
    raise RuntimeError("could not place a lesion")  # pragma: no cover


def _draw_blob(rng: np.random.Generator, head: _Head) -> np.ndarray:
    """Union of a main ellipsoid and a few satellites, with a noisy outline."""
    px, (n, h, w) = head.px, head.shape
    run = int(min(rng.integers(4, 11), n))
    cz = float(np.clip(rng.uniform(0.3, 0.7) * (n - 1), (run - 1) / 2, (n - 1) - (run - 1) / 2))
    # Centre in the head frame, well inside the brain of the mid-volume slices.
    ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.5)
    cu, cv = rad * 60 * px * float(np.cos(ang)), rad * 75 * px * float(np.sin(ang))
    # Only slices the blob can reach are computed.
    zs = slice(max(int(cz - run / 2) - 2, 0), min(int(cz + run / 2) + 3, n))
    z = np.arange(zs.start, zs.stop, dtype=_F32)[:, None, None]
    field = np.full((zs.stop - zs.start, h, w), -np.inf, _F32)
    main_r = rng.uniform(12, 28, 2) * px
    for k in range(int(rng.integers(2, 5))):
        if k == 0:
            (ru, rv), offset = main_r, np.zeros(3)
            rz = (run + 1) / 2 * rng.uniform(0.9, 1.0)
        else:  # satellites make the outline lobulated but stay within the main run
            ru, rv = main_r * rng.uniform(0.4, 0.8, 2)
            offset = rng.normal(0, 1, 3) * np.array([0.5 * main_r[0], 0.5 * main_r[1], run / 6])
            offset[2] = np.clip(offset[2], -run / 4, run / 4)
            rz = (run + 1) / 2 * rng.uniform(0.4, 0.7)
        theta = rng.uniform(0, np.pi)
        c, s = float(np.cos(theta)), float(np.sin(theta))
        du, dv = head.u - _F32(cu + offset[0]), head.v - _F32(cv + offset[1])
        q = ((du * c + dv * s) / _F32(ru)) ** 2 + ((-du * s + dv * c) / _F32(rv)) ** 2 \
            + ((z - _F32(cz + offset[2])) / _F32(rz)) ** 2
        np.maximum(field, 1.0 - q, out=field)
    field += _F32(0.2) * _smooth_noise(rng, field.shape, 8 * px, z_sigma=0.7)
    mask = np.zeros(head.shape, bool)
    mask[zs] = (field > 0) & (head.depth[zs] > head.brain0 + 4 * px)
    return _trim_run(_largest_component(mask), min_area=40 * px * px)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """A face-connected 3-D component spans a contiguous run of slices by construction."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _trim_run(mask: np.ndarray, min_area: float) -> np.ndarray:
    """Drop specks at the ends of the run (trimming only the ends keeps it contiguous)."""
    keep = np.flatnonzero(mask.sum(axis=(1, 2)) >= min_area)
    out = np.zeros_like(mask)
    if keep.size:
        out[keep[0]:keep[-1] + 1] = mask[keep[0]:keep[-1] + 1]
    return out


def _run_slices(mask: np.ndarray) -> slice:
    hit = np.flatnonzero(mask.any(axis=(1, 2)))
    return slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, 0)


# ----------------------------------------------------------------------------- volume


def synthesize_patient(rng: np.random.Generator, n_slices: int, with_lesion: bool,
                       size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """images uint8 [n,size,size,3], masks uint8 [n,size,size] in {0,255}."""
    if n_slices < 1 or size < 32:
        raise ValueError(f"need n_slices >= 1 and size >= 32, got {n_slices}, {size}")
    head = _head_geometry(rng, n_slices, size)
    px, d, b0, shape = head.px, head.depth, head.brain0, head.shape
    gain = rng.uniform(0.9, 1.1, 3)  # scanner / patient intensity differences per channel

    # Layers outside in, each a soft step in depth that does not overlap the next, so an image
    # is a telescoping sum: scalp, then skull, then the CSF rim, then brain tissue.
    head_w = _smoothstep(d, -1.0 * px, 1.0 * px)
    bone_w = _smoothstep(d, b0 - 6.5 * px, b0 - 5.5 * px)
    rim_w = _smoothstep(d, b0 - 2.5 * px, b0 - 1.5 * px)
    brain_w = _smoothstep(d, b0 - 0.5 * px, b0 + 1.5 * px)

    # Brain: grey cortex along the surface and around sulci (zero-crossings of a noise field),
    # white matter inside, a dark falx on the midline, ventricles, the lesion.
    gyri = _smooth_noise(rng, shape, 3.5 * px, z_sigma=1.0)
    cortex_w = 1.0 - _smoothstep(d, b0 + 16 * px, b0 + 24 * px)
    csf_w = _ramp_down(gyri, 0.15)
    csf_w *= 0.8 * cortex_w
    np.maximum(csf_w, 0.5 * _ramp_down(head.u, 1.2 * px), out=csf_w)
    grey_w = _ramp_down(gyri, 0.5)
    grey_w *= cortex_w
    np.maximum(grey_w, 1.0 - _smoothstep(d, b0 + 5 * px, b0 + 10 * px), out=grey_w)
    vent_z, vent_w = _ventricles(rng, head)
    mask = _lesion_mask(rng, head) if with_lesion else np.zeros(shape, bool)
    les_z = _run_slices(mask)
    lesion_w = ndimage.gaussian_filter(mask[les_z].astype(_F32), (0, 1.2 * px, 1.2 * px))
    lesion_tex = np.ones_like(lesion_w)
    if lesion_w.size:
        lesion_tex += _F32(0.08) * _smooth_noise(rng, lesion_w.shape, 4 * px, z_sigma=0.7)

    texture = _smooth_noise(rng, shape, 24 * px, z_sigma=2.0)
    texture *= 0.05
    texture += 1.0
    fine = _smooth_noise(rng, shape, 2 * px, z_sigma=0.5)
    fine *= 2.0
    delta = rng.uniform(30, 60)  # FLAIR lesion contrast over white matter
    bias = _smooth_noise(rng, (1,) + shape[1:], 64 * px)  # coil-like: same on every slice
    bias *= 0.05
    bias += 1.0 + 0.08 * (rng.normal() * head.u + rng.normal() * head.v) / _F32(128 * px)
    noise_amp = _F32(2.0) * head_w  # the real slices' background is exactly 0

    images = np.zeros((n_slices, size, size, 3), np.uint8)
    for c in range(3):
        tissue = _F32(_GREY[c] - _WHITE[c]) * grey_w
        tissue += _WHITE[c]
        tissue *= texture
        tissue += fine
        tissue += (_F32(_CSF[c]) - tissue) * csf_w
        tissue[vent_z] += (_F32(_VENTRICLE[c]) - tissue[vent_z]) * vent_w
        lesion = _F32(_WHITE[c] + _LESION_GAIN[c] * delta) * lesion_tex
        tissue[les_z] += (lesion - tissue[les_z]) * lesion_w
        tissue -= _CSF[c]
        tissue *= brain_w
        tissue += _F32(_SCALP[c]) * head_w
        tissue += _F32(_BONE[c] - _SCALP[c]) * bone_w
        tissue += _F32(_CSF[c] - _BONE[c]) * rim_w
        tissue *= bias
        tissue *= _F32(gain[c])
        tissue += rng.standard_normal(shape, dtype=_F32) * noise_amp
        np.rint(tissue, out=tissue)
        np.clip(tissue, 0, 255, out=tissue)
        images[:, head.box[0], head.box[1], c] = tissue
    masks = np.zeros((n_slices, size, size), np.uint8)
    masks[:, head.box[0], head.box[1]] = mask.astype(np.uint8) * 255
    return images, masks
