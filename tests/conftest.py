"""Shared fixtures: one local Ray instance per session, a real S3 endpoint (moto's server) on
loopback, synthetic data in the kaggle_3m layout, and the shared real data when present."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import uuid
from pathlib import Path

import pytest

from brainseg_ray.dev_data import SHARED_KAGGLE_3M


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Set before Ray or any AWS client starts: Ray workers inherit the driver's environment, so they
# reach the same S3 endpoint through the standard variables, as a user's cluster would.
S3_PORT = _free_port()
os.environ.update({
    "RAY_AUTH_MODE": "disabled",  # a private test instance; the cluster tests use tokens
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    "AWS_EC2_METADATA_DISABLED": "true",
    # Ray Train's controller polls its workers every 2 s by default, so each of the suite's many
    # short runs waited up to 2 s to start and again to end; 0.5 s saves ~2 s a run.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Its preemption watcher (an actor more a run) waits for cloud nodes being drained, which a test
    # machine never has: ~1 s a run.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray Train's Prometheus metrics callbacks (controller and workers), which no test reads:
    # ~2 CPU-seconds a run (18.1-19.6 against 18.4-21.6 for a one-epoch run).
    "RAY_TRAIN_METRICS_ENABLED": "0",
    # `make test` runs two pytest workers on two cores: torch's OpenMP threads spinning for work
    # while the other worker holds a core made training several times slower; they sleep instead.
    "OMP_WAIT_POLICY": "PASSIVE",
})
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("RAY_ADDRESS", None)


# `make test` hands whole files to two workers (pytest-xdist, `--dist loadfile`) in collection
# order: the longest files first, so that both workers finish at about the same time.
LONGEST_FILES_FIRST = ["test_train.py", "test_demo.py", "test_cluster.py", "test_reference_model.py",
                       "test_segment_job.py", "test_ingest.py", "test_serve.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def ray_local():
    import ray

    # The dashboard serves the state API that Ray Train's placement-group cleaner polls.
    ray.init(address="local", num_cpus=2, include_dashboard=True, logging_level="WARNING")
    ray.data.DataContext.get_current().print_on_execution_start = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket: 's3://NAME'."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


def upload_tree(local: Path, s3_uri: str) -> None:
    from brainseg_ray import storage

    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_bytes(storage.join(s3_uri, *path.relative_to(local).parts), path.read_bytes())


@pytest.fixture
def explicit_s3_model(s3_bucket, tmp_path, monkeypatch) -> tuple[str, object]:
    """(an s3:// tiny artifact, S3Options naming the moto endpoint), with this process's AWS
    environment then pointing at a port where nothing listens: only code that hands the job's
    explicit S3 options down reaches the model (as with a MinIO endpoint given by --s3-endpoint).
    Ray's workers keep the session's environment; the driver's side is what this checks."""
    from brainseg_ray.storage import S3Options

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    uri = f"{s3_bucket}/models/tiny"
    upload_tree(Path(tiny_artifact(tmp_path / "explicit-s3-model")), uri)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return uri, S3Options(endpoint_url=endpoint)


def tiny_artifact(path: Path, seed: int = 0, base_filters: int = 4, input_size: int = 64) -> str:
    """An untrained plain U-Net artifact (fixed weights for a seed): fast, and enough for tests
    that check plumbing, equality between paths or faults rather than quality."""
    from brainseg_ray.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from brainseg_ray.models.artifact import save_untrained_artifact
    from brainseg_ray.models.spec import ModelSpec

    return save_untrained_artifact(str(path), ModelSpec("unet", base_filters=base_filters), seed=seed,
                                   normalisation={"mean": [0.1] * 3, "std": [0.2] * 3}, threshold=0.499,
                                   input_size=input_size)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """6 synthetic patients, 8-12 slices each: OUT/kaggle_3m."""
    from brainseg_ray.data.synthetic import write_synthetic_dataset

    summary = write_synthetic_dataset(str(tmp_path_factory.mktemp("synth")), patients=6, seed=7,
                                      slices_per_patient=(8, 12))
    return Path(summary.root)


@pytest.fixture(scope="session")
def synthetic_dataset(ray_local, synthetic_root, tmp_path_factory) -> str:
    """`synthetic_root` ingested: a Parquet dataset folder (6 patients)."""
    from brainseg_ray.config import IngestConfig
    from brainseg_ray.data.ingest import ingest

    out = str(tmp_path_factory.mktemp("synth-ds"))
    ingest(IngestConfig(source=str(synthetic_root), out=out))
    return out


@pytest.fixture(scope="session")
def shared_root() -> Path:
    if not SHARED_KAGGLE_3M.is_dir():
        pytest.skip(f"real LGG slices not found at {SHARED_KAGGLE_3M} (the shared data folder is absent)")
    return SHARED_KAGGLE_3M


@pytest.fixture(scope="session")
def shared_subset(shared_root, tmp_path_factory) -> Path:
    """Three real patients and data.csv, linked into a kaggle_3m folder of their own."""
    root = tmp_path_factory.mktemp("shared3") / "kaggle_3m"
    root.mkdir()
    patients = sorted(p for p in shared_root.iterdir() if p.is_dir())[:3]
    for patient in patients:
        (root / patient.name).symlink_to(patient, target_is_directory=True)
    (root / "data.csv").symlink_to(shared_root / "data.csv")
    return root


def load_script(path: Path):
    """A script of jobs/ or docs/ (folders that are no package), imported from its path once and
    kept in sys.modules under its name, its folder on sys.path for the scripts beside it it imports."""
    path = Path(path).resolve()
    if path.stem not in sys.modules:
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module  # before it runs: a dataclass looks its module up there
        spec.loader.exec_module(module)
    return sys.modules[path.stem]
