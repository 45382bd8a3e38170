"""The Segmenter: one class from slices to masks, findings and overlays.

The bulk job's actors and the Serve replicas both hold one, so the same slice gets the same
answer from both. It joins the Predictor (artifact, preprocessing, forward pass) with
postprocess.py (threshold, small components, per-patient 3-D largest component, findings) and
rendering.py (the overlay).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from brainseg_ray.config import SegmenterConfig
from brainseg_ray.inference.postprocess import Findings, PostprocessOptions, findings, postprocess
from brainseg_ray.inference.predictor import Predictor
from brainseg_ray.models.artifact import ModelArtifact, load_artifact
from brainseg_ray.rendering import OVERLAY_STYLES, overlay
from brainseg_ray.storage import S3Options


@dataclass
class SliceSegmentation:
    mask: np.ndarray  # uint8 {0,1} [H,W]
    probability: np.ndarray  # float32 [H,W]
    findings: Findings


class Segmenter:
    def __init__(self, cfg: SegmenterConfig, artifact: ModelArtifact | None = None,
                 s3: S3Options | None = None, use_gpu: bool | None = None, spin: bool = True):
        """`artifact`: cfg.model already loaded; else cfg.model is loaded, an s3:// one through `s3`.
        `use_gpu`: true or false as the job decided for its actor (None: a GPU when one is visible).
        `spin=False`: the forward pass's idle threads sleep (a Serve replica between requests)."""
        if cfg.overlay_style not in OVERLAY_STYLES:
            raise ValueError(f"unknown overlay_style {cfg.overlay_style!r}; expected one of {', '.join(OVERLAY_STYLES)}")
        if artifact is None:
            if not cfg.model:
                raise ValueError("the segmenter needs a model artifact (model=...)")
            artifact = load_artifact(cfg.model, s3)
        self.cfg = cfg
        self.predictor = Predictor(artifact, use_gpu=use_gpu, precision=cfg.precision,
                                   channels_last=cfg.channels_last, batch_size=cfg.batch_size, threads=cfg.threads,
                                   backend=cfg.backend, spin=spin)
        threshold = self.predictor.threshold if cfg.threshold is None else cfg.threshold
        chosen = self.predictor.metadata.get("postprocess") or {}  # what the model's validation chose

        def setting(name: str, off):  # this config's value, else the model's choice, else off
            value = getattr(cfg, name)
            return chosen.get(name, off) if value is None else value

        self.tta = bool(setting("tta", False))
        self.options = PostprocessOptions(threshold=threshold, min_component_px=int(setting("min_component_px", 0)),
                                          min_component_peak=float(setting("min_component_peak", 0.0)),
                                          largest_component_3d=bool(setting("largest_component_3d", False)),
                                          keep_3d_fraction=float(setting("keep_3d_fraction", 1.0)),
                                          pixel_spacing_mm=cfg.pixel_spacing_mm,
                                          slice_thickness_mm=cfg.slice_thickness_mm)

    def postprocess_settings(self) -> dict:
        """The post-processing in force, as model.json's "postprocess" records it."""
        o = self.options
        return {"min_component_px": o.min_component_px, "min_component_peak": o.min_component_peak,
                "largest_component_3d": o.largest_component_3d, "keep_3d_fraction": o.keep_3d_fraction,
                "tta": self.tta}

    @property
    def version(self) -> str:
        return self.predictor.version

    @property
    def metadata(self) -> dict:
        return self.predictor.metadata

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N,H,W,3] -> float32 [N,H,W]; with tta, the mean over the slice and its
        horizontal and vertical flips (each flipped back)."""
        probs = self.predictor.probabilities(images)
        if not self.tta or len(images) == 0:
            return probs
        total = probs.astype(np.float64)
        for axis in (2, 1):  # width, then height of [N,H,W,3]
            flipped = self.predictor.probabilities(np.ascontiguousarray(np.flip(images, axis=axis)))
            total += np.flip(flipped, axis=axis)
        return (total / 3).astype(np.float32)

    def segment(self, images: np.ndarray, patient_ids=None, slice_indices=None,
                timings: dict | None = None) -> list[SliceSegmentation]:
        """Masks and findings for a batch of slices. With largest_component_3d, each patient's
        slices must all be in this batch (ids and slice indices given). `timings` gets the
        forward pass's milliseconds ("forward_ms")."""
        started = time.perf_counter()
        probs = self.probabilities(images)
        if timings is not None:
            timings["forward_ms"] = (time.perf_counter() - started) * 1000
        masks = postprocess(probs, self.options, patient_ids, slice_indices)
        found = findings(masks, probs, self.options.pixel_spacing_mm)
        return [SliceSegmentation(mask=m, probability=p, findings=f) for m, p, f in zip(masks, probs, found)]

    def overlay(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The mask drawn on the slice's FLAIR channel, uint8 [H,W,3]."""
        return overlay(image, mask, style=self.cfg.overlay_style)
