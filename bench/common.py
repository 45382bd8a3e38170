"""What the benchmarks share: a model artifact to time when none is given."""

from __future__ import annotations

import os


def model_or_untrained(model: str | None, arch: str, workdir: str) -> str:
    """`model` when given, else a randomly initialised artifact of `arch` written under `workdir`
    (speed does not depend on the weights)."""
    if model:
        return model
    import torch

    from brainseg_ray.models.artifact import save_artifact
    from brainseg_ray.models.inputs import DEFAULT_NORMALISATION
    from brainseg_ray.models.registry import ModelSpec, build_model

    torch.manual_seed(0)
    spec = ModelSpec(arch)
    uri = os.path.join(workdir, "model")
    save_artifact(uri, build_model(spec).eval(), spec, normalisation={k: DEFAULT_NORMALISATION[k] for k in ("mean", "std")})
    return uri
