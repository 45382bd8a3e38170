"""The pieces under the train job: device/precision choice, the model-input contract, one
optimisation step, the validation pass and the per-slice evaluation loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainseg_ray.compat import ensure_torchvision_importable
from brainseg_ray.devices import cpu_has_native_bf16, pick_device, resolve_precision
from brainseg_ray.models.inputs import (
    DEFAULT_NORMALISATION,
    SLICE_FLOOR,
    SLICE_GAINS,
    SLICE_MIN_PIXELS,
    images_to_tensor,
    logits_to_probabilities,
    masks_to_tensor,
    normalisation_from_profile,
    normalisation_mode,
    normalisation_text,
    rescale_slices,
    without_slice_rescaling,
)
from brainseg_ray.models.registry import ModelSpec, build_model
from brainseg_ray.train.losses import build_loss, per_slice_bce_dice
from brainseg_ray.train.metrics import SegmentationMetrics
from brainseg_ray.train.steps import (TrainStep, build_one_cycle, build_optimizer, build_schedule, training_batch,
                                      validate)

ensure_torchvision_importable()
CPU = torch.device("cpu")


@pytest.mark.parametrize("asked, expected", [
    ("fp32", "fp32"),
    ("bf16", "bf16"),
    ("auto", "bf16" if cpu_has_native_bf16() else "fp32"),
])
def test_precision_on_cpu(asked, expected):
    assert resolve_precision(asked, CPU) == expected


@pytest.mark.parametrize("asked, message", [("fp16", "needs a GPU"), ("half", "unknown precision")])
def test_bad_precision_is_refused(asked, message):
    with pytest.raises(ValueError, match=message):
        resolve_precision(asked, CPU)


def test_device_choice():
    assert pick_device(False).type == "cpu"
    if not torch.cuda.is_available():
        assert pick_device(None).type == "cpu"  # None: a GPU when one is visible
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device(True)


def test_images_to_tensor_normalises_per_channel_and_resizes():
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[..., 0], images[..., 1], images[..., 2] = 0, 51, 255
    norm = {"scale": 255, "mean": [0.0, 0.2, 0.5], "std": [1.0, 0.1, 0.25]}
    x = images_to_tensor(images, norm, size=4)
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0], torch.tensor(0.0))
    assert torch.allclose(x[:, 1], torch.tensor(0.0), atol=1e-6)  # 51/255 = 0.2 -> (0.2-0.2)/0.1
    assert torch.allclose(x[:, 2], torch.tensor(2.0))  # (1.0-0.5)/0.25
    resized = images_to_tensor(images, norm, size=8, channels_last=True)
    assert resized.shape == (2, 3, 8, 8) and resized.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(resized[:, 2], torch.tensor(2.0))  # a constant stays constant


def test_masks_stay_binary_when_resized():
    masks = np.zeros((1, 8, 8), np.uint8)
    masks[0, 2:6, 2:6] = 1
    y = masks_to_tensor(masks, size=4)
    assert y.shape == (1, 1, 4, 4)
    assert set(torch.unique(y).tolist()) == {0.0, 1.0}
    assert int(y.sum()) == 4  # the 4x4 square becomes 2x2


def test_logits_to_probabilities_upsamples_then_squashes():
    logits = torch.zeros((3, 1, 4, 4))
    logits[1] = 20.0
    probs = logits_to_probabilities(logits, 8, 8)
    assert probs.shape == (3, 8, 8)
    assert torch.allclose(probs[0], torch.tensor(0.5)) and bool((probs[1] > 0.999).all())


def test_normalisation_from_the_ingest_profile():
    norm = normalisation_from_profile({"channels": {"mean": [51.0, 102.0, 0.0], "std": [25.5, 51.0, 255.0]}})
    assert norm["scale"] == 255
    assert np.allclose(norm["mean"], [0.2, 0.4, 0.0]) and np.allclose(norm["std"], [0.1, 0.2, 1.0])
    # Unknown statistics (an empty dataset) fall back to the default rather than dividing by 0.
    assert normalisation_from_profile({"channels": {"mean": [None] * 3, "std": [None] * 3}}) == DEFAULT_NORMALISATION
    assert normalisation_from_profile({"channels": {"mean": [1, 2, 3], "std": [0, 1, 1]}}) == DEFAULT_NORMALISATION
    assert normalisation_from_profile(None) == DEFAULT_NORMALISATION
    sliced = normalisation_from_profile(None, "slice")
    assert sliced == {**DEFAULT_NORMALISATION, "slice_percentile": 99.0, "slice_target": 150.0}
    assert without_slice_rescaling(sliced) == DEFAULT_NORMALISATION
    assert [normalisation_mode(n) for n in (sliced, DEFAULT_NORMALISATION)] == ["slice", "dataset"]
    assert "99th percentile over the brain is 150 of 255" in normalisation_text(sliced)
    assert normalisation_text(DEFAULT_NORMALISATION) == "per channel, the training data's mean and std"
    with pytest.raises(ValueError, match="normalisation must be one of dataset, slice"):
        normalisation_from_profile(None, "zscore")


SLICE = {**DEFAULT_NORMALISATION, "slice_percentile": 99.0, "slice_target": 150.0}


def _head(level: int, brain_px: int = 4096, size: int = 128) -> np.ndarray:
    """One channel: a square "brain" of `brain_px` pixels at `level` (a 1 % brighter rim on top,
    so the 99th percentile is the level itself) in air of value 3."""
    channel = np.full((size, size), 3, np.uint8)
    side = int(brain_px ** 0.5)
    channel[:side, :side] = level
    channel[0, :side // 2] = min(255, level + 10)
    return channel


@pytest.mark.parametrize("level, brain_px, expected", [
    (75, 4096, 150),  # a dim channel is doubled
    (150, 4096, 150),  # already at the target: unchanged
    (200, 4096, 150),  # a bright one is dimmed
    (20, 4096, 80),  # the factor stops at 4: a nearly black channel is not blown up into noise
    (75, 144, 75),  # under 256 brain pixels (past the skull's end): left as it is
])
def test_rescale_slices_brings_each_channel_to_the_target(level, brain_px, expected):
    image = np.stack([_head(level, brain_px), _head(150), _head(120)], axis=-1)[None]
    out = rescale_slices(image, SLICE)
    assert out.dtype == np.uint8 and out.shape == image.shape
    side = int(brain_px ** 0.5)
    assert int(out[0, side - 1, side - 1, 0]) == expected  # a brain pixel of the rescaled channel
    assert int(out[0, 100, 100, 0]) == round(3 * expected / level)  # air scales too, by the same factor
    assert np.array_equal(out[0, ..., 1], image[0, ..., 1])  # each channel on its own
    assert int(out[0, 10, 10, 2]) == 150  # 120 -> 150


def test_rescale_slices_clips_and_leaves_dataset_normalisation_alone():
    image = np.stack([_head(100)] * 3, axis=-1)[None].copy()
    image[0, 5, 5, 0] = 250  # a lesion far brighter than the rest: x1.5 would pass 255
    assert rescale_slices(image, SLICE)[0, 5, 5, 0] == 255
    assert rescale_slices(image, DEFAULT_NORMALISATION) is image  # no per-slice key: untouched
    assert rescale_slices(image[:0], SLICE).shape == (0, 128, 128, 3)


def _rescaled_by_sorting(images, percentile, target):
    """rescale_slices' definition spelled out slowly: each channel's brain pixels sorted, the one at
    the percentile's rank gives the factor."""
    out = images.astype(np.float32)
    for i in range(len(images)):
        for j in range(images.shape[-1]):
            brain = np.sort(images[i, ..., j][images[i, ..., j] > SLICE_FLOOR])
            if len(brain) >= SLICE_MIN_PIXELS:
                value = brain[int(round(percentile / 100 * (len(brain) - 1)))]
                out[i, ..., j] *= np.float32(np.clip(target / float(value), *SLICE_GAINS))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def test_rescale_slices_picks_the_same_percentile_as_sorting():
    """Random heads of every brightness, some with too few brain pixels, some passed as views."""
    rng = np.random.default_rng(7)
    images = np.zeros((12, 64, 64, 3), np.uint8)
    for i, image in enumerate(images):
        for j in range(3):
            side = [10, 16, 17, 40, 64][(i + j) % 5]  # squares of 100 to 4096 pixels, some of them air
            image[:side, :side, j] = rng.integers(0, rng.integers(12, 256), (side, side))
    for percentile in (99.0, 50.0, 90.0):
        norm = dict(SLICE, slice_percentile=percentile)
        assert np.array_equal(rescale_slices(images, norm), _rescaled_by_sorting(images, percentile, 150.0))
    view = images[:, ::2, 1:]  # not contiguous
    assert np.array_equal(rescale_slices(view, SLICE), _rescaled_by_sorting(view, 99.0, 150.0))


