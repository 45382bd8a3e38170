"""The evaluate job: model artifacts scored on the labelled slices of an ingested dataset.

Each model runs in a Ray Data actor pool of predictors that send back per-slice pixel counts and
losses only (never masks), so the driver's memory does not grow with the data. The worst slices
by loss are predicted again on the driver for the gallery. report.py writes the files.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from brainseg_ray import storage
from brainseg_ray.config import EvaluateConfig
from brainseg_ray.data import schema
from brainseg_ray.data.tables import decode_tensor, patients_dataset, read_slices_table, tumour_slices_by_patient
from brainseg_ray.train.metrics import pixel_counts, slice_counts


@dataclass
class EvaluateResult:
    out: str
    report: dict
    patients: int
    slices: int

    def summary_line(self) -> str:
        scores = ", ".join(
            f"{m['name']} {m['metrics']['patient_dice_mean']:.4f}" if m["metrics"]["patient_dice_mean"] is not None
            else f"{m['name']} n/a" for m in self.report["models"])
        return (f"evaluate: {len(self.report['models'])} model(s) on {self.patients} patients ({self.slices} slices); "
                f"per-patient Dice: {scores} -> {storage.join(self.out, 'report.md')}")


def per_slice_loss(probabilities: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """BCE + soft Dice loss of each slice (the training loss's two terms, unweighted), [N]."""
    p = np.clip(probabilities.astype(np.float64), 1e-7, 1 - 1e-7)
    t = truth.astype(np.float64)
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean(axis=(1, 2))
    inter = (p * t).sum(axis=(1, 2))
    soft_dice = (2 * inter + 1.0) / (p.sum(axis=(1, 2)) + t.sum(axis=(1, 2)) + 1.0)
    return bce + (1 - soft_dice)


class SliceScorer:
    """Ray Data actor: a Predictor loaded once, scoring batches of slices."""

    def __init__(self, model_uri: str, threshold: float | None, use_gpu: bool, precision: str, threads: int):
        from brainseg_ray.compat import ensure_torchvision_importable

        ensure_torchvision_importable()
        from brainseg_ray.inference.predictor import Predictor

        self.predictor = Predictor.load(model_uri, use_gpu=use_gpu or "auto", precision=precision,
                                        threads=threads)
        self.threshold = self.predictor.threshold if threshold is None else threshold

    def __call__(self, batch: pa.Table) -> pa.Table:
        images = decode_tensor(batch.column("image"), schema.IMAGE_SHAPE)
        truth = decode_tensor(batch.column("mask"), schema.MASK_SHAPE).astype(bool)
        probabilities = self.predictor.probabilities(images)
        tp, fp, fn, tn = slice_counts(probabilities > self.threshold, truth)
        return pa.table({
            "patient_id": batch.column("patient_id"),
            "slice_index": batch.column("slice_index"),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "loss": per_slice_loss(probabilities, truth),
        })

def select_patients(cfg: EvaluateConfig, all_patients: list[str]) -> list[str]:
    """All patients, or those of `split` (or `fold`) in a split file from `brainseg split` or a train run."""
    if not cfg.split_file:
        if cfg.split != "all" or cfg.fold is not None:
            raise ValueError("split or fold given without split_file")
        return sorted(all_patients)
    record = json.loads(storage.read_bytes(cfg.split_file, cfg.s3))
    if cfg.fold is not None:
        chosen = [p for p, f in (record.get("folds") or {}).items() if f == cfg.fold]
    elif cfg.split == "all":
        chosen = list(all_patients)
    elif isinstance(record.get("splits"), dict):  # `brainseg split`: {"splits": {patient: name}}
        chosen = [p for p, name in record["splits"].items() if name == cfg.split]
    else:  # a train run's split.json: {"train": [...], "val": [...]}
        chosen = list(record.get(cfg.split) or [])
    missing = sorted(set(chosen) - set(all_patients))
    if missing:
        raise ValueError(f"{cfg.split_file}: {len(missing)} patients are not in {cfg.data}, e.g. {missing[0]}")
    if not chosen:
        raise ValueError(f"{cfg.split_file}: no patients in split {cfg.split!r}" +
                         (f" fold {cfg.fold}" if cfg.fold is not None else ""))
    return sorted(chosen)


def _model_names(uris: list[str], architectures: list[str]) -> list[str]:
    """Architecture names, or the artifacts' paths where two models share an architecture."""
    names = []
    for uri, arch in zip(uris, architectures):
        if architectures.count(arch) > 1:
            names.append(f"{arch} ({uri.rstrip('/').rsplit('/', 2)[-2] if uri.count('/') >= 2 else uri})")
        else:
            names.append(arch)
    return names if len(set(names)) == len(names) else [f"{n} [{i + 1}]" for i, n in enumerate(names)]


def _actor_cpus(cfg: EvaluateConfig) -> float:
    """CPUs per predictor actor, leaving at least one CPU free for the read stage."""
    import ray

    total = ray.cluster_resources().get("CPU", 1)
    room = (total - 1) / max(cfg.concurrency, 1)
    return max(0.5, min(cfg.cpus_per_actor, room)) if room > 0 else 0.5


def evaluate(cfg: EvaluateConfig):
    """Run the evaluate job (Ray must be initialised); writes the report under cfg.out."""
    from brainseg_ray.evaluate.report import ModelEvaluation, write_report
    from brainseg_ray.inference.predictor import Predictor
    from brainseg_ray.models.artifact import load_artifact
    from brainseg_ray.train.metrics import SegmentationMetrics

    if not cfg.models or not cfg.data or not cfg.out:
        raise ValueError("evaluate needs at least one --model, --data (an ingested dataset) and --out")
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    patients = select_patients(cfg, list(tumour_slices_by_patient(cfg.data, cfg.s3)))
    artifacts = [load_artifact(uri) for uri in cfg.models]  # fail fast, before any Ray work
    names = _model_names(cfg.models, [a.metadata["architecture"] for a in artifacts])
    cpus = _actor_cpus(cfg)
    dataset = patients_dataset(cfg.data, cfg.s3, patients).materialize() if len(cfg.models) > 1 else \
        patients_dataset(cfg.data, cfg.s3, patients)

    evaluations = []
    for uri, artifact, name in zip(cfg.models, artifacts, names):
        started = time.perf_counter()
        scored = dataset.map_batches(
            SliceScorer,
            fn_constructor_kwargs=dict(model_uri=uri, threshold=cfg.threshold, use_gpu=cfg.use_gpu,
                                       precision=cfg.precision, threads=max(1, int(cpus))),
            batch_size=cfg.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
            num_cpus=cpus, num_gpus=1 if cfg.use_gpu else 0,
        )
        parts = list(scored.iter_batches(batch_format="pyarrow", batch_size=None))
        seconds = time.perf_counter() - started
        table = pa.concat_tables(parts).sort_by([("patient_id", "ascending"), ("slice_index", "ascending")])
        cols = {c: table.column(c).to_numpy() for c in ("tp", "fp", "fn", "tn", "loss")}
        ids = table.column("patient_id").to_pylist()
        metrics = SegmentationMetrics()
        metrics.update_counts(ids, cols["tp"], cols["fp"], cols["fn"], cols["tn"])
        summary = metrics.compute()
        threshold = artifact.metadata.get("threshold", 0.5) if cfg.threshold is None else cfg.threshold
        predictor = Predictor(artifact, use_gpu=cfg.use_gpu or "auto", precision=cfg.precision)
        evaluations.append(ModelEvaluation(
            name=name, model_uri=uri, version=artifact.metadata.get("version", ""), threshold=float(threshold),
            metrics=summary, patients=_patient_rows(ids, table, cols, summary),
            worst=_worst_slices(cfg, table, predictor, threshold), seconds=round(seconds, 3),
            extra={"data_fingerprint": artifact.metadata.get("data_fingerprint"),
                   "slices_per_s": round(len(ids) / seconds, 2) if seconds > 0 else None,
                   "precision": predictor.precision, "device": predictor.device.type},
        ))
    split = "all" if not cfg.split_file else (f"fold {cfg.fold}" if cfg.fold is not None else cfg.split)
    report = write_report(cfg.out, evaluations, data=cfg.data, split=split, s3=cfg.s3)
    return EvaluateResult(out=cfg.out, report=report, patients=len(patients),
                          slices=evaluations[0].metrics["num_slices"])


def _patient_rows(ids: list[str], table: pa.Table, cols: dict, summary: dict) -> list[dict]:
    rows: dict[str, dict] = {}
    for i, pid in enumerate(ids):
        row = rows.setdefault(pid, {"patient_id": pid, "slices": 0, "tumour_slices": 0, "predicted_slices": 0,
                                    "tp": 0, "fp": 0, "fn": 0})
        tp, fp, fn = int(cols["tp"][i]), int(cols["fp"][i]), int(cols["fn"][i])
        row["slices"] += 1
        row["tumour_slices"] += int(tp + fn > 0)
        row["predicted_slices"] += int(tp + fp > 0)
        row["tp"] += tp
        row["fp"] += fp
        row["fn"] += fn
    for pid, row in rows.items():
        row["dice"] = summary["patient_dice"][pid]
    return list(rows.values())


def _worst_slices(cfg: EvaluateConfig, table: pa.Table, predictor, threshold: float):
    from brainseg_ray.evaluate.report import WorstSlice

    if cfg.worst_slices <= 0 or table.num_rows == 0:
        return []
    order = np.argsort(-table.column("loss").to_numpy(), kind="stable")[: cfg.worst_slices]
    chosen = [(table.column("patient_id")[int(i)].as_py(), table.column("slice_index")[int(i)].as_py()) for i in order]
    rows = read_slices_table(cfg.data, cfg.s3, columns=["patient_id", "slice_index", "image", "mask"],
                             filters=[("patient_id", "in", sorted({p for p, _ in chosen}))])
    where = {(p, s): i for i, (p, s) in enumerate(zip(rows.column("patient_id").to_pylist(),
                                                      rows.column("slice_index").to_pylist()))}
    picked = rows.take([where[key] for key in chosen])
    images = decode_tensor(picked.column("image"), schema.IMAGE_SHAPE)
    truths = decode_tensor(picked.column("mask"), schema.MASK_SHAPE)
    probabilities = predictor.probabilities(images)
    preds = (probabilities > threshold).astype(np.uint8)
    losses = table.column("loss").to_numpy()
    worst = []
    for k, (pid, index) in enumerate(chosen):
        worst.append(WorstSlice(patient_id=pid, slice_index=int(index), dice=pixel_counts(preds[k], truths[k]).dice, loss=float(losses[order[k]]),
                                image=np.array(images[k]), truth=np.array(truths[k]), prediction=preds[k],
                                probability=probabilities[k]))
    return worst

