"""The model artifact: exact round trips, float16 shipping, refused pickles and clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import uuid

import pytest
import torch

from brainseg_ray.models import ArtifactError, ModelSpec, build_model, load_artifact, save_artifact
from brainseg_ray.models import artifact as artifact_module

NORMALISATION = {"mean": [0.1, 0.2, 0.3], "std": [0.25, 0.25, 0.25], "scale": 255}


def _trained_looking(name: str, **fields) -> tuple[ModelSpec, torch.nn.Module]:
    """A model whose batch-norm statistics are not the defaults, as after training."""
    spec = ModelSpec(name, **fields)
    torch.manual_seed(0)
    model = build_model(spec)
    model.train()
    with torch.no_grad():
        model(torch.rand(2, spec.in_channels, 64, 64))
    return spec, model.eval()


@pytest.fixture(scope="module")
def resnet18():
    return _trained_looking("unet-resnet18")


def _outputs(model, seed=1):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", ["unet", "unet-resnet18"])
def test_round_trip_gives_identical_outputs(tmp_path, name, resnet18):
    spec, model = resnet18 if name == "unet-resnet18" else _trained_looking(name)
    version = save_artifact(str(tmp_path / "a"), model, spec, normalisation=NORMALISATION,
                            training={"epochs": 3, "lr": 1e-3}, data_fingerprint="abc123", metrics={"dice": 0.8})
    loaded = load_artifact(str(tmp_path / "a"))
    assert loaded.spec == spec and not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert torch.equal(_outputs(loaded.model), _outputs(model))
    assert loaded.metadata["version"] == version and version.startswith(f"{name}-")
    assert sorted(os.listdir(tmp_path / "a")) == ["model.json", "model.onnx", "weights.safetensors"]


def test_model_json_fields(tmp_path, resnet18):
    spec, model = resnet18
    save_artifact(str(tmp_path), model, spec, normalisation=NORMALISATION, threshold=0.4,
                  training={"epochs": 3}, data_fingerprint="fp", metrics={"dice": 0.8})
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["format_version"] == 1 and meta["architecture"] == "unet-resnet18"
    assert meta["model"] == {"name": "unet-resnet18", "in_channels": 3, "classes": 1, "encoder_depth": 5,
                             "base_filters": 32}
    assert meta["input"] == {"size": 256, "channels": 3, "channel_names": ["pre-contrast", "FLAIR", "post-contrast"]}
    assert meta["normalisation"] == NORMALISATION and meta["threshold"] == 0.4
    assert meta["training"] == {"epochs": 3} and meta["data_fingerprint"] == "fp" and meta["metrics"] == {"dice": 0.8}
    assert meta["dtype"] == "float32" and meta["created_at"] and meta["version"].startswith("unet-resnet18-")
    assert meta["weights_sha256"] == hashlib.sha256((tmp_path / "weights.safetensors").read_bytes()).hexdigest()


def test_version_is_path_safe_for_generic_names(tmp_path):
    spec = ModelSpec("unet", base_filters=4)
    model = build_model(spec).eval()
    assert save_artifact(str(tmp_path / "a"), model, spec, normalisation=NORMALISATION) == \
        save_artifact(str(tmp_path / "b"), model, spec, normalisation=NORMALISATION)  # content-addressed
    spec = ModelSpec("smp:Unet:resnet18", encoder_depth=3)
    version = save_artifact(str(tmp_path / "c"), build_model(spec).eval(), spec, normalisation=NORMALISATION)
    assert version.startswith("smp_Unet_resnet18-")


def test_half_round_trip_is_close_and_half_the_size(tmp_path, resnet18):
    spec, model = resnet18
    save_artifact(str(tmp_path / "f32"), model, spec, normalisation=NORMALISATION)
    save_artifact(str(tmp_path / "f16"), model, spec, normalisation=NORMALISATION, half=True)
    loaded = load_artifact(str(tmp_path / "f16"))
    assert loaded.metadata["dtype"] == "float16"
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    expected, got = _outputs(model), _outputs(loaded.model)
    assert (got - expected).abs().max() <= 1e-2 * expected.abs().max()
    ratio = (tmp_path / "f16/weights.safetensors").stat().st_size / (tmp_path / "f32/weights.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55


def test_torch_fallback_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(artifact_module, "_safetensors", None)  # as where safetensors is not installed
    spec, model = _trained_looking("unet", base_filters=8)
    save_artifact(str(tmp_path), model, spec, normalisation=NORMALISATION)
    assert sorted(os.listdir(tmp_path)) == ["model.json", "weights.pt"]
    assert torch.equal(_outputs(load_artifact(str(tmp_path)).model), _outputs(model))


class _RunsCode:
    """Unpickling this runs a shell command: what a weights file must never be able to do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch, writer):
    monkeypatch.setattr(artifact_module, "_safetensors", None)
    spec = ModelSpec("unet", base_filters=4)
    save_artifact(str(tmp_path), build_model(spec), spec, normalisation=NORMALISATION)
    marker = f"/tmp/brainseg-pwned-{uuid.uuid4().hex}"
    payload = {"head.weight": _RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, tmp_path / "weights.pt")
    else:
        (tmp_path / "weights.pt").write_bytes(pickle.dumps(payload, protocol=2))
    # Make the checksum agree, so the refusal below comes from the weights-only loader itself.
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["weights_sha256"] = hashlib.sha256((tmp_path / "weights.pt").read_bytes()).hexdigest()
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="refused weights.pt: not a plain state_dict") as info:
        load_artifact(str(tmp_path))
    assert str(tmp_path) in str(info.value)
    assert not os.path.exists(marker), "unpickling ran code"


