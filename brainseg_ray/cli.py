"""The `brainseg` command. Each subcommand maps its flags onto a config and calls the library."""

from __future__ import annotations

import argparse
import sys

from brainseg_ray.config import ConfigError
from brainseg_ray.storage import StorageError


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with settings (flags and key=value override it)")
    parser.add_argument("--s3-endpoint", dest="s3_endpoint", help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local instance)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="setting overrides, e.g. slices_per_task=32")


def _cmd_synth(args) -> int:
    from brainseg_ray.config import SynthConfig, load_config
    from brainseg_ray.data.synthetic import write_synthetic_dataset

    cfg = load_config(SynthConfig, args.config, args.overrides, out=args.out, patients=args.patients, seed=args.seed)
    summary = write_synthetic_dataset(cfg.out, patients=cfg.patients, seed=cfg.seed,
                                      slices_per_patient=(cfg.min_slices, cfg.max_slices),
                                      lesion_fraction=cfg.lesion_fraction)
    print(f"synth: {summary.patients} patients, {summary.slices} slices "
          f"({summary.tumour_slices} with lesion) -> {summary.root}")
    return 0


def _s3_values(args) -> dict:
    return {"s3": {"endpoint_url": args.s3_endpoint}} if args.s3_endpoint else {}


def _ray_values(args) -> dict:
    return {"ray": {"address": args.address}} if args.address else {}


def _cmd_ingest(args) -> int:
    from brainseg_ray.config import IngestConfig, load_config
    from brainseg_ray.data.ingest import ingest, list_sources
    from brainseg_ray.runtime import init_ray

    cfg = load_config(IngestConfig, args.config, args.overrides, source=args.source, out=args.out,
                      masks=args.masks, **_s3_values(args), **_ray_values(args))
    catalog = list_sources(cfg)  # before Ray starts: a wrong source costs no start-up
    init_ray(cfg.ray)
    result = ingest(cfg, catalog)
    print(result.summary_line())
    return 0


def _cmd_train(args) -> int:
    from brainseg_ray.config import TrainConfig, load_config
    from brainseg_ray.runtime import init_ray
    from brainseg_ray.train.trainer import train

    cfg = load_config(TrainConfig, args.config, args.overrides, data=args.data, out=args.out, model=args.model,
                      epochs=args.epochs, num_workers=args.num_workers, **_s3_values(args), **_ray_values(args))
    init_ray(cfg.ray)
    print(train(cfg).summary_line())
    return 0


def _cmd_lr_find(args) -> int:
    from brainseg_ray.config import LrFindConfig, load_config
    from brainseg_ray.train.lr_find import lr_find

    # Flags go in as train.* overrides so they merge with a YAML train: section, not replace it.
    flags = {"train.data": args.data, "train.model": args.model, "train.s3.endpoint_url": args.s3_endpoint}
    overrides = [f"{k}={v}" for k, v in flags.items() if v] + list(args.overrides or [])
    cfg = load_config(LrFindConfig, args.config, overrides, out=args.out)
    print(lr_find(cfg).summary_line())
    return 0


def _cmd_evaluate(args) -> int:
    from brainseg_ray.config import EvaluateConfig, load_config
    from brainseg_ray.evaluate.run import evaluate
    from brainseg_ray.runtime import init_ray

    cfg = load_config(EvaluateConfig, args.config, args.overrides, models=args.model or None, data=args.data,
                      out=args.out, split_file=args.split_file, split=args.split, **_s3_values(args),
                      **_ray_values(args))
    init_ray(cfg.ray)
    print(evaluate(cfg).summary_line())
    return 0


def _cmd_segment(args) -> int:
    from brainseg_ray.batch import segment
    from brainseg_ray.config import SegmentJobConfig, load_config
    from brainseg_ray.runtime import init_ray

    segmenter = {"model": args.model} if args.model else None
    cfg = load_config(SegmentJobConfig, args.config, args.overrides, input=args.input, output=args.output,
                      shard=args.shard, segmenter=segmenter, **_s3_values(args), **_ray_values(args))
    init_ray(cfg.ray)
    print(segment(cfg).summary_line())
    return 0


def _cmd_score(args) -> int:
    from brainseg_ray.evaluate.score_masks import score_masks, write_score
    from brainseg_ray.storage import S3Options

    s3 = S3Options(endpoint_url=args.s3_endpoint) if args.s3_endpoint else None
    score = score_masks(args.output, args.truth, s3)
    if args.out:
        write_score(score, args.out, s3)
    print(score.summary_line())
    return 0


