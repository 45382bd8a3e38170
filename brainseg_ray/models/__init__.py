"""Segmentation models: the spec, the registry of names -> builders, and the saved model artifact.

The builder modules (unet.py, smp_models.py) import only spec.py; registry.py takes their builders
in, so no module of the package imports another back.
"""

from brainseg_ray.models.artifact import ArtifactError, ModelArtifact, load_artifact, save_artifact
from brainseg_ray.models.registry import available_models, build_model, register, resolve
from brainseg_ray.models.spec import ModelSpec

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
