"""COCO / LVIS instance annotations: loading, format detection and per-annotation checks.

:func:`load_annotations` parses one instances JSON (malformed JSON stops with file, line and column),
detects COCO or LVIS (and the LVIS version), sets aside records that cannot be indexed (duplicate
ids, annotations whose image id is not in ``images``) and keeps, per image, where each annotation's JSON text
lies in the file (:mod:`instances_json`); the text is read back and parsed when asked for, so a COCO-size
file is never held in memory, as text or as Python objects (~3 KB an annotation).
:func:`check_annotation` then validates one annotation against its image and decodes its mask with
pycocotools (polygons and RLE alike) into a full-image ``(H, W)`` uint8 {0, 1} mask.

Every problem is an :class:`Issue`: either a *conversion* (the annotation is repaired and kept, e.g. a
bbox clipped to the image) or a *drop*. Drops of bad input stop the prepare stage in strict mode;
drops by selection (crowd) never do.

Hostile files are reported, never crashed on nor kept silently: ids must fit a signed 64-bit integer (the
index stores them as int64); an image id listed twice with different records is ambiguous and its
annotations are dropped; ``file_name`` must name a file inside the split's images folder (no absolute path,
no ``..``) unless ``allow_outside_images``; image sizes are bounded by PIL's decompression-bomb limit;
``iscrowd`` must be 0 or 1; polygon vertices must lie within one image size of the image before pycocotools
rasterises them (a vertex at 5e8 crashes its C code); compressed RLE counts must be what pycocotools itself
writes for the mask they decode to; a file nested too deep for the JSON parser is a clear error.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from picosam_pipeline.data.instances_json import ANNOTATIONS_SAMPLED, AnnotationSpans, read_instances
from picosam_pipeline.data.instances_json import is_int64 as _is_id
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.untrusted import UntrustedInputError, open_regular

# LVIS versions differ in their category list (and ids): v0.5 has 1230 categories, v1 has 1203.
LVIS_VERSIONS = {1203: "v1", 1230: "v0.5"}
# The largest image area accepted: what PIL decodes before refusing a file as a decompression bomb. Masks are
# decoded at full size (one byte per pixel), so an absurd width/height must stop here, not in pycocotools.
MAX_IMAGE_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)


@dataclass(frozen=True)
class DatasetFormat:
    """What an annotation file is: ``coco`` or ``lvis``, and for LVIS its version (by category count)."""

    name: Literal["coco", "lvis"]
    version: str | None  # "v1" | "v0.5" | "unknown" for LVIS; None for COCO (its files carry no reliable version)
    num_categories: int

    def describe(self) -> str:
        return self.name if self.version is None else f"{self.name} {self.version}"


@dataclass(frozen=True)
class Issue:
    """One problem with an input record, and what was done about it."""

    kind: str  # short key counted in metrics, e.g. "degenerate_bbox", "bbox_clipped", "crowd"
    reason: str  # one human sentence naming the offending value
    action: Literal["dropped", "converted"] = "dropped"
    bad_input: bool = True  # False for selection drops (crowd, no segmentation): never stops strict mode


@dataclass(frozen=True)
class ImageRecord:
    """An entry of ``images``; ``problem`` is set when the record itself is unusable."""

    image_id: int
    file_name: str  # name of the file inside the split's images folder
    width: int
    height: int
    alt_folder: str | None = None  # LVIS: the COCO folder named by coco_url (train2017 / val2017)
    problem: Issue | None = None

    def resolve_path(self, images_dir: str | Path) -> Path:
        """``images_dir/file_name``; for LVIS, the sibling COCO folder of ``coco_url`` when the first is absent.

        LVIS v1 val draws images from both COCO train2017 and val2017, so one images folder is not enough.
        """
        path = Path(images_dir) / self.file_name
        if self.alt_folder and not path.exists():
            alt = Path(images_dir).parent / self.alt_folder / self.file_name
            if alt.exists():
                return alt
        return path


@dataclass
class RecordIssue:
    """An issue found while loading, before any image is looked at."""

    issue: Issue
    ann_id: Any = None
    image_id: Any = None
    is_annotation: bool = False  # True: one annotation set aside (counted as dropped); False: an image record


@dataclass
class AnnotationSet:
    """One parsed annotation file: its images and categories, and where its kept annotations lie in the file.

    The annotations are read back from the file (kept open) and parsed when asked for, an image at a time: held
    as parsed Python objects they took ~3 KB each (measured on coco-sample's annotations), and even as their text
    the prepare stage's memory grew with the file (2.4 GB at 900k annotations, ``bench/scale.py``'s dataset).
    """

    path: Path
    format: DatasetFormat
    images: dict[int, ImageRecord]
    categories: dict[int, str]
    num_annotations: int  # every entry of ``annotations``, including the ones set aside in ``record_issues``
    record_issues: list[RecordIssue] = field(default_factory=list)
    # The kept annotations grouped by image: image ``image_ids[k]`` (sorted, int64) has the annotations at
    # ``offsets[starts[k]:starts[k + 1]]`` / ``lengths[...]`` (byte spans in the file, in file order).
    image_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    starts: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    fd: int | None = None  # the file, open read-only while the set lives (a file replaced meanwhile is not read)

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def texts_of(self, image_id: int) -> list[bytes]:
        """The JSON texts of the image's annotations, in file order (``json.loads`` parses each)."""
        k = self._position(image_id)
        if k is None:
            return []
        rows = slice(self.starts[k], self.starts[k + 1])
        texts = []
        for offset, length in zip(self.offsets[rows].tolist(), self.lengths[rows].tolist()):
            texts.append(os.pread(self.fd, length, offset))
            if len(texts[-1]) != length:
                raise PipelineError(
                    f"{self.path} was cut short while being read (the annotation at byte {offset} "
                    "is gone); something rewrote it in place. Rerun once nothing writes to it"
                )
        return texts

    def annotations_of(self, image_id: int) -> list[dict]:
        """The image's annotations in file order (the order PicoSAM2's reference predictions follow)."""
        return [json.loads(text) for text in self.texts_of(image_id)]

    def has_annotations(self, image_id: int) -> bool:
        return self._position(image_id) is not None

    def _position(self, image_id: int) -> int | None:
        k = int(np.searchsorted(self.image_ids, image_id))
        return k if k < len(self.image_ids) and self.image_ids[k] == image_id else None

    @functools.cached_property
    def coco(self) -> COCO:
        """:func:`sizes_coco` of every image (its annotation index is empty; use :meth:`annotations_of`)."""
        return sizes_coco(self.images.values())


