"""The distillation target: one teacher's logits, or a combination of every teacher packed in the shards.

PicoSAM3 distils from SAM2 and SAM3. The shards carry each teacher's logits and confidence (``shards.py``);
``train.target`` chooses what the loss sees. Input, per batch (``loader.py``)::

    teacher_logits  float32 (B, K, S, S)  one channel per teacher, in the shards' order (``ShardLoader.teachers``)
    confidence      float32 (B, K)        each teacher's confidence in [0, 1] (SAM2: predicted IoU; SAM3: score)

Output: ``logits (B, 1, S, S)`` and ``confidence (B,)``, what :class:`~picosam_pipeline.train.losses.DistillationLoss`
takes; the papers' confidence rule (``train.lambda_mode``: lambda = the batch mean of the confidence) then
weighs the target against the ground truth exactly as with one teacher.

============  ==========================================================  ==================================
rule          logits                                                      confidence
============  ==========================================================  ==================================
NAME          teacher NAME's channel, unchanged                           teacher NAME's
``mean``      logit of the mean probability, ``logit(mean_k sigmoid(l_k))``  mean over the teachers
``confident`` per pixel, the channel farthest from 0 (``argmax_k |l_k|``:    mean over the teachers
              the teacher most sure of that pixel; ties: the first)
``weighted``  ``logit(sum_k w_k sigmoid(l_k))``, ``w`` normalised to sum 1    ``sum_k w_k c_k``
============  ==========================================================  ==================================

Probabilities are clamped to ``[1e-7, 1 - 1e-7]`` before ``logit``, so combined logits lie in about +-16.1 (the
range PicoSAM3 stores SAM3's probabilities in); a single teacher's logits pass through untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from picosam_pipeline.errors import PipelineError

PROB_EPS = 1e-7
RULES = ("mean", "confident", "weighted")


@dataclass(frozen=True)
class TeacherTarget:
    """A resolved ``train.target`` for shards packed with ``teachers`` (see the module doc)."""

    rule: str  # "single" | "mean" | "confident" | "weighted"
    teachers: tuple[str, ...]  # the shards' teachers, in channel order
    weights: tuple[float, ...]  # per channel: one-hot for single, 1/K for mean / confident, normalised for weighted

    def describe(self) -> str:
        if self.rule == "single":
            return self.teachers[self.weights.index(1.0)]
        parts = ", ".join(f"{t} {w:.3g}" for t, w in zip(self.teachers, self.weights))
        return f"{self.rule} of {parts}" if self.rule == "weighted" else f"{self.rule} of {', '.join(self.teachers)}"

    def __call__(self, logits: Tensor, confidence: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, K, S, S)``, ``(B, K)`` -> target logits ``(B, 1, S, S)`` and confidence ``(B,)``, same dtype/device."""
        if logits.shape[1] != len(self.teachers) or confidence.shape[1:] != (len(self.teachers),):
            raise ValueError(
                f"expected {len(self.teachers)} teacher channels ({self.teachers}), got logits "
                f"{tuple(logits.shape)} and confidence {tuple(confidence.shape)}"
            )
        if self.rule == "single":
            k = self.weights.index(1.0)
            return logits[:, k : k + 1], confidence[:, k]
        w = torch.tensor(self.weights, dtype=logits.dtype, device=logits.device)
        if self.rule == "confident":
            pick = logits.abs().argmax(dim=1, keepdim=True)  # (B, 1, S, S): the most certain teacher per pixel
            return logits.gather(1, pick), confidence.mean(dim=1)
        prob = (torch.sigmoid(logits) * w[None, :, None, None]).sum(dim=1, keepdim=True)  # mean: w = 1/K
        return torch.logit(prob.clamp(PROB_EPS, 1 - PROB_EPS)), (confidence * w).sum(dim=1)


def resolve_target(target: str, weights: Mapping[str, float], teachers: Sequence[str]) -> TeacherTarget:
    """``train.target`` / ``train.target_weights`` for shards packed with ``teachers``; PipelineError names the fix."""
    teachers = tuple(teachers)
    packed = ", ".join(teachers)
    if target == "auto":
        if len(teachers) != 1:
            raise PipelineError(
                f"train.target: auto needs shards of one teacher; these hold {packed}: set train.target to "
                "one of them, or to mean, confident or weighted (with train.target_weights)"
            )
        target = teachers[0]
    if target in RULES:
        if target == "weighted":
            unknown = sorted(set(weights) - set(teachers))
            missing = [t for t in teachers if t not in weights]
            if unknown or missing:
                raise PipelineError(
                    f"train.target_weights: {weights} must give a weight to every teacher in the shards "
                    f"({packed}) and to no other (unknown {unknown}, missing {missing})"
                )
            total = sum(weights[t] for t in teachers)
            return TeacherTarget("weighted", teachers, tuple(weights[t] / total for t in teachers))
        return TeacherTarget(target, teachers, (1.0 / len(teachers),) * len(teachers))
    if target not in teachers:
        raise PipelineError(
            f"train.target: the shards hold no teacher {target!r} (they hold {packed}); set pack.teachers "
            f"to include it and rerun pack, or choose one of {packed}"
        )
    return TeacherTarget("single", teachers, tuple(1.0 if t == target else 0.0 for t in teachers))
