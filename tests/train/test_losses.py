"""Loss terms against values worked out by hand on 2x2 masks, and the lambda weighting modes."""

from __future__ import annotations

import math

import pytest
import torch

from picosam_pipeline.train.losses import (
    PRESETS,
    DistillationLoss,
    area_loss,
    bce_dice_loss,
    dice_loss,
    mse_dice_loss,
)

LN3 = math.log(3.0)  # sigmoid(ln 3) = 0.75, sigmoid(-ln 3) = 0.25


def mask(*values: float) -> torch.Tensor:
    """A (1, 1, 2, 2) tensor, values in row-major order."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 2, 2)


# Sample A: student probabilities (.5, .75, .25, .5), GT (1, 1, 0, 0), teacher probabilities (.75, .75, .25, .25).
S_A, GT_A, T_A = mask(0, LN3, -LN3, 0), mask(1, 1, 0, 0), mask(LN3, LN3, -LN3, -LN3)
# Sample B: student .25 everywhere, GT all ones, teacher .75 everywhere.
S_B, GT_B, T_B = mask(-LN3, -LN3, -LN3, -LN3), mask(1, 1, 1, 1), mask(LN3, LN3, LN3, LN3)

# By hand (eps = 1e-6 is below the tolerance):
# A: BCE = (ln 2 + ln 4/3 + ln 4/3 + ln 2) / 4; Dice = 2 * (.5 + .75) / (2 + 2) = .625
GT_LOSS_A = (2 * math.log(2) + 2 * math.log(4 / 3)) / 4 + (1 - 0.625)
#    MSE = (.25^2 + 0 + 0 + .25^2) / 4; Dice = 2 * (.375 + .5625 + .0625 + .125) / (2 + 2) = .5625
TEACHER_LOSS_A = 0.125 / 4 + (1 - 0.5625)
# B: BCE = ln 4; Dice = 2 * 1 / (1 + 4) = .4.    Teacher: MSE = .5^2; Dice = 2 * .75 / (1 + 3) = .375
GT_LOSS_B = math.log(4) + (1 - 0.4)
TEACHER_LOSS_B = 0.25 + (1 - 0.375)
# Area (min_ratio .4): A predicts 2 of 2 GT pixels -> 0; B predicts 1 of 4 -> .4 - .25 = .15
AREA_A, AREA_B = 0.0, 0.15

BATCH = [torch.cat(pair) for pair in ((S_A, S_B), (GT_A, GT_B), (T_A, T_B))]


def close(actual: torch.Tensor, expected: float | list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), atol=1e-5, rtol=0)


def test_dice_loss() -> None:
    close(dice_loss(torch.sigmoid(S_A), GT_A), 1 - 0.625)
    close(dice_loss(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2)), 0.0)
    close(dice_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)), 0.0)  # eps: empty vs empty is a match


def test_ground_truth_term() -> None:
    close(bce_dice_loss(S_A, GT_A), GT_LOSS_A)
    logits, gt, _ = BATCH
    close(bce_dice_loss(logits, gt, reduction="none"), [GT_LOSS_A, GT_LOSS_B])
    close(bce_dice_loss(logits, gt), (GT_LOSS_A + GT_LOSS_B) / 2)


def test_ground_truth_bce_stays_finite_for_saturated_logits() -> None:
    loss = bce_dice_loss(mask(200, 200, -200, -200), mask(0, 0, 1, 1))
    close(loss, 200.0 + 1.0)  # BCE = 200 per pixel (BCE on probabilities would clamp at 100); 1 - Dice = 1


def test_teacher_term() -> None:
    close(mse_dice_loss(S_A, T_A), TEACHER_LOSS_A)
    logits, _, teacher = BATCH
    close(mse_dice_loss(logits, teacher, reduction="none"), [TEACHER_LOSS_A, TEACHER_LOSS_B])


def test_temperature_scales_student_and_teacher() -> None:
    # PicoSAM3's sigmoid(5x) is T = 0.2: logits divided by 5 give the same values at T = 0.2.
    close(bce_dice_loss(S_A * 0.2, GT_A, temperature=0.2), GT_LOSS_A)
    close(mse_dice_loss(S_A * 0.2, T_A * 0.2, temperature=0.2), TEACHER_LOSS_A)
    close(area_loss(S_B * 0.2, GT_B, temperature=0.2), AREA_B)
    # and at T = 1 the same small logits give a different (softer) loss
    assert abs(mse_dice_loss(S_A * 0.2, T_A * 0.2).item() - TEACHER_LOSS_A) > 0.01


def test_area_term() -> None:
    logits, gt, _ = BATCH
    close(area_loss(logits, gt, reduction="none"), [AREA_A, AREA_B])
    close(area_loss(logits, gt, min_ratio=0.2, reduction="none"), [0.0, 0.0])  # .25 >= .2
    close(area_loss(S_B, torch.zeros(1, 1, 2, 2)), 0.0)  # no GT: no area to fall short of


def test_lambda_zero_is_exactly_the_ground_truth_loss() -> None:
    logits, gt, teacher = BATCH
    expected = bce_dice_loss(logits, gt)
    baseline = DistillationLoss(lambda_mode="fixed", fixed_lambda=0.0)
    assert not baseline.needs_teacher
    total, terms = baseline(logits, gt)  # no teacher needed
    assert torch.equal(total, expected)
    assert torch.equal(baseline(logits, gt, teacher)[0], expected)
    assert terms["lambda"].item() == 0.0 and terms["teacher"].item() == 0.0
    zero_confidence = DistillationLoss(lambda_mode="confidence_per_sample")
    assert torch.equal(zero_confidence(logits, gt, teacher, torch.zeros(2))[0], expected)


def test_confidence_per_sample_versus_batch_mean() -> None:
    logits, gt, teacher = BATCH
    confidence = torch.tensor([0.2, 1.5])  # clamped to (0.2, 1.0)
    per_sample, terms = DistillationLoss(lambda_mode="confidence_per_sample")(logits, gt, teacher, confidence)
    close(per_sample, ((0.2 * TEACHER_LOSS_A + 0.8 * GT_LOSS_A) + (1.0 * TEACHER_LOSS_B + 0.0 * GT_LOSS_B)) / 2)
    close(terms["lambda"], 0.6)

    batch_mean, terms = DistillationLoss(lambda_mode="confidence_batch_mean")(logits, gt, teacher, confidence)
    mean_t, mean_g = (TEACHER_LOSS_A + TEACHER_LOSS_B) / 2, (GT_LOSS_A + GT_LOSS_B) / 2
    close(batch_mean, 0.6 * mean_t + 0.4 * mean_g)
    close(terms["teacher"], mean_t)
    close(terms["gt"], mean_g)
    assert abs(per_sample.item() - batch_mean.item()) > 0.1  # the modes really differ here


def test_fixed_lambda_and_picosam3_preset_with_area_term() -> None:
    logits, gt, teacher = BATCH
    total, _ = DistillationLoss(lambda_mode="fixed", fixed_lambda=0.5)(logits, gt, teacher)
    close(total, 0.5 * (TEACHER_LOSS_A + TEACHER_LOSS_B) / 2 + 0.5 * (GT_LOSS_A + GT_LOSS_B) / 2)

    loss = DistillationLoss(**PRESETS["picosam3"])
    confidence = torch.tensor([0.2, 1.0])
    total, terms = loss(logits * 0.2, gt, teacher * 0.2, confidence)  # T = 0.2 undoes the / 5
    expected = (
        0.6 * (TEACHER_LOSS_A + TEACHER_LOSS_B) / 2 + 0.4 * (GT_LOSS_A + GT_LOSS_B) / 2 + 0.4 * (AREA_A + AREA_B) / 2
    )
    close(total, expected)
    close(terms["area"], (AREA_A + AREA_B) / 2)


def test_gradients_flow_to_the_student_only() -> None:
    logits, gt, teacher = (t.clone() for t in BATCH)
    logits.requires_grad_(True)
    teacher.requires_grad_(True)
    confidence = torch.tensor([0.3, 0.9], requires_grad=True)
    total, terms = DistillationLoss(**PRESETS["picosam3"])(logits, gt, teacher.detach(), confidence)
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert confidence.grad is None  # lambda is a weight, not optimised
    assert all(not v.requires_grad and v.dim() == 0 for v in terms.values())


def test_invalid_settings_and_missing_inputs() -> None:
    with pytest.raises(ValueError, match="lambda_mode"):
        DistillationLoss(lambda_mode="adaptive")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fixed_lambda"):
        DistillationLoss(lambda_mode="fixed", fixed_lambda=1.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=0.0)
    logits, gt, teacher = BATCH
    with pytest.raises(ValueError, match="teacher_logits"):
        DistillationLoss()(logits, gt, None, torch.ones(2))
    with pytest.raises(ValueError, match="confidence"):
        DistillationLoss()(logits, gt, teacher)