def sizes_coco(images: Iterable[ImageRecord]) -> COCO:
    """A pycocotools :class:`COCO` that knows only the images' sizes: all ``annToRLE`` (:func:`check_annotation`)
    looks up to rasterise an annotation of one of them."""
    coco = COCO()
    coco.imgs = {im.image_id: {"id": im.image_id, "width": im.width, "height": im.height} for im in images}
    return coco


@dataclass
class CheckedAnnotation:
    """Outcome of :func:`check_annotation`: an instance, or the drop that removed it, plus conversions."""

    drop: Issue | None
    conversions: list[Issue]
    bbox: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # COCO xywh, clipped to the image
    area: float = 0.0  # COCO area (px), from the JSON, or the mask area when absent
    rle_counts: str = ""  # compressed COCO RLE of the mask, size (height, width)
    mask: np.ndarray | None = None  # (H, W) uint8 in {0, 1}
    mask_box: tuple[int, int, int, int] = (0, 0, 0, 0)  # the mask's tight pixel box (x, y, w, h), w, h >= 1

    def mask_window(self) -> tuple[np.ndarray, int, int]:
        """``(mask[y:y+h, x:x+w], x, y)``: the mask cut to its tight box, for work that need not scan the image."""
        x, y, w, h = self.mask_box
        return self.mask[y : y + h, x : x + w], x, y


# --------------------------------------------------------------------------------------------------
# loading


