"""What the benchmarks share: a model artifact to time when none is given."""

from __future__ import annotations

import os


def model_or_untrained(model: str | None, arch: str, workdir: str) -> str:
    """`model` when given, else a randomly initialised artifact of `arch` written under `workdir`
    (speed does not depend on the weights)."""
    if model:
        return model
    from brainseg_ray.models.artifact import save_untrained_artifact
    from brainseg_ray.models.spec import ModelSpec

    return save_untrained_artifact(os.path.join(workdir, "model"), ModelSpec(arch))
