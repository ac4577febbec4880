"""The qualitative report: a PNG grid of crops with GT, teacher and student masks and each one's IoU.

:class:`GridPool` watches the evaluation pass sample by sample and keeps a bounded, deterministic selection
that spans the student's IoU range (a few per IoU bin), so the grid shows failures next to successes
instead of whichever samples happened to come first. :func:`draw_grid` renders the chosen samples with
matplotlib (Agg, no display needed): one row per sample, columns crop / GT / teacher / student float /
student int8, every mask drawn over its crop with the crop-frame IoU against GT in the cell title.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Column order of the grid: (model key in a sample's logits, column title).
MODEL_COLUMNS = (("teacher", "teacher"), ("student", "student float"), ("student_int8", "student int8"))
MASK_COLOUR = np.array([255, 40, 40], dtype=np.float32)  # predictions: red
GT_COLOUR = np.array([40, 200, 60], dtype=np.float32)  # ground truth: green


class GridPool:
    """Keeps up to ``n`` samples per student-IoU bin in one pass; :meth:`pick` chooses ``n`` spread over the bins.

    A sample is what ``metrics.evaluate_batches`` hands its ``on_sample`` callback: ``image`` ``(S, S, 3)``
    uint8, ``gt`` ``(S, S)`` bool, ``logits`` ``{model: (S, S)}``, ``iou`` ``{model: float}``, ``ann_id``,
    ``category``. Memory stays at most ``bins * n`` samples whatever the dataset size.
    """

    def __init__(self, n: int, key: str = "student", bins: int = 10) -> None:
        self.n, self.key, self.bins = n, key, bins
        self._bins: list[list[dict[str, Any]]] = [[] for _ in range(bins)]
        self.seen = 0

    def offer(self, sample: Mapping[str, Any]) -> None:
        self.seen += 1
        iou = sample["iou"].get(self.key)
        if iou is None or self.n == 0:
            return
        slot = self._bins[min(int(iou * self.bins), self.bins - 1)]
        if len(slot) < self.n:  # the first n of each bin: deterministic for a deterministic loader order
            slot.append({**sample, "logits": {m: np.array(v, dtype=np.float32) for m, v in sample["logits"].items()}})

    def pick(self) -> list[dict[str, Any]]:
        """``n`` samples spread over the IoU bins (evenly spaced bins first, then deeper into each), best IoU first."""
        chosen: list[dict[str, Any]] = []
        for depth in range(self.n):
            candidates = [b[depth] for b in self._bins if depth < len(b)]
            need = self.n - len(chosen)
            if not candidates or need == 0:
                break
            if len(candidates) > need:  # evenly spaced over the populated bins, so both ends are shown
                candidates = [candidates[i] for i in np.linspace(0, len(candidates) - 1, need).round().astype(int)]
            chosen += candidates
        return sorted(chosen, key=lambda s: -s["iou"][self.key])


def _tinted(image: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """The crop with ``mask`` pixels blended half-way towards ``colour``; ``(S, S, 3)`` uint8."""
    out = image.astype(np.float32)
    out[mask] = 0.45 * out[mask] + 0.55 * colour
    return out.round().astype(np.uint8)


def draw_grid(samples: Sequence[Mapping[str, Any]], path: str | Path, *, title: str,
              int8_missing_reason: str | None = None) -> Path:
    """Render ``samples`` (from :meth:`GridPool.pick`) as a PNG grid at ``path``.

    Columns: crop, GT, then each model of :data:`MODEL_COLUMNS` present in the samples. The int8 column is
    left out when no sample has int8 logits; ``int8_missing_reason`` then goes into the figure title so a
    reader knows the column was skipped, not forgotten.
    """
    import matplotlib

    matplotlib.use("Agg")  # file output only; never try to open a window
    import matplotlib.pyplot as plt

    present = set().union(*(s["logits"] for s in samples)) if samples else set()
    models = [(key, label) for key, label in MODEL_COLUMNS if key in present]
    # Several teachers (teacher_<NAME>, metrics.teacher_models): one column each, before the students.
    models = [(key, key.replace("_", " ", 1)) for key in sorted(present) if key.startswith("teacher_")] + models
    columns = 2 + len(models)
    rows = max(len(samples), 1)
    fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.15 * rows + 0.5), squeeze=False)
    for r, sample in enumerate(samples):
        image, gt = sample["image"], sample["gt"]
        cells = [(image, f"{sample['category']}\nann {sample['ann_id']}"), (_tinted(image, gt, GT_COLOUR), "GT")]
        for key, label in models:
            if key in sample["logits"]:
                cells.append((_tinted(image, sample["logits"][key] > 0, MASK_COLOUR), f"{label}\nIoU {sample['iou'][key]:.3f}"))
            else:
                cells.append((np.zeros_like(image), f"{label}\n(none)"))
        for c, (pixels, label) in enumerate(cells):
            ax = axes[r, c]
            ax.imshow(pixels, interpolation="nearest")
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    if not samples:
        axes[0, 0].text(0.5, 0.5, "no samples", ha="center", va="center")
        for ax in axes.ravel():
            ax.axis("off")
    if "student_int8" not in present and int8_missing_reason:
        title = f"{title}\n(no int8 column: {int8_missing_reason})"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))  # keep 0.5 inch for the two-line title
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