def load_annotations(
    path: str | Path, requested: Literal["auto", "coco", "lvis"] = "auto", allow_outside_images: bool = False
) -> AnnotationSet:
    """Parse a COCO or LVIS instances JSON and index it with pycocotools.

    ``allow_outside_images``: accept a ``file_name`` that is absolute or leaves the images folder with ``..``
    (by default such an image record is a bad input, so a hostile file cannot make the pipeline read elsewhere).

    Raises:
        PipelineError: unreadable file, malformed or too deeply nested JSON, wrong top-level layout, or a file
            whose detected format contradicts an explicit ``requested`` format.
    """
    path = Path(path)
    data, spans, fd = _read_json(path)
    try:
        return _annotation_set(path, data, spans, fd, requested, allow_outside_images)
    except BaseException:
        os.close(fd)  # the set that would own it was not made
        raise


def _annotation_set(
    path: Path, data: dict, spans: AnnotationSpans, fd: int, requested: str, allow_outside_images: bool
) -> AnnotationSet:
    fmt = detect_format(data)
    if requested != "auto" and requested != fmt.name:
        raise PipelineError(
            f"{path}: prepare.dataset_format is {requested!r} but the file looks like {fmt.describe()} "
            f"({'categories carry synset/frequency' if fmt.name == 'lvis' else 'no LVIS category fields'}); "
            f"set prepare.dataset_format=auto or {fmt.name}"
        )

    issues: list[RecordIssue] = []
    images = {}
    for img in data["images"]:
        record = _image_record(img, fmt, allow_outside_images)
        if record is None:
            issues.append(
                RecordIssue(
                    Issue(
                        "bad_image_record",
                        f"image record without an integer id (ids must fit a signed 64-bit integer): {_short(img)}",
                    )
                )
            )
        elif record.image_id in images:
            first = images[record.image_id]
            if _same_image(first, record):
                issue = Issue("duplicate_image_id", f"image id {record.image_id} appears twice; the first is kept")
                issues.append(RecordIssue(issue, image_id=record.image_id))
            elif first.problem is None or first.problem.kind != "duplicate_image_id":
                # Two different images under one id: which one an annotation belongs to cannot be told, so the id's
                # annotations are dropped (reported with the image) instead of being put on the first image.
                images[record.image_id] = dataclasses.replace(
                    first,
                    problem=Issue(
                        "duplicate_image_id",
                        f"image id {record.image_id} names two different images ({first.file_name} "
                        f"{first.width}x{first.height} and {record.file_name} {record.width}x{record.height}); its "
                        "annotations cannot be placed and are dropped",
                    ),
                )
        else:
            images[record.image_id] = record

    categories = _categories(data["categories"], issues)
    groups = _place_annotations(spans, images, issues)
    return AnnotationSet(path, fmt, images, categories, len(spans), issues, *groups, fd=fd)