def test_slice_normalisation_makes_the_input_independent_of_a_scanners_brightness():
    """The same slice at two brightnesses reaches the model as nearly the same tensor with
    normalisation "slice", and as clearly different ones without it."""
    rng = np.random.default_rng(0)
    bright = np.stack([_head(160), _head(180), _head(140)], axis=-1)[None].astype(np.int16)
    bright = np.clip(bright + rng.integers(-8, 9, bright.shape), 0, 255).astype(np.uint8)
    dim = (bright * 0.55).astype(np.uint8)
    sliced = images_to_tensor(dim, SLICE, 128) - images_to_tensor(bright, SLICE, 128)
    plain = images_to_tensor(dim, DEFAULT_NORMALISATION, 128) - images_to_tensor(bright, DEFAULT_NORMALISATION, 128)
    assert float(sliced.abs().mean()) < 0.05 < float(plain.abs().mean())
    # images_to_tensor applies exactly rescale_slices, then the dataset normalisation.
    assert torch.equal(images_to_tensor(dim, SLICE, 128),
                       images_to_tensor(rescale_slices(dim, SLICE), without_slice_rescaling(SLICE), 128))


def test_training_batch_rescales_the_whole_slice_before_the_crop():
    """A crop of a slice's dim half keeps its level relative to the whole slice (as inference
    sees it), rather than being brought to the target on its own; the crop and the augmentation
    then apply to image and mask together."""
    image = np.stack([_head(100, 64 * 64)] * 3, axis=-1)[None].copy()
    image[0, :, 64:] = 60  # the right half: dim brain
    mask = np.zeros((1, 128, 128), np.uint8)
    mask[0, 70:80, 70:90] = 1

    def right_half(images, masks):  # a 64 px crop of the dim half, around the mask
        return images[:, 32:96, 64:], masks[:, 32:96, 64:], np.array([True])

    def flip(images, masks):
        return images[:, :, ::-1], masks[:, :, ::-1]

    x, y, centred = training_batch(image, mask, normalisation=SLICE, augment=flip, size=64, device=CPU,
                                   channels_last=True, crop=right_half)
    expected = images_to_tensor(rescale_slices(image, SLICE)[:, 32:96, 64:][:, :, ::-1], DEFAULT_NORMALISATION, 64)
    assert torch.allclose(x, expected) and centred == 1
    assert not torch.allclose(x, images_to_tensor(image[:, 32:96, 64:][:, :, ::-1], SLICE, 64), atol=0.1)
    assert torch.equal(y[0, 0], torch.from_numpy(mask[0, 32:96, 64:][:, ::-1].copy()).float())
    # Without a crop nothing is counted, and the whole slice is the input.
    x, _, centred = training_batch(image, mask, normalisation=SLICE, augment=lambda i, m: (i, m), size=128,
                                   device=CPU, channels_last=False)
    assert centred == 0 and torch.equal(x, images_to_tensor(image, SLICE, 128))


