"""The built-in sample: a small synthetic COCO-format dataset, generated deterministically and offline.

Layout under ``SampleConfig.out_dir`` (the same as COCO's, so ``prepare`` reads it like the real thing)::

    annotations/instances_train.json   annotations/instances_val.json
    train/000000100001.jpg ...         val/000000200001.jpg ...
    BAD_INPUTS.md                      what was planted in train, with image / annotation ids

Each image (200-360 px per side, some portrait) is a textured background (gradient + smooth and pixel
noise) with 3-8 textured shapes (ellipses, rotated boxes, stars, blobs, shards) drawn in order, so later
shapes cover earlier ones and each annotation is the *visible* part. Segmentations follow COCO's habits:
a polygon for a shape that is entirely visible, compressed RLE for one that is covered or cut by the image
border, uncompressed RLE for the crowd region. ``bbox`` and ``area`` come from the visible mask via
pycocotools. The first image of each split also holds a crowd region (``iscrowd=1``) and a tiny shape
(area < 30 px). Train carries the bad inputs of ``BAD_FILES`` / ``BAD_ANNOTATIONS``; val is clean.

Determinism: image ``i`` of split ``s`` draws from ``np.random.default_rng([seed, s, i])``, so the same
``SampleConfig`` gives byte-identical files (with the same Pillow / libjpeg), and adding images leaves the
existing ones unchanged (except which train images from index 8 on host the planted annotations).
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from picosam_pipeline.config import SampleConfig
from picosam_pipeline.errors import PipelineError

# Non-contiguous ids, as in COCO (1..90 with gaps).
CATEGORIES = [
    {"id": 3, "name": "disc", "supercategory": "shape"},
    {"id": 8, "name": "box", "supercategory": "shape"},
    {"id": 17, "name": "star", "supercategory": "shape"},
    {"id": 21, "name": "blob", "supercategory": "shape"},
    {"id": 44, "name": "shard", "supercategory": "shape"},
]
_CATEGORY_ID = {c["name"]: c["id"] for c in CATEGORIES}
SPLITS = {"train": 100_000, "val": 200_000}  # split -> image id base (image i has id base + i + 1)
MISSING_IMAGE_ID = 999_999  # the planted orphan annotation points here

# Train image index -> the bad file written for it (the annotations stay valid; only the file is off).
BAD_FILES = {
    1: ("missing_file", "listed in the JSON, no file on disk"),
    2: ("truncated_jpeg", "JPEG cut to 60% of its bytes (an interrupted download)"),
    3: ("corrupt_file", "an HTML error page plus random bytes, saved as .jpg"),
    4: ("grayscale_jpeg", "single-channel (L) JPEG; decodes with grayscale->rgb"),
    5: ("cmyk_jpeg", "CMYK JPEG; decodes with cmyk->rgb"),
    6: ("palette_png", "palette (P-mode) PNG with a .png file name; decodes with palette->rgb"),
    7: (
        "exif_rotated_jpeg",
        "pixels stored rotated 90 deg with EXIF Orientation=6; JSON size and annotations "
        "are the displayed (rotated) image; decodes with exif-rotated",
    ),
}
# Bad annotations, added to train images 8, 9, ... in turn.
BAD_ANNOTATIONS = {
    "degenerate_bbox": "bbox with w = 0 and a zero-area (collinear) polygon",
    "short_polygon": "polygon with 2 points (4 numbers; pycocotools would read it as a bbox)",
    "bbox_outside_image": "polygon and bbox run past the right image border (the visible part is drawn)",
    "orphan_annotation": f"annotation whose image_id {MISSING_IMAGE_ID} is not in images",
}
_FIRST_BAD_ANNOTATION_IMAGE = 8
MANAGED = {"annotations", "train", "val", "BAD_INPUTS.md", "config.resolved.json"}


@dataclass
class _Shape:
    """One thing drawn on the image: polygons in image pixels (float, may cross the border)."""

    category: str
    polygons: list[np.ndarray]  # each (N, 2) x, y
    iscrowd: bool = False
    planted: str | None = None  # a BAD_ANNOTATIONS kind whose annotation is written as-is


BadRow = tuple[str, int, int | None, str, str]  # kind, image id, annotation id (None: the whole image), file, what


def generate(cfg: SampleConfig) -> dict[str, Any]:
    """Write the sample dataset to ``cfg.out_dir`` (replacing an earlier sample there) and return its counts.

    Raises:
        PipelineError: ``out_dir`` holds files the generator did not write (it refuses to delete them).
    """
    out = Path(cfg.out_dir)
    _reset_out_dir(out)
    bad_rows: list[BadRow] = []
    summary: dict[str, Any] = {"images": {}, "annotations": {}, "bad_inputs": 0}
    for split_no, (split, id_base) in enumerate(SPLITS.items()):
        n_images = cfg.train_images if split == "train" else cfg.val_images
        plant = cfg.plant_bad_inputs and split == "train"
        (out / split).mkdir(parents=True)
        images, annotations = [], []
        for i in tqdm(range(n_images), desc=f"sample {split}", unit="img", leave=False):
            image, anns, rows = _sample_image(
                out, split, np.random.default_rng([cfg.seed, split_no, i]), i, id_base + i + 1, n_images, plant
            )
            images.append(image)
            annotations += anns
            bad_rows += rows
        _write_json(out / "annotations" / f"instances_{split}.json", split, cfg.seed, images, annotations)
        summary["images"][split] = len(images)
        summary["annotations"][split] = len(annotations)
    summary["bad_inputs"] = len(bad_rows)
    (out / "BAD_INPUTS.md").write_text(_bad_inputs_markdown(bad_rows))
    return summary


def _sample_image(
    out: Path, split: str, rng: np.random.Generator, index: int, image_id: int, n_images: int, plant: bool
) -> tuple[dict[str, Any], list[dict[str, Any]], list[BadRow]]:
    """Draw, write and annotate image ``index`` of ``split``; returns its COCO image entry, annotations, bad rows."""
    bad_file = BAD_FILES[index][0] if plant and index in BAD_FILES else None
    bad_anns = _bad_annotation_kinds(index, n_images) if plant else []
    pixels, drawn = _compose(rng, index, portrait=bad_file == "exif_rotated_jpeg", planted=bad_anns)
    h, w = pixels.shape[:2]
    file_name = f"{image_id:012d}" + (".png" if bad_file == "palette_png" else ".jpg")
    _write_image(out / split / file_name, pixels, bad_file, rng)
    rows: list[BadRow] = []
    if bad_file:
        rows.append((bad_file, image_id, None, f"{split}/{file_name}", BAD_FILES[index][1]))

    # Annotation ids are image_id * 100 + k: unique over both splits and easy to trace back to the image.
    annotations, planted = [], []
    for k, (shape, visible) in enumerate(drawn):
        annotations.append(_annotation(shape, visible, image_id, image_id * 100 + k))
        if shape.planted:
            planted.append((shape.planted, annotations[-1]))
    unpainted = _unpainted_bad_annotations(rng, bad_anns, image_id, image_id * 100 + len(drawn), (h, w))
    annotations += [ann for _, ann in unpainted]
    for kind, ann in planted + unpainted:
        file = "-" if kind == "orphan_annotation" else f"{split}/{file_name}"
        rows.append((kind, ann["image_id"], ann["id"], file, BAD_ANNOTATIONS[kind]))
    return {"id": image_id, "file_name": file_name, "width": w, "height": h}, annotations, rows


# --------------------------------------------------------------------------------------------------
# scene


def _compose(rng: np.random.Generator, index: int, portrait: bool, planted: list[str]) -> tuple[np.ndarray, list]:
    """Draw one image. Returns ``(pixels (H, W, 3) uint8, [(shape, visible mask (H, W) bool), ...])``."""
    if portrait:  # clearly non-square, so a wrongly applied 90-degree EXIF rotation shows up as a size mismatch
        w = int(rng.integers(200, 280))
        h = int(rng.integers(w + 60, 361))
    else:
        w, h = (int(v) for v in rng.integers(200, 361, size=2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    side = min(w, h)

    shapes = []
    n = int(rng.integers(3, 9))
    for j in range(n):
        kind = str(rng.choice(list(_CATEGORY_ID)))
        r = float(rng.uniform(0.08, 0.28)) * side
        if j == n - 1:  # the topmost regular shape is centred on a border point, so the border cuts it
            f = float(rng.uniform(0.1, 0.9))
            cx, cy = [(f * w, 0.0), (float(w), f * h), (f * w, float(h)), (0.0, f * h)][int(rng.integers(0, 4))]
        else:
            cx, cy = float(rng.uniform(0.1, 0.9)) * w, float(rng.uniform(0.1, 0.9)) * h
        shapes.append(_Shape(kind, [_outline(rng, kind, cx, cy, r)]))
    if index == 0:  # one crowd region (a cluster of small discs) and, on top of everything, one tiny disc
        cx, cy = float(rng.uniform(0.3, 0.7)) * w, float(rng.uniform(0.3, 0.7)) * h
        discs = [
            _outline(rng, "disc", cx + float(dx), cy + float(dy), float(rng.uniform(0.025, 0.04)) * side)
            for dx, dy in rng.normal(0, 0.07 * side, size=(int(rng.integers(6, 11)), 2))
        ]
        shapes.append(_Shape("disc", discs, iscrowd=True))
        tiny = _outline(rng, "disc", float(rng.uniform(20, w - 20)), float(rng.uniform(20, h - 20)), 2.4)  # ~18 px
        shapes.append(_Shape("disc", [tiny]))
    if "bbox_outside_image" in planted:
        # centred 0.05 * side inside the right border; its half-width is >= 0.35 * 0.15 * side, so it crosses it
        box = _outline(rng, "box", w - 0.05 * side, float(rng.uniform(0.3, 0.7)) * h, 0.15 * side)
        shapes.append(_Shape("box", [box], planted="bbox_outside_image"))

    # Visibility top-down: a shape shows where no later shape covers it. A shape left mostly hidden (< 25%)
    # is dropped from the scene altogether, which is why this runs before painting.
    covered = np.zeros((h, w), dtype=bool)
    kept = []
    for shape in reversed(shapes):
        full = _rasterize(shape.polygons, h, w)
        visible = full & ~covered
        if not visible.any() or visible.sum() < 0.25 * full.sum():
            continue
        covered |= full
        kept.append((shape, full, visible))
    kept.reverse()

    canvas = _background(rng, xx, yy)
    for _shape, full, _ in kept:
        rows, cols = np.flatnonzero(full.any(1)), np.flatnonzero(full.any(0))
        box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # texture only the shape's bounding box
        canvas[box][full[box]] = _texture(rng, xx[box], yy[box])[full[box]]  # canvas[box] is a view
    pixels = np.clip(canvas * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return pixels, [(shape, visible) for shape, _, visible in kept]


def _outline(rng: np.random.Generator, kind: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Polygon ``(N, 2)`` for a shape of size ``r`` (about its radius) centred at ``(cx, cy)``, rotated at random.

    Every outline is star-shaped around its centre (vertices at increasing angles), so it is a simple polygon.
    """
    rot = float(rng.uniform(0, 2 * np.pi))
    if kind == "disc":  # ellipse
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([r * np.cos(t), r * float(rng.uniform(0.55, 1.0)) * np.sin(t)], 1)
    elif kind == "box":  # rotated rectangle
        a, b = r, r * float(rng.uniform(0.35, 0.9))
        pts = np.array([[-a, -b], [a, -b], [a, b], [-a, b]])
    else:
        if kind == "star":
            k = int(rng.integers(5, 8))
            t = np.linspace(0, 2 * np.pi, 2 * k, endpoint=False)
            radius = np.where(np.arange(2 * k) % 2 == 0, r, r * float(rng.uniform(0.4, 0.6)))
        elif kind == "blob":  # smooth random radius: a few low harmonics
            t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
            harmonics = sum(
                float(rng.uniform(0, 0.15)) * np.cos(m * t + float(rng.uniform(0, 2 * np.pi))) for m in (2, 3, 4)
            )
            radius = r * (1.0 + harmonics)
        else:  # shard: irregular 5-7-gon
            t = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 8))))
            radius = r * rng.uniform(0.5, 1.0, len(t))
        pts = np.stack([radius * np.cos(t), radius * np.sin(t)], 1)
    c, s = np.cos(rot), np.sin(rot)
    pts = pts @ np.array([[c, s], [-s, c]]) + [cx, cy]
    return np.round(pts, 2)  # COCO stores 2 decimals; the mask is rasterized from exactly what is stored


