"""Training losses: limiting values, composition, focal/BCE equivalences, stability, registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brainseg_ray.train.losses import (
    DEFAULT_LOSS,
    LOSSES,
    BCEDiceLoss,
    DiceLoss,
    FocalLoss,
    build_loss,
)


def masks(n: int = 4, size: int = 16, empty: tuple[int, ...] = (), seed: int = 0) -> torch.Tensor:
    """[n,1,size,size] float {0,1} targets; samples listed in `empty` are tumour-free."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.rand(n, 1, size, size, generator=g) < 0.3).float()
    t[list(empty)] = 0
    return t


def confident(targets: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """Logits that agree with `targets` with probability ~1."""
    return (2 * targets - 1) * scale


# --- Dice -------------------------------------------------------------------------------------


def test_dice_loss_perfect_logits_near_zero():
    t = masks(empty=(1,))  # an empty-truth slice predicted empty also costs ~0
    assert DiceLoss()(confident(t), t).item() < 1e-4


def test_dice_loss_inverted_logits_near_one():
    t = masks()
    assert DiceLoss()(confident(1 - t), t).item() > 0.99


def test_dice_loss_is_a_mean_over_slices():
    t = masks(n=3, empty=(2,))
    logits = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    loss = DiceLoss()
    per_slice = torch.stack([loss(logits[i : i + 1], t[i : i + 1]) for i in range(3)])
    assert loss(logits, t).item() == pytest.approx(per_slice.mean().item(), rel=1e-6)


def test_dice_loss_empty_truth_is_penalised_by_false_positives():
    t = torch.zeros(1, 1, 4, 4)
    clean = DiceLoss()(torch.full_like(t, -20.0), t).item()
    noisy = DiceLoss()(torch.full_like(t, 20.0), t).item()  # 16 false-positive pixels
    assert clean < 1e-6
    assert noisy == pytest.approx(1 - 1 / 17, rel=1e-5)


# --- BCE + Dice -------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.5, 1.0])
def test_bce_dice_is_the_weighted_sum_of_its_parts(weight):
    t = masks(empty=(0,))
    logits = torch.randn(t.shape, generator=torch.Generator().manual_seed(2))
    expected = weight * F.binary_cross_entropy_with_logits(logits, t) + (1 - weight) * DiceLoss(
        smooth=2.0
    )(logits, t)
    got = BCEDiceLoss(bce_weight=weight, smooth=2.0)(logits, t)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


# --- Focal ------------------------------------------------------------------------------------


def test_focal_without_focusing_or_weighting_is_bce():
    t = masks()
    logits = torch.randn(t.shape, generator=torch.Generator().manual_seed(3)) * 3
    bce = F.binary_cross_entropy_with_logits(logits, t)
    assert FocalLoss(alpha=None, gamma=0)(logits, t).item() == pytest.approx(bce.item(), rel=1e-6)
    # alpha = 0.5 weights both classes equally, i.e. half of BCE
    assert FocalLoss(alpha=0.5, gamma=0)(logits, t).item() == pytest.approx(
        0.5 * bce.item(), rel=1e-6
    )


# logit, target, expected: alpha_t * (1 - p_t)**2 * BCE with alpha=0.25, gamma=2
FOCAL_HAND = [
    (0.0, 1.0, 0.25 * 0.25 * math.log(2)),  # p_t = 0.5, lesion pixel weighted by alpha
    (0.0, 0.0, 0.75 * 0.25 * math.log(2)),  # background weighted by 1 - alpha
    (math.log(3), 1.0, 0.25 * (1 / 4) ** 2 * math.log(4 / 3)),  # p = 0.75
]


@pytest.mark.parametrize("logit, target, expected", FOCAL_HAND)
def test_focal_hand_values(logit, target, expected):
    got = FocalLoss()(torch.tensor([[[[logit]]]]), torch.tensor([[[[target]]]]))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_focal_down_weights_easy_pixels():
    t = masks()
    easy, hard = confident(t, 3.0), confident(t, 0.2)
    bce = nn.BCEWithLogitsLoss()
    focal = FocalLoss(alpha=None, gamma=2.0)
    # focusing shrinks the loss of confident pixels far more than that of uncertain ones
    assert focal(easy, t) / bce(easy, t) < 0.01
    assert focal(hard, t) / bce(hard, t) > 0.2


# --- stability --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("scale", [0.0, 1.0, 1000.0], ids=["zero", "unit", "extreme"])
def test_gradients_finite_for_empty_targets(name, scale):
    t = torch.zeros(2, 1, 8, 8)
    logits = torch.randn(t.shape, generator=torch.Generator().manual_seed(4)) * scale
    logits.requires_grad_(True)
    loss = build_loss(name)(logits, t)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_finite_for_confident_logits(name):
    t = masks(empty=(3,))
    logits = confident(t, 200.0).requires_grad_(True)
    build_loss(name)(logits, t).backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("loss", [DiceLoss(), BCEDiceLoss(), FocalLoss()])
def test_shape_mismatch_is_rejected(loss):
    with pytest.raises(ValueError, match="shape"):
        loss(torch.zeros(2, 1, 8, 8), torch.zeros(2, 8, 8))


@pytest.mark.parametrize(
    "factory, kwargs",
    [
        (DiceLoss, {"smooth": 0.0}),
        (BCEDiceLoss, {"bce_weight": 1.5}),
        (BCEDiceLoss, {"bce_weight": -0.1}),
        (FocalLoss, {"gamma": -1.0}),
        (FocalLoss, {"alpha": 2.0}),
    ],
)
def test_bad_parameters_are_rejected(factory, kwargs):
    with pytest.raises(ValueError):
        factory(**kwargs)


# --- registry ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, cls",
    [
        ("bce_dice", BCEDiceLoss),
        ("dice", DiceLoss),
        ("focal", FocalLoss),
        ("bce", nn.BCEWithLogitsLoss),
    ],
)
def test_build_loss_by_name(name, cls):
    assert isinstance(build_loss(name), cls)


def test_build_loss_default_and_kwargs():
    assert DEFAULT_LOSS == "bce_dice" and isinstance(build_loss(), BCEDiceLoss)
    focal = build_loss("focal", alpha=None, gamma=0.0)
    assert focal.alpha is None and focal.gamma == 0.0
    assert build_loss("bce_dice", bce_weight=0.2).bce_weight == 0.2


@pytest.mark.parametrize("name", ["dice_bce", "BCE", "", None])
def test_build_loss_unknown_name_lists_known(name):
    with pytest.raises(ValueError) as err:
        build_loss(name)
    for known in LOSSES:
        assert known in str(err.value)


def test_build_loss_bad_kwarg_is_a_type_error():
    with pytest.raises(TypeError):
        build_loss("dice", gamma=2.0)
