"""Prediction files: image-frame COCO results (what COCO tools score) and crop-frame files (the papers' frame).

Two files per set of predictions, so that neither can be mistaken for the other:

* **image frame** (``write_image_predictions``, e.g. ``predictions.json``): a plain COCO results list, one entry
  per prompt ``{"image_id", "category_id", "segmentation": RLE of the full (H, W) image, "score", "id",
  "annotation_id"}``: the crop mask resized NEAREST into its crop box and pasted into the image, with the
  annotation's real category. ``pycocotools`` ``loadRes`` + ``COCOeval('segm')`` score it meaningfully.
* **crop frame** (``write_crop_predictions``, ``crop_predictions_path``: ``predictions.crop.json``): a JSON
  object ``{"schema": CROP_SCHEMA, "crop_size": S, "predictions": [...]}`` whose entries hold ``(S, S)`` RLE
  masks in the student's crop frame. It is not a COCO results list, so COCO tools refuse it instead of printing
  AP 0.000 everywhere. The PicoSAM2 reference files are crop-frame *lists*; :func:`read_predictions` still reads
  them (``frame="auto"`` tells them apart by mask size).

Alignment (both frames): the k-th prediction of an image belongs to the k-th non-crowd annotation of that image in
JSON order; ``annotation_id``, when written, is checked against it.

:func:`read_predictions` checks every entry before anything is decoded: a non-integer image id, an image the
annotations do not have, a score that is missing or not a finite number, a mask of the wrong size, RLE counts that
are garbage or do not add up to the mask size, duplicate result or annotation ids. Each kind of problem is counted
with examples (:class:`PredictionProblems`); the scorer refuses the file unless partial scoring was asked for, and
then skips every image with a problem.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from picosam_pipeline.data.crops import CropBox
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.evaluate.crop_metrics import paste_crop
from picosam_pipeline.outputs import atomic_write_bytes
from picosam_pipeline.train.iou import to_numpy

CROP_SCHEMA = "picosam-crop-predictions/1"
Frame = Literal["crop", "image"]
FRAMES = ("auto", "crop", "image")

# What each problem kind means, in the words of the error message.
PROBLEM_TEXT = {
    "malformed": "entries that are not {image_id, segmentation: {size, counts}} objects",
    "non_integer_image_id": "entries whose image_id is not an integer",
    "unknown_image": "entries for images that are not in the annotations",
    "bad_score": "entries whose score is missing or not a finite number (NaN, Infinity, true/false, a string)",
    "wrong_size": "entries whose mask size is neither the crop size nor the image's size",
    "bad_counts": "entries whose RLE counts are garbage or do not add up to the mask size",
    "duplicate_id": "entries whose result id repeats an earlier entry's",
    "duplicate_annotation_id": "entries whose annotation_id repeats an earlier entry's",
    "missing_image_file": "entries for images whose file is missing from the image folder",
    "count_mismatch": "images whose number of predictions differs from their number of non-crowd annotations",
    "annotation_mismatch": "entries whose annotation_id is not the annotation at their position",
}


@dataclass(frozen=True)
class CropPrediction:
    """One prediction in the crop frame, the unit of both files.

    ``logits``: ``(S, S)`` or ``(1, S, S)`` numpy/torch; float logits (foreground = logit > 0) or a bool/int mask.
    ``category_id``: the annotation's category (the PicoSAM2 reference files write 1; the scorer reads categories
    from the GT). ``annotation_id``, when set, is written and checked by the scorer. ``crop_box`` (``x1, y1, x2,
    y2`` image pixels) and ``image_size`` ``(H, W)`` place the mask in the image: the image-frame file needs them.
    """

    image_id: int
    logits: Any
    score: float
    category_id: int = 1
    annotation_id: int | None = None
    crop_box: tuple[int, int, int, int] | None = None
    image_size: tuple[int, int] | None = None

    def mask(self) -> np.ndarray:
        """``(S, S)`` bool crop mask (logit > 0, or the given mask's non-zero pixels)."""
        arr = to_numpy(self.logits)
        return arr.reshape(arr.shape[-2:]) > 0


def crop_predictions_path(path: str | Path) -> Path:
    """The crop-frame file beside an image-frame file: ``predictions.json`` -> ``predictions.crop.json``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.crop{path.suffix or '.json'}")


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE ``{"size": [H, W], "counts": str}`` of a 2-D mask (non-zero = foreground)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask) > 0, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def encode_crop_mask(pred: Any) -> dict[str, Any]:
    """COCO compressed RLE of ``pred > 0`` (``(S, S)`` or ``(1, S, S)``)."""
    arr = to_numpy(pred)
    return encode_mask(arr.reshape(arr.shape[-2:]) > 0)


def _atomic_json(value: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, json.dumps(value).encode())  # an interrupted run leaves no half-written file


def _entry(k: int, rec: CropPrediction, segmentation: dict[str, Any]) -> dict[str, Any]:
    entry = {
        "image_id": int(rec.image_id),
        "category_id": int(rec.category_id),
        "segmentation": segmentation,
        "score": float(rec.score),
        "id": k,
    }
    if rec.annotation_id is not None:
        entry["annotation_id"] = int(rec.annotation_id)
    return entry


def write_crop_predictions(records: Iterable[CropPrediction], path: str | Path) -> int:
    """The crop-frame file (schema-marked object, see the module docstring); returns the number of entries.

    Records must come in scoring order: within an image, one per non-crowd annotation, in annotation JSON order.
    """
    entries = [_entry(k, rec, encode_crop_mask(rec.logits)) for k, rec in enumerate(records)]
    sizes = {tuple(e["segmentation"]["size"]) for e in entries}
    if len(sizes) > 1:
        raise ValueError(f"crop predictions of several sizes {sorted(sizes)}; one file holds one crop size")
    crop_size = sizes.pop()[0] if sizes else None
    _atomic_json({"schema": CROP_SCHEMA, "crop_size": crop_size, "predictions": entries}, path)
    return len(entries)


def write_image_predictions(records: Iterable[CropPrediction], path: str | Path) -> int:
    """The image-frame COCO results list (crop mask NEAREST-resized into its box); returns the number of entries."""
    entries = []
    for k, rec in enumerate(records):
        if rec.crop_box is None or rec.image_size is None:
            raise ValueError(
                f"prediction {k} (image {rec.image_id}) has no crop_box / image_size: an image-frame "
                "file needs both to paste the crop mask into the image"
            )
        full = paste_crop(rec.mask(), CropBox(*(int(v) for v in rec.crop_box)), tuple(int(v) for v in rec.image_size))
        entries.append(_entry(k, rec, encode_mask(full)))
    _atomic_json(entries, path)
    return len(entries)


def write_predictions(records: Iterable[CropPrediction], path: str | Path) -> dict[str, Path]:
    """Both files: image frame at ``path``, crop frame at :func:`crop_predictions_path`; returns their paths."""
    records = list(records)
    crop = crop_predictions_path(path)
    write_image_predictions(records, path)
    write_crop_predictions(records, crop)
    return {"image": Path(path), "crop": crop}


# --------------------------------------------------------------------------------------------------
# reading and checking


def rle_counts(counts: Any) -> list[int] | None:
    """The run lengths of an RLE ``counts`` (a list of ints, or COCO's compressed string); None if garbage.

    The string decoder is pycocotools' ``rleFrString`` in Python, so that garbage is found here instead of
    inside pycocotools' C code (which reads it without bounds).
    """
    if isinstance(counts, list):
        ok = all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
        return counts if ok else None
    if not isinstance(counts, str):
        return None
    out: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                return None  # a value cut off in the middle
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                return None  # outside the encoding's alphabet
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        if x < 0:
            return None
        out.append(x)
    return out


@dataclass
class PredictionProblems:
    """Problem kind -> count and the first few examples (``"entry 4 (image 12)"``)."""

    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    bad_images: set[int] = field(default_factory=set)  # images that partial scoring skips

    def add(self, kind: str, example: str, image_id: int | None = None) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < 3:
            self.examples[kind].append(example)
        if image_id is not None:
            self.bad_images.add(image_id)

    def __bool__(self) -> bool:
        return bool(self.counts)

    def describe(self) -> str:
        return "; ".join(f"{n} {PROBLEM_TEXT[k]} (e.g. {', '.join(self.examples[k])})" for k, n in self.counts.items())


@dataclass
class PredictionFile:
    """A checked predictions file: its frame, crop size, the valid entries per image (file order) and problems."""

    path: Path
    frame: Frame
    crop_size: int
    entries: int  # entries in the file
    by_image: dict[int, list[dict]]
    problems: PredictionProblems


def _load_entries(path: Path, crop_size: int) -> tuple[list, Frame | None, int]:
    if not path.is_file():
        raise PipelineError(
            f"predictions file {path} does not exist; pass a COCO results JSON (image frame) or a "
            "crop-frame predictions file (what evaluate.write_predictions writes)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise PipelineError(
            f"predictions file {path} is not valid JSON ({type(err).__name__}); it must be a COCO "
            "results list or a crop-frame predictions file"
        ) from None
    if isinstance(data, dict):
        if data.get("schema") != CROP_SCHEMA or not isinstance(data.get("predictions"), list):
            raise PipelineError(
                f"predictions file {path} is a JSON object without schema {CROP_SCHEMA!r} and a "
                "predictions list; pass a COCO results list or a crop-frame file written by evaluate"
            )
        size = data.get("crop_size")
        return data["predictions"], "crop", int(size) if isinstance(size, int) and size > 0 else crop_size
    if not isinstance(data, list):
        raise PipelineError(f"predictions file {path}: expected a JSON list of results, got {type(data).__name__}")
    return data, None, crop_size


def read_predictions(
    path: str | Path, images: dict[int, tuple[int, int]], *, frame: str = "auto", crop_size: int = 96
) -> PredictionFile:
    """Read and check a predictions file against the annotated images ``{image_id: (H, W)}``.

    ``frame``: ``crop``, ``image`` or ``auto`` (a schema-marked file is crop frame; a list is crop frame when its
    masks are ``crop_size`` squares and image frame when they have their images' sizes). Valid entries are kept
    per image in file order; every problem is counted in ``problems`` (nothing raised for them here).
    """
    if frame not in FRAMES:
        raise PipelineError(f"unknown prediction frame {frame!r}; use one of {', '.join(FRAMES)}")
    path = Path(path)
    entries, marked, crop_size = _load_entries(path, crop_size)
    if not entries:
        raise PipelineError(
            f"predictions file {path} holds no prediction (an empty list); nothing can be scored. "
            "Check that the predictions were written for the annotations given"
        )
    problems = PredictionProblems()
    checked: list[tuple[int, dict, list[int]]] = []  # (image_id, entry, size) of entries with a sound id and RLE
    seen_ids: set = set()
    seen_anns: set = set()
    votes = {"crop": 0, "image": 0}
    for i, entry in enumerate(entries):
        seg = entry.get("segmentation") if isinstance(entry, dict) else None
        if not isinstance(seg, dict) or "image_id" not in entry or "size" not in seg or "counts" not in seg:
            problems.add("malformed", f"entry {i}: {str(entry)[:60]}")
            continue
        image_id = entry["image_id"]
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            problems.add("non_integer_image_id", f"entry {i}: {str(image_id)[:30]!r}")
            continue
        where = f"entry {i} (image {image_id})"
        for key, seen, kind in (
            ("id", seen_ids, "duplicate_id"),
            ("annotation_id", seen_anns, "duplicate_annotation_id"),
        ):
            if key in entry:
                value = json.dumps(entry[key])
                if value in seen:
                    problems.add(kind, f"{where}: {key} {value[:20]}", image_id)
                seen.add(value)
        if image_id not in images:
            problems.add("unknown_image", where)
            continue
        size = seg["size"]
        if (
            not isinstance(size, list)
            or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**31 for v in size)
        ):
            problems.add("wrong_size", f"{where}: size {str(size)[:30]}", image_id)
            continue
        counts = rle_counts(seg["counts"])
        if counts is None or sum(counts) != size[0] * size[1]:
            detail = "garbage" if counts is None else f"sum {sum(counts)} for {size[0]}x{size[1]} = {size[0] * size[1]}"
            problems.add("bad_counts", f"{where}: {detail}", image_id)
            continue
        if not _finite_score(entry):  # the entry still holds its place in the image's alignment
            score = json.dumps(entry["score"]) if "score" in entry else "missing"
            problems.add("bad_score", f"{where}: score {score[:30]}", image_id)
        if size == [crop_size, crop_size] and tuple(images[image_id]) != (crop_size, crop_size):
            votes["crop"] += 1
        elif tuple(size) == tuple(images[image_id]):
            votes["image"] += 1
        checked.append((image_id, entry, size))
    chosen: Frame = marked or (frame if frame != "auto" else ("crop" if votes["crop"] > votes["image"] else "image"))
    by_image: dict[int, list[dict]] = {}
    for image_id, entry, size in checked:
        want = [crop_size, crop_size] if chosen == "crop" else list(images[image_id])
        if size != want:
            problems.add("wrong_size", f"image {image_id}: size {size}, expected {want} ({chosen} frame)", image_id)
            continue
        by_image.setdefault(image_id, []).append(entry)
    return PredictionFile(path, chosen, crop_size, len(entries), by_image, problems)


def _finite_score(entry: dict) -> bool:
    """The entry's ``score`` is a finite number, not a bool. Python's json reads the literals NaN and Infinity as
    floats, and COCOeval ranks the masks by score: with NaN among them the AP it prints means nothing."""
    score = entry.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        return False
    try:
        return math.isfinite(score)
    except OverflowError:  # an integer too large for a float
        return False


def decode_masks(entries: list[dict]) -> np.ndarray:
    """``(N, H, W)`` bool masks of checked entries of one size (RLE decoded with pycocotools)."""
    from pycocotools import mask as mask_utils

    rles = []
    for entry in entries:
        seg = entry["segmentation"]
        h, w = seg["size"]
        # Uncompressed RLE (a list of counts) is converted first; compressed strings decode directly.
        rles.append(mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg)
    return np.moveaxis(mask_utils.decode(rles), -1, 0) > 0
