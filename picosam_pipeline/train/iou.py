"""The papers' per-sample IoU in the crop frame, shared by the trainer's validation and the evaluate phase.

It lives in ``train/`` because training validates with it and imports only downward (``data``, ``teacher``);
``evaluate/crop_metrics.py`` builds the papers' mIoU and success "mAP" on top of it. numpy only: ``pred`` and ``gt``
may be numpy arrays or torch tensors on any device.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy array or a torch tensor (any device), without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _flat(x: Any, name: str) -> np.ndarray:
    arr = to_numpy(x)
    if arr.ndim < 2:
        raise ValueError(f"{name}: expected a batch of shape (N, ...), got shape {arr.shape}")
    return arr.reshape(arr.shape[0], -1)


def crop_ious(pred: Any, gt: Any) -> np.ndarray:
    """Per-sample IoU in the crop frame, as the papers compute it.

    Args:
        pred: ``(N, S, S)`` or ``(N, 1, S, S)`` numpy/torch. Either logits (float, foreground = logit > 0 =
            sigmoid > 0.5) or a binary {0, 1}/bool mask (foreground = 1). Do not pass probabilities, because
            0.3 > 0 would count as foreground.
        gt: same shape, binary GT crops (uint8/bool/float {0, 1}); foreground = ``> 0.5``.

    Returns:
        ``(N,)`` float64 IoU in [0, 1]; 1.0 where prediction and GT are both empty.
    """
    p = _flat(pred, "pred") > 0
    g = _flat(gt, "gt") > 0.5
    if p.shape != g.shape:
        raise ValueError(f"pred and gt shapes differ: {p.shape} vs {g.shape} (flattened)")
    inter = np.count_nonzero(p & g, axis=1)
    union = np.count_nonzero(p | g, axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def gt_nonempty(gt: Any) -> np.ndarray:
    """``(N,)`` bool: which GT crops (``(N, ...)``, foreground ``> 0.5``) have any foreground pixel."""
    return (_flat(gt, "gt") > 0.5).any(axis=1)
