"""Distillation losses of PicoSAM2 and PicoSAM3, as pure functions plus one config-driven combination.

All functions take mask logits of shape (B, 1, H, W) in the 96x96 crop frame and return either the
batch mean (``reduction="mean"``, a 0-d tensor) or one value per sample (``reduction="none"``, shape (B,)).
Ground truth is a {0, 1} float mask of the same shape; teacher input is the teacher's *logits*.

Per sample, with ``p = sigmoid(logits / T)``::

    L_gt      = BCE(p, gt) + (1 - Dice(p, gt))                        # ground-truth term
    L_teacher = MSE(p, p_teacher) + (1 - Dice(p, p_teacher))          # teacher term, p_teacher = sigmoid(teacher / T)
    L_area    = relu(min_ratio - sum(p) / (sum(gt) + eps))            # PicoSAM3: penalise too-small masks
    loss      = lambda * L_teacher + (1 - lambda) * L_gt + area_weight * L_area

``Dice(a, b) = (2 sum(a b) + eps) / (sum a + sum b + eps)`` with eps = 1e-6 (soft Dice, per sample).
``lambda`` is the teacher's confidence (PicoSAM2: SAM2's predicted IoU; PicoSAM3: SAM3's detection
score), clamped to [0, 1] and averaged over the batch as both papers' code does, or kept per sample,
or fixed. ``lambda = 0`` is the supervised baseline (BCE + Dice on ground truth only).

Temperature: PicoSAM3 replaces every sigmoid (student and teacher, in all terms) by a "steeper sigmoid"
``sigmoid(5 x)``. In this module's ``sigmoid(x / T)`` form that is **T = 0.2**; PicoSAM2 is T = 1.
The mask is still ``logits > 0`` for any T, so thresholds and IoU are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-6  # both papers' smoothing constant for Dice and the area ratio

Reduction = Literal["mean", "none"]
LambdaMode = Literal["confidence_batch_mean", "confidence_per_sample", "fixed"]


def _reduce(per_sample: Tensor, reduction: Reduction) -> Tensor:
    return per_sample.mean() if reduction == "mean" else per_sample


def _per_sample_sum(x: Tensor) -> Tensor:
    return x.flatten(1).sum(1)


def dice_loss(p: Tensor, target: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """``1 - soft Dice`` between probabilities ``p`` and a target in [0, 1], both (B, ...)."""
    dice = (2 * _per_sample_sum(p * target) + EPS) / (_per_sample_sum(p) + _per_sample_sum(target) + EPS)
    return _reduce(1 - dice, reduction)


def bce_dice_loss(logits: Tensor, gt: Tensor, *, temperature: float = 1.0, reduction: Reduction = "mean") -> Tensor:
    """Ground-truth term: BCE(sigmoid(logits / T), gt) + (1 - Dice); BCE is the per-sample pixel mean.

    BCE is computed from the scaled logits (``binary_cross_entropy_with_logits``): the same value as
    BCE on probabilities, but finite for saturated logits and allowed under autocast.
    """
    scaled = logits / temperature
    bce = F.binary_cross_entropy_with_logits(scaled, gt, reduction="none").flatten(1).mean(1)
    return _reduce(bce + dice_loss(torch.sigmoid(scaled), gt, reduction="none"), reduction)


def mse_dice_loss(
    logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, reduction: Reduction = "mean"
) -> Tensor:
    """Teacher term: MSE + (1 - soft Dice) between sigmoid(student / T) and sigmoid(teacher / T)."""
    p = torch.sigmoid(logits / temperature)
    q = torch.sigmoid(teacher_logits / temperature)
    mse = (p - q).square().flatten(1).mean(1)
    return _reduce(mse + dice_loss(p, q, reduction="none"), reduction)


def area_loss(
    logits: Tensor, gt: Tensor, *, min_ratio: float = 0.4, temperature: float = 1.0, reduction: Reduction = "mean"
) -> Tensor:
    """PicoSAM3's area term: ``relu(min_ratio - soft predicted area / GT area)`` per sample.

    Zero once the soft area sum(sigmoid(logits / T)) reaches ``min_ratio`` of the GT area; it pushes
    against the collapse to tiny masks that Dice alone tolerates on small objects.
    """
    ratio = _per_sample_sum(torch.sigmoid(logits / temperature)) / (_per_sample_sum(gt) + EPS)
    return _reduce(F.relu(min_ratio - ratio), reduction)


def teacher_weight(
    confidence: Tensor | None, *, mode: LambdaMode, fixed_lambda: float, batch_size: int, device: torch.device
) -> Tensor:
    """Lambda per sample, shape (B,): clamped confidence, its batch mean repeated, or ``fixed_lambda``."""
    if mode == "fixed":
        return torch.full((batch_size,), fixed_lambda, device=device)
    if confidence is None:
        raise ValueError(f"lambda_mode={mode!r} needs the teacher's confidence per sample; pass confidence=")
    lam = confidence.detach().float().reshape(batch_size).clamp(0.0, 1.0)  # a weight, not a thing to optimise
    return lam.mean().expand(batch_size) if mode == "confidence_batch_mean" else lam


@dataclass(frozen=True)
class DistillationLoss:
    """``lambda * L_teacher + (1 - lambda) * L_gt + area_weight * L_area``, averaged over the batch.

    Fields map 1:1 onto params (see :data:`PRESETS` for both papers' settings):

    - ``lambda_mode``: ``confidence_batch_mean`` (both papers' code: lambda = mean of clamped teacher
      confidences), ``confidence_per_sample`` (each sample weighted by its own confidence, the papers'
      stated intent), or ``fixed`` (``fixed_lambda``; 0 = supervised baseline, 0.5 = both papers' val loss);
    - ``temperature``: T in sigmoid(x / T) for every term (1 = PicoSAM2, 0.2 = PicoSAM3's sigmoid(5x));
    - ``area_weight`` / ``area_min_ratio``: PicoSAM3's area term (0.4 / 0.4); 0 disables it.

    With ``lambda_mode="fixed"`` and ``fixed_lambda=0`` the teacher is not needed (``teacher_logits=None``).
    """

    lambda_mode: LambdaMode = "confidence_batch_mean"
    fixed_lambda: float = 0.5
    temperature: float = 1.0
    area_weight: float = 0.0
    area_min_ratio: float = 0.4

    def __post_init__(self) -> None:
        if self.lambda_mode not in ("confidence_batch_mean", "confidence_per_sample", "fixed"):
            raise ValueError(
                f"lambda_mode: expected confidence_batch_mean, confidence_per_sample or fixed, got {self.lambda_mode!r}"
            )
        if not 0.0 <= self.fixed_lambda <= 1.0:
            raise ValueError(f"fixed_lambda: expected a weight in [0, 1], got {self.fixed_lambda}")
        if self.temperature <= 0:
            raise ValueError(
                f"temperature: expected a positive number (1 = plain sigmoid, 0.2 = PicoSAM3), got {self.temperature}"
            )
        if self.area_weight < 0 or self.area_min_ratio < 0:
            raise ValueError(
                f"area_weight, area_min_ratio: expected numbers >= 0, got {self.area_weight}, {self.area_min_ratio}"
            )

    @property
    def needs_teacher(self) -> bool:
        return not (self.lambda_mode == "fixed" and self.fixed_lambda == 0.0)

    def __call__(
        self,
        logits: Tensor,
        gt: Tensor,
        teacher_logits: Tensor | None = None,
        confidence: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss for one batch.

        Args:
            logits: student logits (B, 1, H, W), float.
            gt: ground-truth mask (B, 1, H, W), float in {0, 1}.
            teacher_logits: teacher logits (B, 1, H, W); may be None when :attr:`needs_teacher` is False.
            confidence: teacher confidence (B,) in [0, 1] (values outside are clamped); confidence modes only.

        Returns:
            ``(total, terms)``: the scalar loss to backpropagate, and detached batch means
            ``{"teacher", "gt", "area", "lambda"}`` for logging (0-d tensors; no host sync here).
        """
        t = self.temperature
        gt = gt.to(logits.dtype)
        l_gt = bce_dice_loss(logits, gt, temperature=t, reduction="none")
        area = area_loss(logits, gt, min_ratio=self.area_min_ratio, temperature=t, reduction="none")
        if self.needs_teacher:
            if teacher_logits is None:
                raise ValueError(
                    "teacher_logits is None but the loss weights the teacher term (lambda_mode/fixed_lambda)"
                )
            lam = teacher_weight(
                confidence,
                mode=self.lambda_mode,
                fixed_lambda=self.fixed_lambda,
                batch_size=logits.shape[0],
                device=logits.device,
            )
            l_teacher = mse_dice_loss(logits, teacher_logits.to(logits.dtype), temperature=t, reduction="none")
            per_sample = lam * l_teacher + (1 - lam) * l_gt
        else:  # supervised baseline: exactly the ground-truth loss, no teacher read
            lam = torch.zeros_like(l_gt)
            l_teacher = torch.zeros_like(l_gt)
            per_sample = l_gt
        if self.area_weight:
            per_sample = per_sample + self.area_weight * area
        terms = {"teacher": l_teacher.mean(), "gt": l_gt.mean(), "area": area.mean(), "lambda": lam.mean()}
        return per_sample.mean(), {k: v.detach() for k, v in terms.items()}


# Both papers' training losses (their validation loss is lambda_mode="fixed", fixed_lambda=0.5).
PRESETS: dict[str, dict[str, object]] = {
    "picosam2": {"lambda_mode": "confidence_batch_mean", "temperature": 1.0, "area_weight": 0.0},
    "picosam3": {"lambda_mode": "confidence_batch_mean", "temperature": 0.2, "area_weight": 0.4, "area_min_ratio": 0.4},
}
