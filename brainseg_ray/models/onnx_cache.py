"""model.onnx for any artifact: its own, or for an artifact without one (written before the
graph was part of it, or read-only on S3) a graph exported once into a local cache, keyed by the
weights' SHA-256 so that a changed artifact never meets a stale graph."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from brainseg_ray.models.artifact import ModelArtifact
from brainseg_ray.models.onnx_graph import export_onnx


def cache_dir() -> Path:
    """$BRAINSEG_CACHE_DIR, else $XDG_CACHE_HOME/brainseg-ray, else ~/.cache/brainseg-ray."""
    explicit = os.environ.get("BRAINSEG_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "brainseg-ray"


def onnx_graph(artifact: ModelArtifact) -> bytes:
    if artifact.onnx is not None:
        return artifact.onnx
    digest = artifact.metadata.get("weights_sha256") or hashlib.sha256(artifact.weights).hexdigest()
    path = cache_dir() / "onnx" / f"{digest}.onnx"
    if path.is_file():
        return path.read_bytes()
    graph = export_onnx(artifact.model, artifact.weights_file, artifact.weights,
                        int(artifact.metadata["input"]["size"]), artifact.spec.in_channels)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name, then renamed: actors starting together never read half a file.
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as f:
        f.write(graph)
    os.replace(f.name, path)
    return graph