def _place_annotations(
    spans: AnnotationSpans, images: dict[int, ImageRecord], issues: list[RecordIssue]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Keep each annotation that can be indexed, grouped by image, and add an issue for each one set aside, in file
    order: an id or image id that is not an int64 integer, an id an earlier kept annotation has, an image id not
    in ``images`` (checked in that order, as a reader going through the file would).

    Returns the kept annotations' :class:`AnnotationSet` arrays ``(image_ids, starts, offsets, lengths)``."""
    n = len(spans)
    ids, image_ids = np.frombuffer(spans.ids, np.int64), np.frombuffer(spans.image_ids, np.int64)
    usable = np.ones(n, bool)
    usable[list(spans.unusable)] = False
    present = usable & np.isin(image_ids, np.fromiter(images, np.int64, len(images)))
    # Downstream stores are keyed by annotation id, so only the first entry of an id whose image exists is kept;
    # a later entry with that id is a duplicate (whether or not its own image exists).
    entries = np.flatnonzero(present)
    unique_ids, first = np.unique(ids[entries], return_index=True)
    first_kept = np.full(n, n, np.int64)  # per entry: the entry kept for its id (n: none)
    if len(unique_ids):
        at = np.minimum(np.searchsorted(unique_ids, ids), len(unique_ids) - 1)
        hit = unique_ids[at] == ids
        first_kept[hit] = entries[first][at[hit]]
    entry = np.arange(n)
    duplicate = usable & (first_kept < entry)
    kept = present & (first_kept == entry)
    for i in np.flatnonzero(~kept).tolist():
        if i in spans.unusable:
            ann_id, image_id, value = spans.unusable[i]
            issue = Issue(
                "bad_annotation_record",
                f"annotation without an integer id/image_id (ids must fit a signed 64-bit integer): {_short(value)}",
            )
        else:
            ann_id, image_id = int(ids[i]), int(image_ids[i])
            issue = (
                Issue("duplicate_ann_id", f"annotation id {ann_id} appears twice; the first is kept")
                if duplicate[i]
                else Issue(
                    "missing_image_id", f"annotation {ann_id} points at image id {image_id}, which is not in 'images'"
                )
            )
        issues.append(RecordIssue(issue, ann_id=ann_id, image_id=image_id, is_annotation=True))

    kept = np.flatnonzero(kept)
    kept = kept[np.argsort(image_ids[kept], kind="stable")]  # grouped by image, file order within an image
    image_ids_kept, starts = np.unique(image_ids[kept], return_index=True)
    return (
        image_ids_kept,
        np.append(starts, len(kept)).astype(np.int64),
        np.frombuffer(spans.offsets, np.int64)[kept],
        np.frombuffer(spans.lengths, np.int64)[kept],
    )


def detect_format(data: dict) -> DatasetFormat:
    """LVIS when categories carry ``synset`` / ``frequency`` and annotations no ``iscrowd``; else COCO.

    The LVIS version follows from the category count (v1: 1203, v0.5: 1230; anything else is "unknown").
    """
    cats = data["categories"]
    lvis_cats = bool(cats) and all(isinstance(c, dict) and ("synset" in c or "frequency" in c) for c in cats)
    has_crowd = any(isinstance(a, dict) and "iscrowd" in a for a in data["annotations"][:ANNOTATIONS_SAMPLED])
    if lvis_cats and not has_crowd:
        return DatasetFormat("lvis", LVIS_VERSIONS.get(len(cats), "unknown"), len(cats))
    return DatasetFormat("coco", None, len(cats))


def _read_json(path: Path) -> tuple[dict, AnnotationSpans, int]:
    """The instances file's top-level object, its annotations located (:func:`instances_json.read_instances`),
    and the file, left open for reading the annotations back (closed here when the file is refused).

    ``data["annotations"]`` holds only the first annotations, parsed (format detection looks at them).
    """
    fd = None
    try:
        fd = open_regular(path, str(path))
        with open(fd, "rb", closefd=False) as stream:
            data, spans = read_instances(stream)
    except UntrustedInputError as err:  # missing, a folder, a FIFO or device (never opened for reading)
        problem = f"{path}: a folder, not a file" if path.is_dir() else str(err)
        message = f"{problem}; point prepare.splits at the instances_*.json (or lvis_v1_*.json) file itself"
    except UnicodeDecodeError as err:
        message = (
            f"{path}: not UTF-8 text ({err}); it is not an annotation JSON, point prepare.splits at the "
            "instances_*.json file"
        )
    except OSError as err:  # an I/O error while reading
        message = (
            f"{path}: unreadable ({err.strerror or err}); point prepare.splits at the instances_*.json "
            "(or lvis_v1_*.json) file itself"
        )
    except RecursionError:  # the parser recurses once per nesting level: ~1000 levels exhaust Python's stack
        message = (
            f"{path}: the JSON is nested deeper than the parser allows (Python's recursion limit, "
            f"{sys.getrecursionlimit()}); an instances file nests 4 levels. The file is damaged or not an "
            "annotation file: re-download it"
        )
    except json.JSONDecodeError as err:
        message = (
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}. The file is probably "
            f"truncated or hand-edited; re-download it, or repair it (`python -m json.tool {path}` shows the "
            "spot)"
        )
    except ValueError as err:  # json's int() of a number longer than Python converts (sys.get_int_max_str_digits)
        message = (
            f"{path}: holds a number JSON readers refuse ({err}); no COCO/LVIS value is that long, so the file is "
            "damaged or not an annotation file: re-download it"
        )
    else:
        lists = ("images", "annotations", "categories")
        missing = [k for k in lists if not (isinstance(data, dict) and isinstance(data.get(k), list))]
        if not missing:
            return data, spans, fd
        message = (
            f"{path}: not a COCO/LVIS instances file, expected an object with lists {missing}; point "
            "prepare.splits at an instances_*.json (or lvis_v1_*.json) file"
        )
    if fd is not None:
        os.close(fd)
    raise PipelineError(message) from None