def _blob_batch(n=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        y, x = rng.integers(4, size - 12, 2)
        masks[i, y:y + 8, x:x + 8] = 1
        images[i, y:y + 8, x:x + 8, 1] = 220  # bright in FLAIR, like a lesion
    return images, masks


def test_train_step_fits_one_batch_and_respects_the_schedule():
    torch.manual_seed(0)
    model = build_model(ModelSpec("unet", base_filters=4))
    optimizer = build_optimizer(model, lr=3e-2, weight_decay=1e-4)
    scheduler = build_one_cycle(optimizer, lr=3e-2, total_steps=30)
    step = TrainStep(model, build_loss("bce_dice"), optimizer, CPU, "fp32", grad_clip=1.0, scheduler=scheduler)
    images, masks = _blob_batch()
    x, y = images_to_tensor(images, DEFAULT_NORMALISATION, 32), masks_to_tensor(masks, 32)
    losses = [step(x, y) for _ in range(35)]  # more steps than the schedule: must not raise
    assert losses[-1] < 0.5 * losses[0]
    assert scheduler.last_epoch == scheduler.total_steps - 1
    # Weight decay skips biases and batch-norm weights.
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 1e-4 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim <= 1 for p in plain["params"])

    state = step.state_dict()
    fresh_opt = build_optimizer(model, lr=1e-2, weight_decay=1e-4)
    fresh = TrainStep(model, build_loss("bce_dice"), fresh_opt, CPU, "fp32", 1.0, build_one_cycle(fresh_opt, 3e-2, 30))
    fresh.load_state_dict(state)
    assert fresh.scheduler.last_epoch == scheduler.last_epoch
    assert fresh_opt.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


