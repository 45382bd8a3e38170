"""Data profile of an ingest (written into its manifest.json) and a PNG chart of it.

The ingest job emits one small stats row per written slice::

    {"patient_id": "TCGA_CS_4943_20000902",
     "has_tumor": True | False | None,          # None: the slice has no mask
     "channel_sum": [float, float, float],      # sum of pixel values (0..255) per channel
     "channel_sumsq": [float, float, float],    # sum of squared pixel values per channel
     "pixels": int}                             # pixels per channel in the slice

``build_profile`` folds those rows into counts per institution and per-channel intensity
statistics; ``plot_profile`` draws the profile as one PNG figure.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from brainseg_ray.data.schema import CHANNEL_NAMES
from brainseg_ray.plotting import new_figure


def institution_of(patient_id: str) -> str:
    """Institution code of a TCGA patient id: its second underscore-separated field.

    ``'TCGA_CS_4943_20000902' -> 'CS'``; ``''`` when the id has no second field
    (``'TCGA'``, ``''``) or it is empty (``'TCGA__4943'``).
    """
    fields = patient_id.split("_")
    return fields[1] if len(fields) > 1 else ""


@dataclass
class _Counts:
    patients: set[str] = field(default_factory=set)
    slices: int = 0
    tumour_slices: int = 0
    unlabelled_slices: int = 0

    def add(self, patient_id: str, has_tumor: bool | None) -> None:
        self.patients.add(patient_id)
        self.slices += 1
        if has_tumor is None:
            self.unlabelled_slices += 1
        elif has_tumor:
            self.tumour_slices += 1


class _ChannelMoments:
    """Per-channel pixel count, mean and sum of squared deviations, merged slice by slice.

    Turning each slice's sums into (mean, M2) and merging with Chan et al.'s pairwise formula
    avoids the cancellation of the one-shot ``sumsq / n - mean**2`` over a whole data set.
    """

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.mean = np.zeros(channels, dtype=np.float64)
        self.m2 = np.zeros(channels, dtype=np.float64)

    def add(self, pixels: int, channel_sum: np.ndarray, channel_sumsq: np.ndarray) -> None:
        if pixels == 0:
            return
        mean_b = channel_sum / pixels
        # Rounding in the producer can leave sumsq a hair below sum**2 / n for flat slices.
        m2_b = np.maximum(channel_sumsq - channel_sum * mean_b, 0.0)
        n = self.n + pixels
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (pixels / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * pixels / n)
        self.n = n

    def mean_std(self) -> tuple[list[float | None], list[float | None]]:
        if self.n == 0:
            nothing = [None] * len(self.mean)
            return nothing, list(nothing)
        std = np.sqrt(np.maximum(self.m2 / self.n, 0.0))
        return [float(m) for m in self.mean], [float(s) for s in std]


def build_profile(rows: Iterable[Mapping]) -> dict:
    """Fold per-slice stats rows into the JSON-ready data profile of an ingest.

    Returns::

        {"patients": int, "slices": int, "tumour_slices": int, "unlabelled_slices": int,
         "patients_with_tumour": int,
         "institutions": {"CS": {"patients": int, "slices": int, "tumour_slices": int,
                                 "unlabelled_slices": int}, ...},      # keys sorted
         "channels": {"names": ["pre-contrast", "FLAIR", "post-contrast"],
                      "mean": [3 floats], "std": [3 floats]}}

    Counting rules:

    * ``has_tumor`` None (or missing) means the slice has no mask: it counts as *unlabelled*,
      never as tumour-free, so tumour-free slices are ``slices - tumour_slices -
      unlabelled_slices``. A patient counts towards ``patients_with_tumour`` when at least one
      of its slices has tumour.
    * Patients whose id has no institution field are grouped under ``""``.
    * ``mean``/``std`` are over all pixels of all slices, on the 0..255 scale; ``std`` is the
      population standard deviation (``ddof=0``, like ``numpy.std``), computed in float64 with
      any tiny negative variance from rounding clamped to 0.
    * No rows (or no pixels at all): counts are 0, ``institutions`` is ``{}`` and ``mean`` and
      ``std`` are ``[None, None, None]`` -- "unknown", because 0.0 would pass for a real
      statistic and a std of 0 would break normalisation downstream.

    Raises:
        ValueError: a row whose channel sums are not 3 values, or whose ``pixels`` is negative.
        KeyError: a row without ``patient_id``, ``channel_sum``, ``channel_sumsq`` or ``pixels``.
    """
    overall = _Counts()
    by_institution: dict[str, _Counts] = {}
    tumour_patients: set[str] = set()
    moments = _ChannelMoments(len(CHANNEL_NAMES))

    for row in rows:
        patient_id = str(row["patient_id"])
        has_tumor = row.get("has_tumor")
        has_tumor = None if has_tumor is None else bool(has_tumor)
        overall.add(patient_id, has_tumor)
        by_institution.setdefault(institution_of(patient_id), _Counts()).add(patient_id, has_tumor)
        if has_tumor:
            tumour_patients.add(patient_id)
        moments.add(*_channel_sums(row))

    mean, std = moments.mean_std()
    return {
        "patients": len(overall.patients),
        "slices": overall.slices,
        "tumour_slices": overall.tumour_slices,
        "unlabelled_slices": overall.unlabelled_slices,
        "patients_with_tumour": len(tumour_patients),
        "institutions": {name: _counts_dict(by_institution[name]) for name in sorted(by_institution)},
        "channels": {"names": list(CHANNEL_NAMES), "mean": mean, "std": std},
    }


def _channel_sums(row: Mapping) -> tuple[int, np.ndarray, np.ndarray]:
    pixels = int(row["pixels"])
    channel_sum = np.asarray(row["channel_sum"], dtype=np.float64)
    channel_sumsq = np.asarray(row["channel_sumsq"], dtype=np.float64)
    if pixels < 0:
        raise ValueError(f"pixels must be >= 0, got {pixels} for {row['patient_id']}")
    expected = (len(CHANNEL_NAMES),)
    if channel_sum.shape != expected or channel_sumsq.shape != expected:
        raise ValueError(
            f"channel_sum and channel_sumsq need {len(CHANNEL_NAMES)} values {CHANNEL_NAMES}, got "
            f"shapes {channel_sum.shape} and {channel_sumsq.shape} for {row['patient_id']}"
        )
    return pixels, channel_sum, channel_sumsq


def _counts_dict(counts: _Counts) -> dict[str, int]:
    return {
        "patients": len(counts.patients),
        "slices": counts.slices,
        "tumour_slices": counts.tumour_slices,
        "unlabelled_slices": counts.unlabelled_slices,
    }


# --- chart ------------------------------------------------------------------------------------

_TUMOUR_COLOUR = "#d62728"
_NO_TUMOUR_COLOUR = "#1f77b4"
_UNLABELLED_COLOUR = "#bbbbbb"


def plot_profile(profile: dict, path: str | os.PathLike | BinaryIO) -> None:
    """Write a PNG chart of ``profile`` (as returned by ``build_profile``) to ``path``.

    Three panels: (a) slices with / without tumour (plus unlabelled, when any) overall and per
    institution, as stacked bars -- the data set's distribution of diagnosis; (b) patients per
    institution; (c) per-channel intensity mean +- std. An empty profile still gives a valid chart
    with "no data" notes.
    """
    fig = new_figure((15, 4.8), layout="constrained")
    slices_ax, patients_ax, channels_ax = fig.subplots(1, 3, width_ratios=[1.4, 1.0, 1.0])
    _plot_diagnosis(slices_ax, profile)
    _plot_patients(patients_ax, profile)
    _plot_channels(channels_ax, profile)
    fig.suptitle(
        f"Data profile: {profile.get('patients', 0)} patients "
        f"({profile.get('patients_with_tumour', 0)} with tumour), {profile.get('slices', 0)} slices "
        f"({profile.get('tumour_slices', 0)} with tumour)",
        fontsize=13,
    )
    fig.savefig(path, format="png", dpi=100)


def _slice_groups(profile: dict) -> tuple[list[str], list[int], list[int], list[int]]:
    """Bar labels and with / without / unlabelled slice counts: 'all' first, then institutions."""
    groups = [("all", profile)] + [(name or "?", c) for name, c in profile.get("institutions", {}).items()]
    labels, tumour, no_tumour, unlabelled = [], [], [], []
    for label, counts in groups:
        t, u = counts.get("tumour_slices", 0), counts.get("unlabelled_slices", 0)
        labels.append(label)
        tumour.append(t)
        unlabelled.append(u)
        no_tumour.append(counts.get("slices", 0) - t - u)
    return labels, tumour, no_tumour, unlabelled


def _plot_diagnosis(ax, profile: dict) -> None:
    labels, tumour, no_tumour, unlabelled = _slice_groups(profile)
    x = np.arange(len(labels))
    ax.bar(x, no_tumour, color=_NO_TUMOUR_COLOUR, label="without tumour")
    ax.bar(x, tumour, bottom=no_tumour, color=_TUMOUR_COLOUR, label="with tumour")
    if any(unlabelled):
        bottom = np.add(no_tumour, tumour)
        ax.bar(x, unlabelled, bottom=bottom, color=_UNLABELLED_COLOUR, label="no mask")
    for xi, t, total in zip(x, tumour, np.add(np.add(no_tumour, tumour), unlabelled)):
        if total:
            ax.annotate(f"{t / total:.0%}", (xi, total), ha="center", va="bottom", fontsize=8)
    if len(labels) > 1:
        ax.axvline(0.5, color="#444444", linewidth=0.8, linestyle=":")  # 'all' vs institutions
    ax.set_xticks(x, labels)
    ax.set_xlabel("institution (label: share of slices with tumour)")
    ax.set_ylabel("slices")
    ax.set_title("(a) Slices with / without tumour")
    handles, names = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], names[::-1], loc="upper right", fontsize=8)  # same order as the stack
    if not profile.get("slices"):
        _no_data(ax)


def _plot_patients(ax, profile: dict) -> None:
    institutions = profile.get("institutions", {})
    labels = [name or "?" for name in institutions]
    counts = [c.get("patients", 0) for c in institutions.values()]
    x = np.arange(len(labels))
    bars = ax.bar(x, counts, color="#7f7f7f")
    ax.bar_label(bars, fontsize=8)
    ax.set_xticks(x, labels)
    ax.set_xlabel("institution")
    ax.set_ylabel("patients")
    ax.set_title("(b) Patients per institution")
    if not institutions:
        _no_data(ax)


def _plot_channels(ax, profile: dict) -> None:
    channels = profile.get("channels", {})
    names = channels.get("names", list(CHANNEL_NAMES))
    mean, std = channels.get("mean") or [None] * len(names), channels.get("std") or [None] * len(names)
    x = np.arange(len(names))
    known = [m is not None and s is not None for m, s in zip(mean, std)]
    heights = [m if ok else 0.0 for m, ok in zip(mean, known)]
    errors = [s if ok else 0.0 for s, ok in zip(std, known)]
    ax.bar(x, heights, yerr=errors, capsize=6, color=["#9467bd", "#2ca02c", "#ff7f0e"][: len(names)])
    for xi, m, s, ok in zip(x, mean, std, known):
        if ok:
            ax.annotate(f"{m:.1f} ± {s:.1f}", (xi, m + s), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(x, names)
    # Pixel values are 0..255, but mean + std of a skewed channel can reach past 255.
    top = max([255.0] + [m + s for m, s, ok in zip(mean, std, known) if ok])
    ax.set_ylim(0, top * 1.1)
    ax.set_ylabel("intensity (0..255)")
    ax.set_title("(c) Channel intensity, mean ± std")
    if not any(known):
        _no_data(ax)


def _no_data(ax) -> None:
    if ax.get_ylim()[0] < 0:  # an empty bar chart autoscales around 0
        ax.set_ylim(0, 1)
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center",
            color="#888888", fontsize=14)
