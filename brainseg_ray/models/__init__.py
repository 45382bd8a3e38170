"""Segmentation models: the registry of names -> builders, and the saved model artifact."""

from brainseg_ray.models.artifact import ArtifactError, ModelArtifact, load_artifact, save_artifact
from brainseg_ray.models.registry import ModelSpec, available_models, build_model, register, resolve

__all__ = [
    "ArtifactError",
    "ModelArtifact",
    "ModelSpec",
    "available_models",
    "build_model",
    "load_artifact",
    "register",
    "resolve",
    "save_artifact",
]