def test_missing_artifact_and_metadata(tmp_path):
    with pytest.raises(ArtifactError, match="no such directory"):
        load_artifact(str(tmp_path / "absent"))
    spec = ModelSpec("unet", base_filters=4)
    save_artifact(str(tmp_path / "a"), build_model(spec), spec, normalisation=NORMALISATION)
    (tmp_path / "a" / "model.json").unlink()
    with pytest.raises(ArtifactError, match=r"a: no model.json \(not an artifact, or one not completely written\)"):
        load_artifact(str(tmp_path / "a"))


def _edit_metadata(path, **changes):
    meta = json.loads((path / "model.json").read_text())
    meta.update(changes)
    (path / "model.json").write_text(json.dumps(meta))


def test_weights_that_do_not_match_the_architecture(tmp_path):
    spec = ModelSpec("unet", base_filters=4)
    save_artifact(str(tmp_path), build_model(spec), spec, normalisation=NORMALISATION)
    _edit_metadata(tmp_path, model={**json.loads((tmp_path / "model.json").read_text())["model"], "base_filters": 8})
    with pytest.raises(ArtifactError, match=r"weights do not match architecture 'unet' \(shapes\)"):
        load_artifact(str(tmp_path))
    _edit_metadata(tmp_path, architecture="unet-resnet18")
    with pytest.raises(ArtifactError, match="weights do not match architecture 'unet-resnet18':.*missing keys.*unexpected keys"):
        load_artifact(str(tmp_path))
    _edit_metadata(tmp_path, architecture="no-such-net")
    with pytest.raises(ArtifactError, match="unknown architecture: unknown model 'no-such-net'"):
        load_artifact(str(tmp_path))


def test_changed_weights_fail_the_checksum(tmp_path):
    spec = ModelSpec("unet", base_filters=4)
    save_artifact(str(tmp_path), build_model(spec), spec, normalisation=NORMALISATION)
    other = build_model(spec)
    save_artifact(str(tmp_path / "other"), other, spec, normalisation=NORMALISATION)
    (tmp_path / "weights.safetensors").write_bytes((tmp_path / "other" / "weights.safetensors").read_bytes())
    with pytest.raises(ArtifactError, match="does not match the SHA-256"):
        load_artifact(str(tmp_path))


def test_bad_normalisation_is_refused(tmp_path):
    spec = ModelSpec("unet", base_filters=4)
    with pytest.raises(ArtifactError, match=r"normalisation\['std'\] must list 3 values"):
        save_artifact(str(tmp_path), build_model(spec), spec, normalisation={"mean": [0, 0, 0]})
    with pytest.raises(ArtifactError, match=r"slice_target must be in \(0, 255\]"):
        save_artifact(str(tmp_path), build_model(spec), spec,
                      normalisation={**NORMALISATION, "slice_target": 300, "slice_percentile": 99})


def test_per_slice_normalisation_survives_export(tmp_path):
    """The per-slice rescaling is part of what the weights expect: export keeps it."""
    from brainseg_ray.cli import main

    spec = ModelSpec("unet", base_filters=4)
    norm = {**NORMALISATION, "slice_percentile": 99.0, "slice_target": 150.0}
    save_artifact(str(tmp_path / "run"), build_model(spec), spec, normalisation=norm)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "shipped"), "--half"]) == 0
    assert load_artifact(str(tmp_path / "shipped")).metadata["normalisation"] == norm


def test_s3_round_trip(s3_bucket):
    spec, model = _trained_looking("unet", base_filters=8)
    uri = f"{s3_bucket}/models/unet-v1"
    save_artifact(uri, model, spec, normalisation=NORMALISATION)
    save_artifact(uri, model, spec, normalisation=NORMALISATION)  # overwriting in place is allowed
    assert torch.equal(_outputs(load_artifact(uri).model), _outputs(model))
    with pytest.raises(ArtifactError, match="no model.json"):
        load_artifact(f"{s3_bucket}/models/absent")


def test_export_keeps_the_model_and_records_the_choices(tmp_path, resnet18):
    from brainseg_ray.cli import main

    spec, model = resnet18
    source = str(tmp_path / "run-model")
    save_artifact(source, model, spec, normalisation=NORMALISATION, threshold=0.5, training={"epoch": 3},
                  metrics={"validation": {"patient_dice_mean": 0.8}})
    card = tmp_path / "card.md"
    card.write_text("# A model card\n")
    out = tmp_path / "shipped"
    assert main(["export", source, "--out", str(out), "--half", "--threshold", "0.4", "--min-component-px", "30",
                 "--no-largest-component-3d", "--card", str(card)]) == 0
    exported = load_artifact(str(out))
    meta, before = exported.metadata, load_artifact(source).metadata
    assert meta["dtype"] == "float16" and meta["threshold"] == 0.4
    assert meta["postprocess"] == {"min_component_px": 30, "largest_component_3d": False}
    assert meta["exported_from"] == {"uri": source, "version": before["version"]}
    assert meta["training"] == {"epoch": 3} and meta["metrics"] == before["metrics"]
    assert (out / "MODEL_CARD.md").read_text() == "# A model card\n"
    expected, got = _outputs(model), _outputs(exported.model)
    assert (got - expected).abs().max() <= 1e-2 * expected.abs().max()


def test_reference_names_the_shipped_model(tmp_path):
    from brainseg_ray.models.reference import REFERENCE_DIR, reference_model

    if reference_model() is None:
        with pytest.raises(ArtifactError, match="no reference model is shipped"):
            load_artifact("reference")
        return
    loaded = load_artifact("reference")
    assert loaded.metadata["version"] == json.loads((REFERENCE_DIR / "model.json").read_text())["version"]
    assert (REFERENCE_DIR / "MODEL_CARD.md").is_file()
    assert sum(f.stat().st_size for f in REFERENCE_DIR.iterdir()) <= 20 * 1024 * 1024
