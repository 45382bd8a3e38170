"""The Segmenter: the artifact's predictions through post-processing into masks and findings."""

from __future__ import annotations

import numpy as np
import pytest

from brainseg_ray.compat import ensure_torchvision_importable
from brainseg_ray.config import SegmenterConfig
from brainseg_ray.inference.postprocess import PostprocessOptions, findings, postprocess
from brainseg_ray.inference.segmenter import Segmenter
from brainseg_ray.models.artifact import save_untrained_artifact
from brainseg_ray.models.spec import ModelSpec

ensure_torchvision_importable()
NORMALISATION = {"mean": [0.1, 0.1, 0.1], "std": [0.2, 0.2, 0.2]}


@pytest.fixture(scope="module")
def artifact_uri(tmp_path_factory) -> str:
    return save_untrained_artifact(str(tmp_path_factory.mktemp("seg") / "model"), ModelSpec("unet", base_filters=4),
                                   seed=0, normalisation=NORMALISATION, threshold=0.5, input_size=64)


@pytest.fixture(scope="module")
def slices() -> np.ndarray:
    rng = np.random.default_rng(4)
    images = rng.integers(0, 80, (4, 64, 64, 3), dtype=np.uint8)
    images[:, 20:36, 24:44, 1] = 230  # a bright FLAIR patch: something for the model to react to
    return images


def test_segment_is_the_predictor_plus_postprocess(artifact_uri, slices):
    segmenter = Segmenter(SegmenterConfig(model=artifact_uri, threshold=0.5, min_component_px=5, precision="fp32"))
    results = segmenter.segment(slices)
    probs = segmenter.predictor.probabilities(slices)
    expected = postprocess(probs, PostprocessOptions(threshold=0.5, min_component_px=5))
    assert len(results) == 4
    for result, mask, prob, finding in zip(results, expected, probs, findings(expected, probs)):
        assert np.array_equal(result.mask, mask) and np.array_equal(result.probability, prob)
        assert result.findings == finding
    assert segmenter.version == segmenter.metadata["version"]


def test_threshold_comes_from_the_artifact_unless_given(artifact_uri, slices):
    assert Segmenter(SegmenterConfig(model=artifact_uri)).options.threshold == 0.5
    low = Segmenter(SegmenterConfig(model=artifact_uri, threshold=0.01, precision="fp32")).segment(slices)
    high = Segmenter(SegmenterConfig(model=artifact_uri, threshold=0.99, precision="fp32")).segment(slices)
    assert sum(r.findings.tumor_area_px for r in low) > sum(r.findings.tumor_area_px for r in high)


def test_tta_averages_the_flips(artifact_uri, slices):
    plain = Segmenter(SegmenterConfig(model=artifact_uri, precision="fp32"))
    tta = Segmenter(SegmenterConfig(model=artifact_uri, precision="fp32", tta=True))
    p = plain.predictor.probabilities
    expected = (p(slices) + p(slices[:, :, ::-1].copy())[:, :, ::-1] + p(slices[:, ::-1].copy())[:, ::-1]) / 3
    assert np.allclose(tta.probabilities(slices), expected, atol=1e-6)
    assert not np.allclose(tta.probabilities(slices), p(slices), atol=1e-4)


def test_pixel_spacing_scales_the_area(artifact_uri, slices):
    result = Segmenter(SegmenterConfig(model=artifact_uri, threshold=0.3, pixel_spacing_mm=0.5,
                                       precision="fp32")).segment(slices[:1])[0]
    assert result.findings.tumor_area_mm2 == pytest.approx(result.findings.tumor_area_px * 0.25)


