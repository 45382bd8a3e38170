"""The reference model shipped inside the package (see reference_model/MODEL_CARD.md).

`reference` is accepted wherever a model artifact URI is (`--model reference`), and it is the
default model of `brainseg segment`, `brainseg serve` and the demo once the artifact is present.
"""

from __future__ import annotations

from pathlib import Path

REFERENCE_NAME = "reference"
REFERENCE_DIR = Path(__file__).resolve().parent.parent / "reference_model"


def reference_model() -> str | None:
    """The shipped artifact's folder, or None when this checkout has none (model.json is written last)."""
    return str(REFERENCE_DIR) if (REFERENCE_DIR / "model.json").is_file() else None


def resolve_model_uri(uri: str) -> str:
    """`reference` -> the shipped artifact's folder; any other URI unchanged."""
    if uri != REFERENCE_NAME:
        return uri
    path = reference_model()
    if path is None:
        raise FileNotFoundError(f"no reference model is shipped in this installation ({REFERENCE_DIR})")
    return path