def _image_record(img: Any, fmt: DatasetFormat, allow_outside_images: bool = False) -> ImageRecord | None:
    if not isinstance(img, dict) or not _is_id(img.get("id")):
        return None
    image_id, width, height = img["id"], img.get("width"), img.get("height")
    file_name, alt_folder = img.get("file_name"), None
    if fmt.name == "lvis":
        # LVIS v1 has no file_name (the image is named by coco_url); v0.5 uses the old 2014 names
        # "COCO_val2014_000000xxxxxx.jpg" for images that COCO 2017 stores as "000000xxxxxx.jpg".
        url = str(img.get("coco_url") or "")
        if url:
            alt_folder, file_name = url.rstrip("/").split("/")[-2:]
        elif isinstance(file_name, str):
            file_name = re.sub(r"^COCO_[a-z]+\d{4}_", "", file_name)
    problem = None
    if not (isinstance(file_name, str) and file_name):
        problem = Issue("bad_image_record", f"image {image_id} has no file_name (nor coco_url)")
        file_name = ""
    elif not (_is_file_name(file_name) and _is_file_name(alt_folder or "_")) or alt_folder in (".", ".."):
        problem = Issue(
            "bad_image_record",
            f"image {image_id} has file_name {file_name!r} (coco_url "
            f"{img.get('coco_url')!r}), which is not a file name",
        )
    elif not allow_outside_images and _leaves_folder(file_name):
        problem = Issue(
            "image_path_outside_folder",
            f"image {image_id} has file_name {file_name!r}, which points "
            "outside the split's images folder (an absolute path or ..); only files inside that folder are "
            "read (a dataset that keeps its images elsewhere on purpose says so with "
            "prepare.allow_outside_images)",
        )
    elif not (_is_int(width) and _is_int(height) and width > 0 and height > 0):
        problem = Issue(
            "bad_image_record",
            f"image {image_id} ({file_name}) has width/height {width!r}/{height!r}, expected positive integers",
        )
    elif width * height > MAX_IMAGE_PIXELS:
        problem = Issue(
            "bad_image_record",
            f"image {image_id} ({file_name}) has width/height {width}/{height}: "
            f"{width * height:,} pixels, more than the {MAX_IMAGE_PIXELS:,} an image may have (PIL's "
            "decompression-bomb limit)",
        )
    if problem is not None and problem.kind == "bad_image_record":
        width = height = 0
    return ImageRecord(image_id, file_name, width, height, alt_folder, problem)


def _categories(records: list[Any], issues: list[RecordIssue]) -> dict[int, str]:
    """``{id: name}`` of the category records; a name that is not text the index can hold (not a string, or with a
    lone surrogate) is replaced, with an issue. A record without an int64 id is skipped: the annotations that
    name it are dropped as ``unknown_category``."""
    categories = {}
    for record in records:
        if not (isinstance(record, dict) and _is_id(record.get("id"))):
            continue
        cat_id, name = record["id"], record.get("name", str(record["id"]))
        if not (isinstance(name, str) and _is_utf8(name)):
            fixed = name.encode("utf-8", "replace").decode("utf-8") if isinstance(name, str) else str(cat_id)
            reason = (
                f"category {cat_id} has name {_short(name, 80)}, which is not a string the index can "
                f"hold (text without lone surrogates); named {fixed!r}"
            )
            issues.append(RecordIssue(Issue("bad_category_name", reason, action="converted")))
            name = fixed
        categories[cat_id] = name
    return categories


def _is_file_name(file_name: str) -> bool:
    """False for text no file can be named: a NUL, or a lone surrogate."""
    return _is_utf8(file_name) and "\x00" not in file_name