def test_3d_component_needs_patient_ids_and_keeps_one_component(artifact_uri, slices):
    # An untrained model's probabilities lie within 0.5 +- 0.01: this threshold leaves many blobs.
    segmenter = Segmenter(SegmenterConfig(model=artifact_uri, threshold=0.4995, largest_component_3d=True,
                                          precision="fp32"))
    with pytest.raises(ValueError):
        segmenter.segment(slices)
    from scipy import ndimage

    results = segmenter.segment(slices, patient_ids=["P"] * 4, slice_indices=[1, 2, 3, 4])
    volume = np.stack([r.mask for r in results])
    assert ndimage.label(volume, structure=np.ones((3, 3, 3)))[1] == 1
    # Without the option the same slices have several components: the option did the work.
    plain = Segmenter(SegmenterConfig(model=artifact_uri, threshold=0.4995, precision="fp32")).segment(slices)
    assert ndimage.label(np.stack([r.mask for r in plain]), structure=np.ones((3, 3, 3)))[1] > 1


def test_overlay_and_bad_settings(artifact_uri, slices):
    segmenter = Segmenter(SegmenterConfig(model=artifact_uri, overlay_style="tint"))
    result = segmenter.segment(slices[:1])[0]
    drawn = segmenter.overlay(slices[0], result.mask)
    assert drawn.shape == (64, 64, 3) and drawn.dtype == np.uint8
    with pytest.raises(ValueError, match="overlay_style"):
        Segmenter(SegmenterConfig(model=artifact_uri, overlay_style="glow"))
    with pytest.raises(ValueError, match="needs a model"):
        Segmenter(SegmenterConfig(model=""))


def test_post_processing_comes_from_the_artifact_unless_given(artifact_uri, slices, tmp_path):
    from brainseg_ray.models.artifact import export_artifact

    chosen = str(tmp_path / "chosen")
    export_artifact(artifact_uri, chosen, threshold=0.3, postprocess={"min_component_px": 7,
                                                                     "largest_component_3d": True})
    options = Segmenter(SegmenterConfig(model=chosen)).options
    assert (options.threshold, options.min_component_px, options.largest_component_3d) == (0.3, 7, True)
    told = Segmenter(SegmenterConfig(model=chosen, threshold=0.6, min_component_px=0,
                                     largest_component_3d=False)).options
    assert (told.threshold, told.min_component_px, told.largest_component_3d) == (0.6, 0, False)
    plain = Segmenter(SegmenterConfig(model=artifact_uri)).options  # an artifact that chose nothing
    assert (plain.min_component_px, plain.largest_component_3d) == (0, False)


def test_the_models_chosen_post_processing_applies_unless_overridden(artifact_uri, slices, tmp_path):
    """`brainseg export` records the post-processing chosen on validation (TTA included); a
    Segmenter applies it by default, and its own settings win over it."""
    from brainseg_ray.cli import main

    chosen = str(tmp_path / "chosen")
    assert main(["export", artifact_uri, "--out", chosen, "--tta", "--min-component-peak", "0.9",
                 "--largest-component-3d", "--keep-3d-fraction", "0.25"]) == 0
    default = Segmenter(SegmenterConfig(model=chosen))
    assert default.tta is True
    assert default.postprocess_settings() == {"min_component_px": 0, "min_component_peak": 0.9,
                                              "largest_component_3d": True, "keep_3d_fraction": 0.25, "tta": True}
    plain = Segmenter(SegmenterConfig(model=artifact_uri))
    flipped = np.ascontiguousarray(slices[:, :, ::-1])
    expected = (plain.probabilities(slices) + plain.probabilities(flipped)[:, :, ::-1]
                + plain.probabilities(np.ascontiguousarray(slices[:, ::-1]))[:, ::-1]) / 3
    np.testing.assert_allclose(default.probabilities(slices), expected, atol=1e-5)
    overridden = Segmenter(SegmenterConfig(model=chosen, tta=False, min_component_peak=0.0,
                                           largest_component_3d=False))
    assert overridden.postprocess_settings()["tta"] is False
    np.testing.assert_array_equal(overridden.probabilities(slices), plain.probabilities(slices))