def _lrs(name: str, total: int, warmup_fraction=None, steps: int | None = None) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_schedule(optimizer, name, 1e-3, total, warmup_fraction)
    lrs = []
    for _ in range(steps or total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("name, warmup, peak_at", [("cosine", None, 50), ("cosine", 0.2, 200),
                                                    ("one_cycle", None, 300), ("one_cycle", 0.1, 100)])
def test_schedules_warm_up_to_the_peak_then_decay_over_the_steps(name, warmup, peak_at):
    """Over 1000 steps: a rise from at most lr/25 to the peak lr at the warm-up's end (5 % for
    cosine, 30 % for one-cycle unless told), then a fall to at most lr/1000 at the last step."""
    lrs = _lrs(name, 1000, warmup)
    assert lrs[0] <= 1e-3 / 25 * 1.01
    assert int(np.argmax(lrs)) == pytest.approx(peak_at, abs=1) and max(lrs) == pytest.approx(1e-3, rel=1e-3)
    assert all(a <= b + 1e-12 for a, b in zip(lrs[:peak_at], lrs[1:peak_at]))  # rising
    assert all(a >= b - 1e-12 for a, b in zip(lrs[peak_at + 1:], lrs[peak_at + 2:]))  # falling
    assert lrs[-1] <= 1e-3 / 1000 * 1.01


def test_cosine_halfway_through_the_decay_is_half_the_peak():
    lrs = _lrs("cosine", 1002, 0.0)  # warm-up of one step, then 1000 steps of decay
    assert lrs[501] == pytest.approx(0.5 * (1e-3 + 1e-6), rel=1e-3)


def test_unknown_schedule_is_refused():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="schedule must be one of one_cycle, cosine"):
        build_schedule(optimizer, "step", 1e-3, 10)


def test_train_step_with_cosine_steps_past_the_total_without_error():
    torch.manual_seed(0)
    model = build_model(ModelSpec("unet", base_filters=4))
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.0)
    step = TrainStep(model, build_loss("bce_dice"), optimizer, CPU, "fp32", 1.0,
                     build_schedule(optimizer, "cosine", 1e-2, 5))
    images, masks = _blob_batch()
    x, y = images_to_tensor(images, DEFAULT_NORMALISATION, 32), masks_to_tensor(masks, 32)
    for _ in range(8):
        step(x, y)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5, rel=1e-3)


