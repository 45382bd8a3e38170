"""The ONNX Runtime backend: model.onnx in the artifact, the local cache for artifacts without one,
the backend choice and its fallback, and the same answers as torch on real slices."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from brainseg_ray.compat import ensure_torchvision_importable
from brainseg_ray.config import SegmenterConfig
from brainseg_ray.devices import resolve_backend
from brainseg_ray.inference import predictor as predictor_module
from brainseg_ray.inference.predictor import Predictor
from brainseg_ray.inference.segmenter import Segmenter
from brainseg_ray.models import onnx_graph
from brainseg_ray.models.artifact import ArtifactError, check_artifact, load_artifact
from brainseg_ray.models.reference import reference_model
from brainseg_ray.models.spec import ModelSpec

ensure_torchvision_importable()
NORMALISATION = {"mean": [0.1, 0.1, 0.1], "std": [0.2, 0.2, 0.2]}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BRAINSEG_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _artifact(path: Path, name: str = "unet", half: bool = False, **spec) -> str:
    from brainseg_ray.models.artifact import save_artifact
    from brainseg_ray.models.registry import build_model

    torch.manual_seed(1)
    model_spec = ModelSpec(name, **spec)
    save_artifact(str(path / "model"), build_model(model_spec).eval(), model_spec, normalisation=NORMALISATION,
                  input_size=64, half=half)
    return str(path / "model")


def _images(n: int = 4, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 90, (n, size, size, 3), dtype=np.uint8)
    images[:, 20:40, 18:42, 1] = 235
    return images


@pytest.mark.parametrize("name, spec, half", [("unet", {"base_filters": 4}, False), ("unet", {"base_filters": 4}, True),
                                              ("unet-efficientnet-lite0", {}, True)])
def test_model_onnx_holds_the_graph_and_reads_the_artifacts_own_weights(tmp_path, name, spec, half):
    uri = _artifact(tmp_path, name, half, **spec)
    meta = json.loads((Path(uri) / "model.json").read_text())
    graph_file, weights_file = Path(uri) / "model.onnx", Path(uri) / meta["weights_file"]
    assert meta["onnx_file"] == "model.onnx" and len(meta["onnx_sha256"]) == 64
    assert graph_file.stat().st_size < weights_file.stat().st_size / 2 or graph_file.stat().st_size < 100_000
    # A standard ONNX Runtime session from the folder, as other tools would open it.
    session = onnxruntime.InferenceSession(str(graph_file), providers=["CPUExecutionProvider"])
    artifact = load_artifact(uri)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = artifact.model(x).numpy()
    got = session.run(None, {"images": x.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())


def test_a_changed_model_onnx_is_refused(tmp_path):
    uri = _artifact(tmp_path)
    graph = Path(uri) / "model.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    for load in (load_artifact, check_artifact):
        with pytest.raises(ArtifactError, match="model.onnx does not match the SHA-256 in model.json"):
            load(uri)


def test_a_graph_without_its_hash_is_refused(tmp_path):
    uri = _artifact(tmp_path)
    meta_file = Path(uri) / "model.json"
    meta = json.loads(meta_file.read_text())
    del meta["onnx_sha256"]
    meta_file.write_text(json.dumps(meta))
    for load in (load_artifact, check_artifact):
        with pytest.raises(ArtifactError, match="model.json names model.onnx but records no onnx_sha256"):
            load(uri)


def test_checkpoints_leave_the_graph_out(tmp_path):
    from brainseg_ray.models.artifact import save_artifact
    from brainseg_ray.models.registry import build_model

    spec = ModelSpec("unet", base_filters=4)
    save_artifact(str(tmp_path / "c"), build_model(spec), spec, normalisation=NORMALISATION, onnx=False)
    assert not (tmp_path / "c" / "model.onnx").exists()
    assert "onnx_sha256" not in json.loads((tmp_path / "c" / "model.json").read_text())


def test_an_artifact_without_a_graph_is_exported_once_into_the_cache(tmp_path, private_cache, monkeypatch):
    uri = _artifact(tmp_path)
    meta_file = Path(uri) / "model.json"
    meta = json.loads(meta_file.read_text())
    for key in ("onnx_file", "onnx_sha256"):
        meta.pop(key)
    meta_file.write_text(json.dumps(meta))
    (Path(uri) / "model.onnx").unlink()  # as an artifact written before the graph existed
    images = _images()
    first = Predictor(load_artifact(uri), backend="onnxruntime").probabilities(images)
    cached = private_cache / "onnx" / f"{meta['weights_sha256']}.onnx"
    assert cached.is_file()

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr("brainseg_ray.models.onnx_cache.export_onnx", no_export)
    again = Predictor(load_artifact(uri), backend="onnxruntime")
    assert again.backend == "onnxruntime" and np.array_equal(again.probabilities(images), first)


@pytest.mark.parametrize("backend, device, precision, expected", [
    ("auto", "cpu", "fp32", "onnxruntime"),
    ("auto", "cpu", "auto", "onnxruntime"),  # also where auto precision would be bf16 for torch
    ("auto", "cpu", "bf16", "torch"),  # bf16 by name: only torch has it
    ("auto", "cuda", "auto", "torch"),
    ("auto", "cuda", "fp32", "torch"),
    ("torch", "cpu", "fp32", "torch"),
    ("onnxruntime", "cpu", "bf16", "onnxruntime"),
])
def test_backend_choice(backend, device, precision, expected):
    assert resolve_backend(backend, torch.device(device), precision) == expected


@pytest.mark.parametrize("backend, device, message", [("tensorrt", "cpu", "unknown backend 'tensorrt'"),
                                                      ("onnxruntime", "cuda", "runs on the CPU")])
def test_backend_choice_refuses(backend, device, message):
    with pytest.raises(ValueError, match=message):
        resolve_backend(backend, torch.device(device), "fp32")


def test_the_predictor_runs_onnxruntime_in_float32_with_its_own_batch_size(tmp_path):
    artifact = load_artifact(_artifact(tmp_path))
    ort = Predictor(artifact, threads=1)  # the defaults: backend and precision auto
    eager = Predictor(artifact, backend="torch", precision="fp32", threads=1)
    assert (ort.backend, ort.precision, ort.batch_size) == ("onnxruntime", "fp32", 4)
    assert (eager.backend, eager.batch_size) == ("torch", 2)
    assert ort.session.get_session_options().intra_op_num_threads == 1
    images = _images(5)  # two ORT batches (4 + 1)
    assert np.abs(ort.probabilities(images) - eager.probabilities(images)).max() < 1e-5
    assert ort.probabilities(images[:0]).shape == (0, 64, 64)


def test_without_onnxruntime_auto_falls_back_to_torch_with_one_warning(tmp_path, monkeypatch, caplog):
    artifact = load_artifact(_artifact(tmp_path))
    monkeypatch.setattr(predictor_module, "onnxruntime_or_reason", lambda: (None, "onnxruntime does not load here"))
    with caplog.at_level(logging.WARNING, logger="brainseg_ray.inference.predictor"):
        predictor = Predictor(artifact, backend="auto", precision="fp32")
    assert predictor.backend == "torch"
    assert [r.getMessage() for r in caplog.records] == [
        "backend auto: using torch, since onnxruntime does not load here"]
    with pytest.raises(ValueError, match="backend onnxruntime: onnxruntime does not load here"):
        Predictor(artifact, backend="onnxruntime")


def test_onnxruntime_reason_names_a_missing_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def failing(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing)
    module, reason = onnx_graph.onnxruntime_or_reason()
    assert module is None and reason == "onnxruntime does not load here (ImportError: No module named 'onnxruntime')"


def test_the_reference_model_ships_its_graph():
    if reference_model() is None:
        pytest.skip("no reference model shipped")
    artifact = load_artifact("reference")
    assert artifact.onnx is not None and artifact.metadata["dtype"] == "float16"


def test_onnxruntime_and_torch_agree_on_real_slices(shared_root):
    """The shipped model through both backends, in float32, on a real patient's slices: the
    masks agree on at least 99.9 % of pixels, and every slice's findings match (tumour present
    alike, area within 0.5 %)."""
    import tifffile

    if reference_model() is None:
        pytest.skip("no reference model shipped")
    patients = sorted(p for p in shared_root.iterdir() if p.is_dir())[:1]
    files = sorted(f for p in patients for f in p.glob("*.tif") if not f.stem.endswith("_mask"))
    images = np.stack([tifffile.imread(f) for f in files])
    artifact = load_artifact("reference")
    answers = {}
    for backend in ("onnxruntime", "torch"):
        segmenter = Segmenter(SegmenterConfig(model="reference", backend=backend, precision="fp32", tta=False,
                                              largest_component_3d=False),
                              artifact)
        assert segmenter.predictor.backend == backend
        answers[backend] = segmenter.segment(images)
    ort, eager = answers["onnxruntime"], answers["torch"]
    masks_ort, masks_torch = np.stack([r.mask for r in ort]), np.stack([r.mask for r in eager])
    assert masks_torch.sum() > 1000  # the slices hold lesions: the comparison is not of empty masks
    assert (masks_ort == masks_torch).mean() >= 0.999
    for a, b in zip(ort, eager):
        assert a.findings.tumor_present == b.findings.tumor_present
        assert abs(a.findings.tumor_area_px - b.findings.tumor_area_px) <= 0.005 * max(b.findings.tumor_area_px, 1)