def _cmd_serve(args) -> int:
    import dataclasses
    import signal
    import time

    from brainseg_ray.compat import ensure_torchvision_importable
    from brainseg_ray.models.artifact import load_artifact
    from brainseg_ray.runtime import init_ray
    from brainseg_ray.serve import settings

    cfg = settings.load(args.config, args.overrides, model=args.model, host=args.host, port=args.port)
    if args.s3_endpoint:
        cfg.s3 = dataclasses.replace(cfg.s3, endpoint_url=args.s3_endpoint)
    if args.address:
        cfg.ray.address = args.address
    # A wrong model is one line here, not a deployment failing in a replica's log.
    ensure_torchvision_importable()
    version = load_artifact(cfg.segmenter.model, cfg.s3).metadata.get("version", "")
    init_ray(cfg.ray)
    from ray import serve

    from brainseg_ray.serve.app import start

    def stop(signum, frame):
        raise KeyboardInterrupt

    # A service manager's SIGTERM ends as cleanly as Ctrl-C; SIGINT is set too, since a shell
    # starts background commands with it ignored.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        url = start(cfg)
        auth = "bearer token required" if settings.resolve_token(cfg) else "no auth"
        print(f"serve: {url} model {version}, {auth}; Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(cfg.app_name)
        print("serve: stopped", flush=True)
    return 0


def _cmd_models(args) -> int:
    from brainseg_ray.models.registry import available_models

    for name in available_models():
        print(name)
    print("smp:<Architecture>:<encoder>  (any segmentation-models-pytorch pair)")
    return 0


def _cmd_export(args) -> int:
    from brainseg_ray.models.artifact import export_artifact
    from brainseg_ray.storage import S3Options

    postprocess = {k: getattr(args, k) for k in ("min_component_px", "min_component_peak", "largest_component_3d",
                                                 "keep_3d_fraction", "tta") if getattr(args, k) is not None}
    s3 = S3Options(endpoint_url=args.s3_endpoint) if args.s3_endpoint else None
    version = export_artifact(args.model, args.out, half=args.half, threshold=args.threshold,
                              postprocess=postprocess, card=args.card, s3=s3)
    print(f"export: {args.model} -> {args.out} ({version}{', float16' if args.half else ''})")
    return 0


def _cmd_demo(args) -> int:
    from brainseg_ray.demo import print_summary, run_demo

    print_summary(run_demo(out=args.out, patients=args.patients, verbose=args.verbose))
    return 0


def _cmd_split(args) -> int:
    import json

    from brainseg_ray.data.split import assign_folds, assign_splits, assign_test_fold
    from brainseg_ray.data.tables import tumour_slices_by_patient
    from brainseg_ray.storage import S3Options, write_bytes

    s3 = S3Options(endpoint_url=args.s3_endpoint)
    tumour = tumour_slices_by_patient(args.data, s3)
    fractions = tuple(float(f) for f in args.fractions.split(","))
    result = {"seed": args.seed, "fractions": fractions}
    if args.test_fold is not None:
        if not args.folds:
            raise ValueError("--test-fold needs --folds")
        result["test_fold"] = args.test_fold
        result["splits"], result["folds"] = assign_test_fold(tumour, args.folds, args.test_fold, fractions, args.seed)
    else:
        result["splits"] = assign_splits(tumour, fractions, args.seed)
        if args.folds:
            result["folds"] = assign_folds(tumour, args.folds, args.seed)
    write_bytes(args.out, json.dumps(result, indent=2).encode(), s3)
    counts = {name: sum(1 for v in result["splits"].values() if v == name) for name in ("train", "val", "test")}
    print(f"split: {len(tumour)} patients -> " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic LGG-like slices in the kaggle_3m layout")
    p.add_argument("--out", required=True)
    p.add_argument("--patients", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("ingest", help="TIFF slices (folder, s3://, archive) -> Parquet dataset")
    p.add_argument("source", help="folder, s3:// prefix, .tar/.tar.gz/.zip, or a glob of archives")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--masks", choices=["auto", "required", "optional"])
    _add_common(p)
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("split", help="patient-level train/val/test split (and k folds) of an ingested dataset")
    p.add_argument("data", help="ingested dataset (folder or s3:// prefix)")
    p.add_argument("--out", required=True, help="split JSON to write")
    p.add_argument("--fractions", default="0.7,0.15,0.15", help="train,val,test fractions")
    p.add_argument("--folds", type=int, default=0, help="also assign k folds")
    p.add_argument("--test-fold", dest="test_fold", type=int,
                   help="cross-validation: fold K of --folds is the test split; --fractions (test 0) splits the rest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--s3-endpoint", dest="s3_endpoint")
    p.set_defaults(func=_cmd_split)

    p = sub.add_parser("train", help="train a segmentation model with Ray Train on an ingested dataset")
    p.add_argument("--data", help="ingested dataset (folder or s3:// prefix)")
    p.add_argument("--out", help="run folder (checkpoints, history, curves, model); rerun to resume")
    p.add_argument("--model", help="registry name, e.g. unet, unet-resnet34 (see `brainseg models`)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--num-workers", dest="num_workers", type=int)
    _add_common(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("lr-find", help="learning-rate range test: loss against LR, plot and suggestion")
    p.add_argument("--data", help="ingested dataset")
    p.add_argument("--out", help="folder for lr_find.png and lr_find.json")
    p.add_argument("--model")
    p.add_argument("--config", help="YAML: start_lr, end_lr, steps, and a train: section (as for train)")
    p.add_argument("--s3-endpoint", dest="s3_endpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.batch_size=8 steps=80")
    p.set_defaults(func=_cmd_lr_find)

    p = sub.add_parser("evaluate", help="evaluate model artifacts on an ingested dataset: a report")
    p.add_argument("--model", action="append", help="model artifact (repeat to compare several)")
    p.add_argument("--data", help="ingested dataset")
    p.add_argument("--out", help="report folder")
    p.add_argument("--split-file", dest="split_file", help="split JSON (from `brainseg split` or a train run)")
    p.add_argument("--split", help="split name to evaluate (train, val, test) or all")
    _add_common(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("segment", help="bulk-segment a folder, S3 prefix or archive(s): masks, overlays, findings")
    p.add_argument("--model", help="model artifact (folder or s3:// URI); default: reference, the shipped model")
    p.add_argument("--input", help="folder, s3:// prefix, .tar/.tar.gz/.zip, or a glob of archives")
    p.add_argument("--output", help="output folder or s3:// prefix; rerun the same command to continue")
    p.add_argument("--shard", help="i/n: this submission runs every n-th task only")
    _add_common(p)
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser("score", help="score a finished bulk segmentation's mask files against reference masks")
    p.add_argument("output", help="the segment job's output (folder or s3:// prefix)")
    p.add_argument("--truth", required=True, help="the reference masks: any source `brainseg ingest` reads")
    p.add_argument("--out", help="write the figures, per patient too, to this JSON file")
    p.add_argument("--s3-endpoint", dest="s3_endpoint", help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("serve", help="HTTP endpoint (Ray Serve): POST /v1/segment, a web page at /")
    p.add_argument("--model", help="model artifact (folder or s3:// URI); default: reference, the shipped model")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    _add_common(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("models", help="list the model names the registry knows")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("export", help="copy an artifact with a chosen threshold, post-processing and card, "
                                      "optionally in float16")
    p.add_argument("model", help="model artifact (folder or s3:// URI)")
    p.add_argument("--out", required=True, help="folder or s3:// prefix for the copy")
    p.add_argument("--half", action="store_true", help="store the weights in float16 (half the size)")
    p.add_argument("--threshold", type=float, help="the probability threshold consumers apply by default")
    p.add_argument("--min-component-px", dest="min_component_px", type=int,
                   help="default: drop 2-D components smaller than this")
    p.add_argument("--largest-component-3d", dest="largest_component_3d", action=argparse.BooleanOptionalAction,
                   help="default: keep each patient's largest 3-D component only (batch jobs)")
    p.add_argument("--min-component-peak", dest="min_component_peak", type=float,
                   help="default: drop 2-D components whose highest probability is below this")
    p.add_argument("--keep-3d-fraction", dest="keep_3d_fraction", type=float,
                   help="default: with --largest-component-3d, keep 3-D components of at least this share of the largest")
    p.add_argument("--tta", dest="tta", action=argparse.BooleanOptionalAction,
                   help="default: average the predictions of each slice and its flips")
    p.add_argument("--card", help="a Markdown model card to store beside it as MODEL_CARD.md")
    p.add_argument("--s3-endpoint", dest="s3_endpoint", help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo", help="the whole story on embedded synthetic data")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--patients", type=int, default=12)
    p.add_argument("--verbose", action="store_true", help="also show Ray's workers' lines (per-epoch training, progress)")
    p.set_defaults(func=_cmd_demo)
    return parser


def _job_errors() -> tuple[type[Exception], ...]:
    """Errors that mean "your input or setting is wrong", one line each for the user."""
    from brainseg_ray.batch import SegmentJobError
    from brainseg_ray.models.artifact import ArtifactError
    from brainseg_ray.train.trainer import TrainingError

    from brainseg_ray.evaluate.score_masks import ScoreError

    return (ArtifactError, TrainingError, SegmentJobError, ScoreError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may follow options (argparse would leave them unmatched after --out X).
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    try:
        return args.func(args)
    except (ConfigError, StorageError, ValueError, OSError, *_job_errors()) as exc:
        # A user's mistake (bad path, bad setting) gets one clear line, not a traceback.
        print(f"brainseg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