class _Constant(torch.nn.Module):
    """Logits of one value everywhere: every pixel predicted tumour (or none)."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full((x.shape[0], 1, x.shape[2], x.shape[3]), self.value)


@pytest.mark.parametrize("value", [10.0, -10.0])
def test_validate_matches_the_metrics_on_explicit_masks(value):
    images, masks = _blob_batch(n=5, size=32, seed=3)
    masks[4] = 0  # one tumour-free slice
    ids = ["A", "A", "B", "B", "B"]
    batches = [(ids[:2], images[:2], masks[:2]), (ids[2:], images[2:], masks[2:])]
    metrics, loss_sum, count = validate(_Constant(value), batches, loss_fn=build_loss("bce"),
                                        normalisation=DEFAULT_NORMALISATION, size=32, device=CPU,
                                        precision="fp32", channels_last=False, threshold=0.5)
    expected = SegmentationMetrics()
    expected.update(ids, np.full(masks.shape, value > 0), masks.astype(bool))
    assert metrics.compute() == expected.compute()
    assert count == 5 and loss_sum > 0


def test_update_counts_equals_update_on_masks():
    rng = np.random.default_rng(1)
    preds, truths = rng.random((6, 16, 16)) > 0.7, rng.random((6, 16, 16)) > 0.8
    truths[2] = False
    preds[3] = False
    ids = ["p1", "p1", "p2", "p2", "p3", "p3"]
    a, b = SegmentationMetrics(), SegmentationMetrics()
    a.update(ids, preds, truths)
    tp = (preds & truths).sum(axis=(1, 2))
    b.update_counts(ids, tp, preds.sum(axis=(1, 2)) - tp, truths.sum(axis=(1, 2)) - tp,
                    256 - (preds | truths).sum(axis=(1, 2)))
    assert a.compute() == b.compute()
    with pytest.raises(ValueError, match="one entry per slice"):
        b.update_counts(ids[:2], tp, tp, tp, tp)
    with pytest.raises(ValueError, match="negative"):
        b.update_counts(["x"], [-1], [0], [0], [0])


def test_per_slice_loss_by_hand():
    truth = np.zeros((2, 2, 2), bool)
    truth[0, 0, 0] = True
    perfect = truth.astype(np.float32)
    loss = per_slice_bce_dice(perfect, truth)
    assert np.allclose(loss, 0.0, atol=1e-5)
    half = np.full((1, 2, 2), 0.5, np.float32)
    # BCE of 0.5 is ln 2 everywhere; soft Dice = (2*0.5 + 1) / (2 + 1 + 1) = 0.5.
    assert np.isclose(per_slice_bce_dice(half, truth[:1])[0], np.log(2) + 0.5, atol=1e-6)


@pytest.mark.parametrize("count,cap,expected", [(1, None, 2), (2, None, 1), (3, None, 1), (1, 1, 1)])
def test_default_cpus_per_actor_shares_the_cluster_within_one_node(ray_local, count, cap, expected):
    from brainseg_ray.runtime import cpus_per_actor

    assert cpus_per_actor(count, cap=cap) == expected  # the test instance: one node of 2 CPUs


@pytest.mark.parametrize("count,asked,keep_free,expected", [
    (1, 1.5, 0, 1.5),  # asked: as given
    (1, 1.5, 1, 1.0),  # evaluation leaves one of the 2 CPUs to its read stage
    (2, 1.0, 1, 0.5),
    (3, 1.0, 1, 0.5),  # never below half a CPU
    (1, None, 1, 1.0),  # not asked: the CPUs left, shared out
])
def test_cpus_per_actor_asked_and_kept_free(ray_local, count, asked, keep_free, expected):
    from brainseg_ray.runtime import cpus_per_actor

    assert cpus_per_actor(count, asked, keep_free=keep_free) == expected


def test_use_gpu_decided_one_way_for_every_job(monkeypatch):
    """None: GPUs when the cluster has one; false: never, even then; true: always."""
    import ray

    from brainseg_ray.runtime import gpus_per_actor, job_uses_gpu

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    assert job_uses_gpu(None) and job_uses_gpu(True) and not job_uses_gpu(False)
    assert gpus_per_actor(None, 0.5) == 0.5 and gpus_per_actor(False, 0.5) == 0.0
    with pytest.raises(ValueError, match="positive"):
        gpus_per_actor(True, 0.0)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    assert not job_uses_gpu(None) and gpus_per_actor(None) == 0.0 and gpus_per_actor(True) == 1.0
