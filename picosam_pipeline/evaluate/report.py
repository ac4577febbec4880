"""The qualitative report: a PNG grid of crops with GT, teacher and student masks and each one's IoU.

:class:`GridPool` watches the evaluation pass sample by sample and keeps a bounded, deterministic selection
that spans the student's IoU range (a few per IoU bin), so the grid shows failures next to successes
instead of whichever samples happened to come first. :func:`draw_grid` renders the chosen samples with
matplotlib (Agg, no display needed): one row per sample, columns crop / GT / teacher / student float /
student int8, every mask drawn over its crop with the crop-frame IoU against GT in the cell title.

In a model's cell the pixels it got right (true positives) are green, its false positives magenta and its false
negatives (GT it missed) blue: tinted inside, drawn solid on their outline, so they stay visible on any background.
The prompt the crop was made from (``sample["prompt"]``: the PicoSAM2 point or the PicoSAM3 COCO box, image pixels)
is marked on every cell, black under white, so one can tell which object was asked for in a crowded crop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Column order of the grid: (model key in a sample's logits, column title).
MODEL_COLUMNS = (("teacher", "teacher"), ("student", "student float"), ("student_int8", "student int8"))
TP_COLOUR = np.array([40, 200, 60], dtype=np.float32)  # right (and the GT column): green
FP_COLOUR = np.array([255, 0, 220], dtype=np.float32)  # false positive: magenta
FN_COLOUR = np.array([30, 110, 255], dtype=np.float32)  # false negative, GT missed: blue
LEGEND = "green: right, magenta: false positive, blue: missed (false negative); + or box: the prompt"


class GridPool:
    """Keeps up to ``n`` samples per student-IoU bin in one pass; :meth:`pick` chooses ``n`` spread over the bins.

    A sample is what ``score_table.evaluate_batches`` hands its ``on_sample`` callback: ``image`` ``(S, S, 3)``
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


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (or on the crop's edge); ``(S, S)`` bool."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _tinted(image: np.ndarray, *layers: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The crop with each ``(mask, colour)`` layer blended 60 % towards its colour inside and solid on its outline."""
    out = image.astype(np.float32)
    for mask, colour in layers:
        out[mask] = 0.4 * out[mask] + 0.6 * colour
        out[_outline(mask)] = colour
    return out.round().astype(np.uint8)


def errors_overlay(image: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """``image`` with true positives, false positives and false negatives of ``pred`` against ``gt`` coloured apart."""
    return _tinted(image, (pred & gt, TP_COLOUR), (pred & ~gt, FP_COLOUR), (~pred & gt, FN_COLOUR))


def crop_prompt(
    prompt: tuple[str, tuple[float, ...]], crop_box: Sequence[int], size: int
) -> tuple[str, tuple[float, ...]]:
    """A prompt in image pixels mapped into the ``size``-px crop of ``crop_box`` (matplotlib's pixel-centre frame).

    ``("point", (x, y))`` -> ``("point", (u, v))``; ``("box", (x, y, w, h))`` -> ``("box", (u, v, w', h'))``, with the
    crop's resampling convention: image pixel ``i`` covers ``[i, i + 1)``, crop pixel ``u`` is centred at ``u``.
    """
    kind, values = prompt
    x1, y1, x2, y2 = crop_box
    sx, sy = size / max(x2 - x1, 1), size / max(y2 - y1, 1)
    if kind == "point":
        x, y = values
        return "point", ((x + 0.5 - x1) * sx - 0.5, (y + 0.5 - y1) * sy - 0.5)
    x, y, w, h = values
    return "box", ((x - x1) * sx - 0.5, (y - y1) * sy - 0.5, w * sx, h * sy)


def _mark_prompt(ax, prompt: tuple[str, tuple[float, ...]]) -> None:
    """Draw a crop-frame prompt: black under white, visible on light and dark crops."""
    from matplotlib.patches import Rectangle

    kind, values = prompt
    if kind == "point":
        ax.plot([values[0]], [values[1]], marker="+", markersize=11, markeredgewidth=3.2, color="black")
        ax.plot([values[0]], [values[1]], marker="+", markersize=9, markeredgewidth=1.4, color="white")
    else:
        x, y, w, h = values
        for colour, width in (("black", 2.6), ("white", 1.0)):
            ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=width))


def draw_grid(
    samples: Sequence[Mapping[str, Any]], path: str | Path, *, title: str, int8_missing_reason: str | None = None
) -> Path:
    """Render ``samples`` (from :meth:`GridPool.pick`) as a PNG grid at ``path``.

    Columns: crop, GT, then each model of :data:`MODEL_COLUMNS` present in the samples. The int8 column is
    left out when no sample has int8 logits; ``int8_missing_reason`` then goes into the figure title so a
    reader knows the column was skipped, not forgotten. ``title`` may hold several lines (the evaluate stage's
    first line is the provenance: teacher and weights, dataset, recipe); four lines fit.
    """
    import matplotlib

    matplotlib.use("Agg")  # file output only; never try to open a window
    import matplotlib.pyplot as plt

    present = set().union(*(s["logits"] for s in samples)) if samples else set()
    models = [(key, label) for key, label in MODEL_COLUMNS if key in present]
    # Several teachers (teacher_<NAME>, score_table.teacher_models): one column each, before the students.
    models = [(key, key.replace("_", " ", 1)) for key in sorted(present) if key.startswith("teacher_")] + models
    columns = 2 + len(models)
    rows = max(len(samples), 1)
    fig, axes = plt.subplots(rows, columns, figsize=(max(1.9 * columns, 6.4), 2.35 * rows + 0.7), squeeze=False)
    for r, sample in enumerate(samples):
        image, gt = sample["image"], sample["gt"]
        cells = [(image, f"{sample['category']}\nann {sample['ann_id']}"), (_tinted(image, (gt, TP_COLOUR)), "GT")]
        for key, label in models:
            if key in sample["logits"]:
                cells.append(
                    (errors_overlay(image, sample["logits"][key] > 0, gt), f"{label}\nIoU {sample['iou'][key]:.3f}")
                )
            else:
                cells.append((np.zeros_like(image), f"{label}\n(none)"))
        prompt = sample.get("prompt")
        if prompt is not None and sample.get("crop_box") is not None:
            prompt = crop_prompt(prompt, sample["crop_box"], image.shape[0])
        for c, (pixels, label) in enumerate(cells):
            ax = axes[r, c]
            ax.imshow(pixels, interpolation="nearest")
            if prompt is not None:
                _mark_prompt(ax, prompt)
                ax.set_xlim(-0.5, image.shape[1] - 0.5)  # a box reaching past the crop does not rescale the cell
                ax.set_ylim(image.shape[0] - 0.5, -0.5)
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    if not samples:
        axes[0, 0].text(0.5, 0.5, "no samples", ha="center", va="center")
        for ax in axes.ravel():
            ax.axis("off")
    if "student_int8" not in present and int8_missing_reason:
        title = f"{title}\n(no int8 column: {int8_missing_reason})"
    fig.suptitle(f"{title}\n{LEGEND}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / fig.get_figheight()))  # keep 0.7 inch for the title lines (4 fit)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
