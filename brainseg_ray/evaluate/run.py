"""The evaluate job: model artifacts scored on the labelled slices of an ingested dataset.

Each model runs in a Ray Data actor pool of predictors that send back per-slice pixel counts and
losses only (never masks), so the driver's memory does not grow with the data. The worst slices
by loss are predicted again on the driver for the gallery. The measurements become
evaluation.py's ModelEvaluation objects, which report.py writes out.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from brainseg_ray import storage
from brainseg_ray.config import EvaluateConfig, SegmenterConfig
from brainseg_ray.data import schema
from brainseg_ray.data.split import read_split_file
from brainseg_ray.data.tables import decode_tensor, patients_dataset, read_slices_table, tumour_slices_by_patient
from brainseg_ray.evaluate.evaluation import ModelEvaluation, WorstSlice
from brainseg_ray.evaluate.report import write_report
from brainseg_ray.runtime import cpus_per_actor, gpus_per_actor
from brainseg_ray.train.losses import per_slice_bce_dice
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


class SliceScorer:
    """Ray Data actor: a Segmenter loaded once (the batch job's and Serve's prediction and
    post-processing), scoring batches of slices at its threshold and at each sweep threshold."""

    def __init__(self, segmenter: SegmenterConfig, thresholds: list[float], s3: storage.S3Options, use_gpu: bool):
        from brainseg_ray.compat import ensure_torchvision_importable

        ensure_torchvision_importable()
        from brainseg_ray.inference.segmenter import Segmenter

        self.segmenter = Segmenter(segmenter, s3=s3, use_gpu=use_gpu)
        self.thresholds = list(thresholds)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from brainseg_ray.inference.postprocess import postprocess

        images = decode_tensor(batch.column("image"), schema.IMAGE_SHAPE)
        truth = decode_tensor(batch.column("mask"), schema.MASK_SHAPE).astype(bool)
        ids = batch.column("patient_id").to_pylist()
        slices = batch.column("slice_index").to_pylist()
        probabilities = self.segmenter.probabilities(images)
        options = self.segmenter.options
        columns = {"patient_id": batch.column("patient_id"), "slice_index": batch.column("slice_index")}
        for i, threshold in enumerate([options.threshold, *self.thresholds]):
            masks = postprocess(probabilities, dataclasses.replace(options, threshold=threshold), ids, slices)
            counts = slice_counts(masks.astype(bool), truth)
            prefix = "" if i == 0 else f"sweep{i - 1}_"
            columns.update({f"{prefix}{name}": c for name, c in zip(("tp", "fp", "fn", "tn"), counts)})
        columns["loss"] = per_slice_bce_dice(probabilities, truth)
        return pa.table(columns)


def select_patients(cfg: EvaluateConfig, all_patients: list[str]) -> list[str]:
    """All patients, or those of `split` (or `fold`) in a split file from `brainseg split` or a train run."""
    if not cfg.split_file:
        if cfg.split != "all" or cfg.fold is not None:
            raise ValueError("split or fold given without split_file")
        return sorted(all_patients)
    split_file = read_split_file(cfg.split_file, cfg.s3)
    if cfg.fold is not None:
        chosen = split_file.in_fold(cfg.fold)
    elif cfg.split == "all":
        chosen = list(all_patients)
    else:
        chosen = split_file.in_split(cfg.split)
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


def evaluate(cfg: EvaluateConfig):
    """Run the evaluate job (Ray must be initialised); writes the report under cfg.out."""
    from brainseg_ray.inference.segmenter import Segmenter
    from brainseg_ray.models.artifact import load_artifact
    from brainseg_ray.train.metrics import SegmentationMetrics

    if not cfg.models or not cfg.data or not cfg.out:
        raise ValueError("evaluate needs at least one --model, --data (an ingested dataset) and --out")
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    patients = select_patients(cfg, list(tumour_slices_by_patient(cfg.data, cfg.s3)))
    artifacts = [load_artifact(uri, cfg.s3) for uri in cfg.models]  # fail fast, before any Ray work
    names = _model_names(cfg.models, [a.metadata["architecture"] for a in artifacts])
    cpus = cpus_per_actor(cfg.concurrency, cfg.cpus_per_actor, keep_free=1)  # a CPU left for the read stage
    gpus = gpus_per_actor(cfg.use_gpu, cfg.gpus_per_actor)
    dataset = patients_dataset(cfg.data, cfg.s3, patients).materialize() if len(cfg.models) > 1 else \
        patients_dataset(cfg.data, cfg.s3, patients)

    evaluations = []
    for uri, artifact, name in zip(cfg.models, artifacts, names):
        started = time.perf_counter()
        segmenter = SegmenterConfig(model=uri, threshold=cfg.threshold, min_component_px=cfg.min_component_px,
                                    min_component_peak=cfg.min_component_peak,
                                    largest_component_3d=cfg.largest_component_3d,
                                    keep_3d_fraction=cfg.keep_3d_fraction, tta=cfg.tta,
                                    precision=cfg.precision, backend=cfg.backend, threads=max(1, int(cpus)))
        scoring = dict(fn_constructor_kwargs=dict(segmenter=segmenter, thresholds=cfg.thresholds, s3=cfg.s3,
                                                  use_gpu=gpus > 0),
                       batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
                       num_cpus=cpus, num_gpus=gpus)
        # For the gallery's few slices; its options are the actors' too. On the driver's own GPU
        # where it has one (a cluster's head often has none), never with use_gpu=false.
        driver_segmenter = Segmenter(segmenter, artifact, use_gpu=False if cfg.use_gpu is False else None)
        options = driver_segmenter.options
        if options.largest_component_3d:  # the 3-D step needs each patient's whole stack in one call
            scored = dataset.groupby("patient_id").map_groups(SliceScorer, **scoring)
        else:
            scored = dataset.map_batches(SliceScorer, batch_size=cfg.batch_size, **scoring)
        parts = list(scored.iter_batches(batch_format="pyarrow", batch_size=None))
        seconds = time.perf_counter() - started
        table = pa.concat_tables(parts).sort_by([("patient_id", "ascending"), ("slice_index", "ascending")])
        cols = {c: table.column(c).to_numpy() for c in ("tp", "fp", "fn", "tn", "loss")}
        ids = table.column("patient_id").to_pylist()
        metrics = SegmentationMetrics()
        metrics.update_counts(ids, cols["tp"], cols["fp"], cols["fn"], cols["tn"])
        summary = metrics.compute()
        predictor = driver_segmenter.predictor
        evaluations.append(ModelEvaluation(
            name=name, model_uri=uri, version=artifact.metadata.get("version", ""), threshold=options.threshold,
            metrics=summary, patients=_patient_rows(ids, table, cols, summary),
            worst=_worst_slices(cfg, table, driver_segmenter), seconds=round(seconds, 3),
            sweep=_sweep_rows(cfg.thresholds, ids, table),
            postprocess=driver_segmenter.postprocess_settings(),
            extra={"data_fingerprint": artifact.metadata.get("data_fingerprint"),
                   "slices_per_s": round(len(ids) / seconds, 2) if seconds > 0 else None,
                   "precision": predictor.precision, "device": predictor.device.type,
                   "backend": predictor.backend},
        ))
    split = "all" if not cfg.split_file else (f"fold {cfg.fold}" if cfg.fold is not None else cfg.split)
    report = write_report(cfg.out, evaluations, data=cfg.data, split=split, s3=cfg.s3)
    return EvaluateResult(out=cfg.out, report=report, patients=len(patients),
                          slices=evaluations[0].metrics["num_slices"])


def _sweep_rows(thresholds: list[float], ids: list[str], table: pa.Table) -> list[dict]:
    """Per sweep threshold: the headline figures of the same predictions cut there."""
    from brainseg_ray.train.metrics import SegmentationMetrics

    rows = []
    for i, threshold in enumerate(thresholds):
        metrics = SegmentationMetrics()
        metrics.update_counts(ids, *(table.column(f"sweep{i}_{c}").to_numpy() for c in ("tp", "fp", "fn", "tn")))
        summary = metrics.compute()
        rows.append({"threshold": float(threshold), "patient_dice_mean": summary["patient_dice_mean"],
                     "slice_dice_mean": summary["slice_dice_mean"],
                     "sensitivity": summary["detection"]["sensitivity"],
                     "specificity": summary["detection"]["specificity"]})
    return rows


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


def _worst_slices(cfg: EvaluateConfig, table: pa.Table, segmenter):
    from brainseg_ray.inference.postprocess import postprocess

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
    probabilities = segmenter.probabilities(images)
    # Single slices of several patients: the 2-D steps only.
    preds = postprocess(probabilities, dataclasses.replace(segmenter.options, largest_component_3d=False))
    losses = table.column("loss").to_numpy()
    worst = []
    for k, (pid, index) in enumerate(chosen):
        worst.append(WorstSlice(patient_id=pid, slice_index=int(index), dice=pixel_counts(preds[k], truths[k]).dice, loss=float(losses[order[k]]),
                                image=np.array(images[k]), truth=np.array(truths[k]), prediction=preds[k],
                                probability=probabilities[k]))
    return worst

