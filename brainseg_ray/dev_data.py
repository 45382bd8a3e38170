"""Where a development checkout finds the real LGG slices: ../shared/data/lgg-dev beside the
repository, the one definition the tests and benchmarks use. They use the slices when present
and skip (or fall back to synthetic data) when not; no job of the package reads them."""

from __future__ import annotations

from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
SHARED_KAGGLE_3M = REPOSITORY.parent / "shared" / "data" / "lgg-dev" / "kaggle_3m"