def _is_utf8(text: str) -> bool:
    """False for text with a lone surrogate (a ``\\ud800`` escape in the JSON): it has no UTF-8 form, so neither a
    path nor the index can hold it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _leaves_folder(file_name: str) -> bool:
    """True when ``folder / file_name`` is not inside ``folder``: an absolute path, or ``..`` climbing out of it."""
    if Path(file_name).is_absolute() or re.match(r"^([A-Za-z]:)?[\\/]", file_name):  # also C:\ and \\host
        return True
    depth = 0
    for part in Path(file_name).parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return True
    return False


def _same_image(a: ImageRecord, b: ImageRecord) -> bool:
    return (a.file_name, a.width, a.height, a.alt_folder) == (b.file_name, b.width, b.height, b.alt_folder)


# --------------------------------------------------------------------------------------------------
# per-annotation checks


def check_annotation(ann: dict, image: ImageRecord, coco: COCO, categories: Container[int]) -> CheckedAnnotation:
    """Validate one annotation of ``image`` and decode its mask.

    ``coco`` rasterises the segmentation (``annToRLE``: it needs ``image`` in its ``imgs``); ``categories`` holds
    the file's category ids (its categories dict, or a set of their ids).

    Order: crowd (``iscrowd`` 0 or 1), segmentation present, known category, bbox (degenerate / outside /
    clipped), segmentation well-formed, non-empty mask. Polygon parts with fewer than 3 points are removed (a
    conversion) when other parts remain; this must happen before pycocotools sees them, since it reads a
    4-number part as a bbox. So must the vertex bounds: pycocotools rasterises every edge point by point in C
    and a vertex far outside the image (5e8) crashes the process.
    """
    ann_id = ann["id"]
    conversions: list[Issue] = []

    def dropped(kind: str, reason: str, bad_input: bool = True) -> CheckedAnnotation:
        return CheckedAnnotation(Issue(kind, f"annotation {ann_id}: {reason}", bad_input=bad_input), conversions)

    crowd = ann.get("iscrowd", 0)  # LVIS has no iscrowd key: every LVIS annotation is a single instance
    if crowd not in (0, 1) or not isinstance(crowd, (int, bool)):  # "0" is truthy: it must not read as a crowd
        return dropped("bad_iscrowd", f"iscrowd {crowd!r} ({type(crowd).__name__}), expected 0 or 1")
    if crowd:
        return dropped("crowd", "crowd annotation (iscrowd=1)", bad_input=False)
    segm = ann.get("segmentation")
    if segm is None or (isinstance(segm, (list, dict)) and len(segm) == 0):
        return dropped(
            "no_segmentation",
            f"segmentation {segm!r}: no mask to distil; give it a polygon or an RLE, or remove the annotation",
        )
    if not (_is_int(ann.get("category_id")) and ann["category_id"] in categories):
        return dropped("unknown_category", f"category_id {ann.get('category_id')!r} is not in 'categories'")

    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        return dropped("bad_bbox", f"bbox {bbox!r} is not 4 finite numbers [x, y, w, h]")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return dropped("degenerate_bbox", f"bbox {bbox} has zero width or height")
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, float(image.width)), min(y + h, float(image.height))
    if x2 <= x1 or y2 <= y1:
        return dropped("bbox_outside_image", f"bbox {bbox} lies outside the {image.width}x{image.height} image")
    clipped = (x1, y1, x2 - x1, y2 - y1)
    if max(abs(a - b) for a, b in zip(clipped, (x, y, w, h))) > 1e-6:
        conversions.append(
            Issue(
                "bbox_clipped",
                f"annotation {ann_id}: bbox {bbox} extends outside the "
                f"{image.width}x{image.height} image; clipped to {[round(v, 2) for v in clipped]}",
                action="converted",
            )
        )

    if isinstance(segm, list):
        parts = [p for p in segm if _is_polygon(p)]
        if not parts:
            return dropped("bad_polygon", "polygon with fewer than 3 points (or non-numeric / odd-length coordinates)")
        far = _far_vertex(parts, image)
        if far is not None:
            return dropped(
                "polygon_outside_image",
                f"polygon vertex ({far[0]:g}, {far[1]:g}) lies far outside the "
                f"{image.width}x{image.height} image (more than one image size beyond its border)",
            )
        if len(parts) < len(segm):
            reason = (
                f"annotation {ann_id}: removed {len(segm) - len(parts)} of {len(segm)} polygon parts with < 3 points"
            )
            conversions.append(Issue("polygon_part_removed", reason, action="converted"))
        segm = parts
    elif isinstance(segm, dict):
        problem = _rle_problem(segm, image)
        if problem:
            return dropped(*problem)
    else:
        return dropped("bad_segmentation", f"segmentation is a {type(segm).__name__}, expected polygons or an RLE dict")

    # pycocotools does the rasterisation: polygons -> merged RLE, uncompressed RLE -> compressed.
    rle = coco.annToRLE({**ann, "segmentation": segm})
    counts = rle["counts"]
    rle = {"size": [image.height, image.width], "counts": counts.encode() if isinstance(counts, str) else counts}
    try:
        pixels = int(mask_utils.area(rle))
        mask_box = tuple(int(v) for v in mask_utils.toBbox(rle))  # the RLE's tight box; integers here
        mask = mask_utils.decode(rle)
    except ValueError as err:  # a compressed string whose runs do not add up to height * width
        return dropped("bad_rle", f"compressed RLE counts cannot be decoded for size {rle['size']} ({err})")
    if (
        isinstance(segm, dict)
        and isinstance(segm["counts"], str)
        and mask_utils.encode(np.asfortranarray(mask))["counts"] != rle["counts"]
    ):
        # pycocotools decodes any ASCII string (characters outside its alphabet, negative or zero runs) into some
        # mask; only a string that is what pycocotools writes for that mask is a real RLE.
        return dropped(
            "bad_rle",
            f"compressed RLE counts {_short(segm['counts'], 40)} are not a valid encoding (they "
            "are not what pycocotools writes for the mask they decode to)",
        )
    if pixels == 0:
        return dropped("empty_mask", "segmentation covers no pixel of the image")

    area = ann.get("area")
    if not _is_number(area):
        conversions.append(
            Issue(
                "area_computed",
                f"annotation {ann_id}: area {area!r} missing or not a number; using the mask area {pixels}",
                action="converted",
            )
        )
        area = pixels
    return CheckedAnnotation(None, conversions, clipped, float(area), rle["counts"].decode("ascii"), mask, mask_box)


def _far_vertex(parts: list[list[float]], image: ImageRecord) -> tuple[float, float] | None:
    """The first polygon vertex more than one image width/height outside the image, or None.

    Real annotations stray a pixel or two past the border; one image size of slack keeps every such polygon
    (and what the bbox clip makes of it) while bounding the work pycocotools does per edge.
    """
    for part in parts:
        xs, ys = np.asarray(part[0::2], np.float64), np.asarray(part[1::2], np.float64)
        bad = (xs < -image.width) | (xs > 2 * image.width) | (ys < -image.height) | (ys > 2 * image.height)
        if bad.any():
            i = int(np.argmax(bad))
            return float(xs[i]), float(ys[i])
    return None


def _rle_problem(segm: dict, image: ImageRecord) -> tuple[str, str] | None:
    size, counts = segm.get("size"), segm.get("counts")
    if size != [image.height, image.width]:
        return (
            "rle_size_mismatch",
            f"RLE size {size!r} is not the image's [height, width] [{image.height}, {image.width}]",
        )
    if isinstance(counts, list):
        if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != image.height * image.width:
            return "bad_rle", f"uncompressed RLE counts do not sum to height*width = {image.height * image.width}"
    elif not (isinstance(counts, str) and counts.isascii() and counts):
        return "bad_rle", f"RLE counts {_short(counts, 40)}: expected a list of ints or a compressed ASCII string"
    return None


def _is_polygon(part: Any) -> bool:
    return isinstance(part, list) and len(part) >= 6 and len(part) % 2 == 0 and all(_is_number(v) for v in part)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(record: Any, limit: int = 120) -> str:
    """``record`` as ASCII JSON text (escapes for the rest: RTL marks, NUL, lone surrogates), cut to ``limit``."""
    try:
        text = json.dumps(record, default=str)
    except RecursionError:  # nested nearly as deep as the parser allows: the encoder may recurse further
        text = f"a {type(record).__name__} nested too deep to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."