def _rasterize(polygons: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """Union of polygons as a ``(h, w)`` bool mask, rasterized by pycocotools (so it equals ``annToMask``)."""
    rles = mask_utils.frPyObjects([p.ravel().tolist() for p in polygons], h, w)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _smooth_noise(rng: np.random.Generator, xx: np.ndarray, cells: int) -> np.ndarray:
    """Low-frequency noise in ``[0, 1]``, shape of ``xx``: a ``cells x cells`` grid upsampled bicubically."""
    grid = Image.fromarray(rng.random((cells, cells), dtype=np.float32))  # mode "F"
    return np.asarray(grid.resize((xx.shape[1], xx.shape[0]), Image.Resampling.BICUBIC))


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` float32 in ``[0, 1]``: a two-colour gradient, smooth blotches and pixel noise."""
    a = float(rng.uniform(0, 2 * np.pi))
    ramp = xx * np.cos(a) + yy * np.sin(a)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    c1, c2 = rng.uniform(0.15, 0.85, size=(2, 3)).astype(np.float32)
    img = c1 + ramp[..., None] * (c2 - c1)
    img += 0.25 * (np.stack([_smooth_noise(rng, xx, 5) for _ in range(3)], -1) - 0.5)
    img += rng.normal(0, 0.03, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def _texture(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """``(h, w, 3)`` float32 in ``[0, 1]`` over the pixel grid ``xx, yy`` (h, w): one shape's own colour pair
    mixed by stripes, checks, rings or blotches (in image coordinates, so a pattern continues across a crop)."""
    a = float(rng.uniform(0, np.pi))
    u = xx * np.cos(a) + yy * np.sin(a)
    v = -xx * np.sin(a) + yy * np.cos(a)
    period = float(rng.uniform(5, 18))
    pattern = int(rng.integers(0, 4))
    if pattern == 0:
        p = 0.5 + 0.5 * np.sin(2 * np.pi * u / period)
    elif pattern == 1:
        p = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif pattern == 2:
        cx, cy = float(rng.uniform(xx.min(), xx.max())), float(rng.uniform(yy.min(), yy.max()))
        p = 0.5 + 0.5 * np.sin(2 * np.pi * np.hypot(xx - cx, yy - cy) / period)
    else:
        p = _smooth_noise(rng, xx, 12)
    c1 = rng.uniform(0, 1, 3).astype(np.float32)
    c2 = np.clip(c1 * 0.5 + rng.uniform(0, 0.5, 3), 0, 1).astype(np.float32)
    img = c1 + p[..., None] * (c2 - c1) + rng.normal(0, 0.02, size=(*p.shape, 3)).astype(np.float32)
    return np.clip(img, 0, 1)


# --------------------------------------------------------------------------------------------------
# annotations


def _annotation(shape: _Shape, visible: np.ndarray, image_id: int, ann_id: int) -> dict[str, Any]:
    """COCO annotation for a drawn shape; ``visible`` is its ``(H, W)`` bool mask; bbox and area via pycocotools."""
    h, w = visible.shape
    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    ann: dict[str, Any] = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": _CATEGORY_ID[shape.category],
        "iscrowd": int(shape.iscrowd),
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
    }
    inside = all(
        p[:, 0].min() >= 0 and p[:, 0].max() <= w and p[:, 1].min() >= 0 and p[:, 1].max() <= h for p in shape.polygons
    )
    if shape.planted == "bbox_outside_image":
        # The sloppy-tool case: the stored polygon and its extents go past the border; area is what is drawn.
        pts = shape.polygons[0]
        x0, y0 = pts.min(0)
        x1, y1 = pts.max(0)
        ann["segmentation"] = [pts.ravel().tolist()]
        ann["bbox"] = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
    elif shape.iscrowd:
        ann["segmentation"] = _uncompressed_rle(visible)
    elif inside and len(shape.polygons) == 1 and np.array_equal(visible, _rasterize(shape.polygons, h, w)):
        ann["segmentation"] = [shape.polygons[0].ravel().tolist()]
    else:  # covered by a later shape or cut by the border: the visible part as compressed RLE
        ann["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    return ann


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE ``{"size": [H, W], "counts": [int, ...]}``, the form COCO uses for crowd regions.

    pycocotools reads this form (``frPyObjects``) but only writes the compressed one, so the run lengths are
    taken here: column-major pixel order, alternating runs that start with background (a leading 0 when the
    first pixel is foreground).
    """
    flat = mask.ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat[0]:
        counts.insert(0, 0)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _bad_annotation_kinds(index: int, n_images: int) -> list[str]:
    """The BAD_ANNOTATIONS kinds planted in train image ``index`` (round robin over images 8, 9, ...)."""
    if index < _FIRST_BAD_ANNOTATION_IMAGE:
        return []
    hosts = n_images - _FIRST_BAD_ANNOTATION_IMAGE
    return [k for j, k in enumerate(BAD_ANNOTATIONS) if _FIRST_BAD_ANNOTATION_IMAGE + j % hosts == index]


def _unpainted_bad_annotations(
    rng: np.random.Generator, kinds: list[str], image_id: int, next_id: int, hw: tuple[int, int]
) -> list[tuple[str, dict[str, Any]]]:
    """``(kind, annotation)`` for the planted kinds that draw nothing: zero-width box, 2-point polygon, orphan."""
    h, w = hw
    anns = []
    for kind in kinds:
        x, y = round(float(rng.uniform(10, w - 40)), 2), round(float(rng.uniform(10, h - 40)), 2)
        ann = {
            "id": next_id + len(anns),
            "image_id": image_id,
            "category_id": _CATEGORY_ID["box"],
            "iscrowd": 0,
            "area": 0.0,
        }
        if kind == "degenerate_bbox":
            ann.update(bbox=[x, y, 0.0, 25.0], segmentation=[[x, y, x, y + 12.5, x, y + 25.0]])
        elif kind == "short_polygon":
            ann.update(bbox=[x, y, 20.0, 15.0], segmentation=[[x, y, x + 20.0, y + 15.0]])
        elif kind == "orphan_annotation":
            ann.update(
                image_id=MISSING_IMAGE_ID,
                bbox=[x, y, 20.0, 20.0],
                area=400.0,
                segmentation=[[x, y, x + 20.0, y, x + 20.0, y + 20.0, x, y + 20.0]],
            )
        else:
            continue  # drawn kinds (bbox_outside_image) come from _compose
        anns.append((kind, ann))
    return anns


# --------------------------------------------------------------------------------------------------
# files


def _write_image(path: Path, pixels: np.ndarray, bad: str | None, rng: np.random.Generator) -> None:
    """Save ``pixels`` (H, W, 3) uint8 as JPEG, or as the planted bad file ``bad``."""
    image = Image.fromarray(pixels)
    if bad == "missing_file":
        return
    if bad == "corrupt_file":
        path.write_bytes(b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>\n" + rng.bytes(2000))
    elif bad == "palette_png":
        image.quantize(colors=64).save(path, format="PNG")
    elif bad == "exif_rotated_jpeg":
        # Orientation 6 = "rotate 90 deg clockwise to display", so store the displayed image turned 90 deg back.
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = 6
        image.transpose(Image.Transpose.ROTATE_90).save(path, format="JPEG", quality=90, exif=exif.tobytes())
    else:
        mode = {"grayscale_jpeg": "L", "cmyk_jpeg": "CMYK"}.get(bad or "", "RGB")
        buffer = io.BytesIO()
        image.convert(mode).save(buffer, format="JPEG", quality=90)
        data = buffer.getvalue()
        path.write_bytes(data[: int(len(data) * 0.6)] if bad == "truncated_jpeg" else data)


def _write_json(path: Path, split: str, seed: int, images: list, annotations: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "info": {"description": f"picosam-pipeline synthetic sample, {split} split, seed {seed}", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")


def _bad_inputs_markdown(rows: list[BadRow]) -> str:
    lines = [
        "# Planted bad inputs (train split only; val is clean)",
        "",
        "Written by `picosam-pipeline run-stage sample`. `prepare` must skip or convert each of these and",
        "report it; everything not listed is valid. annotation_id `-` means the whole image is affected.",
        "",
        "| kind | image_id | annotation_id | file | what |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {kind} | {image_id} | {'-' if ann_id is None else ann_id} | {file} | {what} |"
        for kind, image_id, ann_id, file, what in rows
    ]
    if not rows:
        lines.append("| (none planted: sample.plant_bad_inputs is false) | - | - | - | - |")
    return "\n".join(lines) + "\n"


def _reset_out_dir(out: Path) -> None:
    """Remove an earlier sample in ``out``; refuse when ``out`` holds anything the generator did not write."""
    if out.exists() and not out.is_dir():
        raise PipelineError(f"sample.out_dir: {str(out)!r} is a file; choose a folder with --set sample.out_dir=PATH")
    if not out.exists():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in MANAGED)
    if foreign:
        raise PipelineError(
            f"sample.out_dir: {str(out)!r} already holds {foreign[:5]} which the sample generator did not write; "
            "choose an empty or new folder with --set sample.out_dir=PATH"
        )
    for p in out.iterdir():
        if p.name == "config.resolved.json":
            continue  # the stage output's marker, written first: a killed run's folder stays recognisable as its own
        shutil.rmtree(p) if p.is_dir() else p.unlink()
