"""The teacher-logit store: the teacher's soft logits for every instance, in one Zarr v3 group.

Layout of the group (one per teacher pass, ``data/teacher/stores/<NAME>.zarr``); ``N`` instances, row ``i`` = row ``i`` of the
teacher's instance index, ``S`` = stored side, ``K`` = instances per shard, ``n_shards = ceil(N / K)``:

==============  ===========  =============  ===============  ============================================
array           shape        dtype          chunks / shards  content
==============  ===========  =============  ===============  ============================================
``logits``      (N, S, S)    uint8/float16  (1,S,S)/(K,S,S)  codec values; decode rule in its attributes
``ann_id``      (N,)         int64          (K,)             COCO / LVIS annotation id
``image_id``    (N,)         int64          (K,)             image id
``confidence``  (N,)         float32        (K,)             teacher's predicted IoU of the kept mask
``crop_box``    (N, 4)       int32          (K, 4)           student crop x1, y1, x2, y2 (image px, half-open)
``stored_box``  (N, 4)       float64        (K, 4)           frame of ``logits``: crop_box + context margin
``shard_done``  (n_shards,)  uint8          (1,)             1 once shard k is completely written
==============  ===========  =============  ===============  ============================================

Logits pixel ``(v, u)`` of instance ``i`` samples image point ``x1 + (u + 0.5) * (x2 - x1) / S`` (same for y)
of ``stored_box[i]`` (the ``align_corners=False`` convention of ``crops.crop_pixel_centres``). The group's
``logit_store`` attribute holds the layout, codec and code version; the caller's attributes
(:func:`teacher_attrs`) hold the teacher, its checkpoint sha256, the prompt convention and crop parameters.
Plain zarr reads it all: ``zarr.open_group(path, mode="r")["logits"][i]`` plus ``["logits"].attrs``.

Writing and crash safety. Writers own whole shards: :meth:`LogitStore.write_shard` for shard ``k`` touches
exactly one file per array (the ``logits`` shard, the ``k``-th chunk of each metadata array) and one marker
file. It first deletes whatever files shard ``k`` already has (zarr 3.1.6 reads an existing shard before
rewriting it, even for a write that covers the whole shard, and fails on a truncated one), writes the
arrays, and only then sets ``shard_done[k] = 1``. So a shard is taken as done only after all its files were
written; killed at any moment, a rerun rewrites exactly the shards without a marker, and the result is
byte-identical to an uninterrupted run (the codecs and Blosc are deterministic). zarr 3.1.6's ``LocalStore``
also writes every file to ``<name>.<uuid>.partial`` and renames it into place, so no file is ever half
written in place; a kill can leave such temporaries behind, which :func:`create_store` removes. This covers
process death (SIGKILL, OOM, preemption), not power loss: zarr does not fsync.

The metadata arrays are plain chunks of ``K`` rather than shards of 1-row chunks: the shard index (16 bytes
per inner chunk) would outweigh 8-byte rows, and one chunk per ``K`` rows gives shard ``k``'s writer one file
per array just the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

import picosam_pipeline
from picosam_pipeline.config import TeacherConfig
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.teacher.codec import LogitCodec, decode_logits, encode_logits, get_codec

FORMAT_VERSION = 1
STORE_ATTR = "logit_store"  # group attribute owned by this module; the rest belongs to the caller

# name -> (dtype, trailing shape, description); written per shard together with the logits.
META_ARRAYS: dict[str, tuple[str, tuple[int, ...], str]] = {
    "ann_id": ("int64", (), "COCO / LVIS annotation id"),
    "image_id": ("int64", (), "image id"),
    "confidence": ("float32", (), "teacher's predicted IoU of the kept mask"),
    "crop_box": ("int32", (4,), "student crop (x1, y1, x2, y2), image pixels, half-open"),
    "stored_box": ("float64", (4,), "frame of the stored logits (x1, y1, x2, y2), image pixels: crop_box + context margin"),
}
DATA_ARRAYS = ("logits", *META_ARRAYS)

# Teacher settings that change how the pass runs but not one stored byte; left out of the attributes so
# that resuming on another cluster (or with the store moved) is not refused as a different teacher.
EXECUTION_FIELDS = ("executor", "scheduler_address", "n_workers", "threads_per_worker", "out", "stores_dir", "name",
                    "checkpoints_dir", "onnx_dir", "images_per_batch")

PROMPT_CONVENTIONS = {
    "roi": "PicoSAM3: box prompt = the COCO bbox on the full image; crop = the bbox padded by roi_padding per "
    "side, squared, clipped (crops.roi_box), resized to store_size",
    "point": "PicoSAM2: point prompt = centre of the mask's bbox or the nearest mask pixel (crops.point_prompt); "
    "crop = the point_crop_size native-resolution window around it (crops.point_box), resized to store_size",
}


# --------------------------------------------------------------------------------------------------
# geometry and attributes


def stored_side(store_size: int, context_margin: float) -> int:
    """Side ``S`` of the stored logits: the crop's ``store_size`` plus ``round(context_margin * store_size)`` per side.

    Rounded half up, the rule of ``geometry.context_pixels`` that makes the logits (Python's ``round``
    rounds half to even: 10 * 0.25 would give 2 here and 3 there).
    """
    return store_size + 2 * math.floor(context_margin * store_size + 0.5)


def stored_boxes(crop_boxes: np.ndarray, store_size: int, context_margin: float) -> np.ndarray:
    """Crop boxes ``(n, 4)`` -> the stored frames ``(n, 4)`` float64: each side grown by the margin's whole pixels.

    The margin is a whole number of crop pixels (``round(context_margin * store_size)``), so the stored grid
    continues the crop's pixel grid and the crop is the central ``store_size`` window of the stored logits.
    """
    boxes = np.asarray(crop_boxes, dtype=np.float64).reshape(-1, 4)
    margin = (stored_side(store_size, context_margin) - store_size) / 2 / store_size  # fraction of the crop side
    grow = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, axis=1) * margin
    return boxes + grow * np.array([-1.0, -1.0, 1.0, 1.0])


def teacher_attrs(cfg: TeacherConfig, *, checkpoint_sha256: str | None, crop: Mapping[str, Any]) -> dict[str, Any]:
    """The group attributes that describe the teacher pass (pass the result to :func:`create_store`).

    Args:
        cfg: the teacher section; execution-only fields (``EXECUTION_FIELDS``) are left out.
        checkpoint_sha256: sha256 of the checkpoint file, or None when the teacher ran with random weights.
        crop: crop parameters from the index (e.g. ``roi_padding``, ``point_crop_size``, ``min_roi_side``).
    """
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EXECUTION_FIELDS}
    return {
        "teacher": {
            "model": cfg.model,
            "checkpoint": cfg.checkpoint,
            "checkpoint_sha256": checkpoint_sha256,
            "random_weights": checkpoint_sha256 is None,
            "multimask_output": cfg.multimask_output,
            "config": config,
        },
        "prompt": {"convention": cfg.prompt, "description": PROMPT_CONVENTIONS[cfg.prompt]},
        "crop": {
            "store_size": cfg.store_size,
            "context_margin": cfg.context_margin,
            "stored_size": stored_side(cfg.store_size, cfg.context_margin),
            **crop,
        },
    }


# --------------------------------------------------------------------------------------------------
# the store


class LogitStore:
    """An open teacher-logit store; build it with :func:`create_store` (writers) or :func:`open_store` (readers)."""

    def __init__(self, path: str | Path, group: zarr.Group, writable: bool) -> None:
        self.path = Path(path)
        self.writable = writable
        self._group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        layout = self.attrs[STORE_ATTR]
        self.n_instances: int = layout["n_instances"]
        self.side: int = layout["side"]
        self.instances_per_shard: int = layout["instances_per_shard"]
        self.n_shards: int = layout["n_shards"]
        self.codec: LogitCodec = get_codec(layout["codec"])
        self._arrays = {name: group[name] for name in (*DATA_ARRAYS, "shard_done")}  # metadata read once

    def __len__(self) -> int:
        return self.n_instances

    def __repr__(self) -> str:
        return (f"LogitStore({str(self.path)!r}, {self.n_instances} x {self.side}x{self.side} {self.codec.name}, "
                f"{self.n_shards} shards of {self.instances_per_shard})")

    def __reduce__(self):  # dask ships a store to workers by path; each process opens its own zarr objects
        return open_store, (self.path, self.writable)

    def shard_slice(self, k: int) -> slice:
        """The instance rows ``start:stop`` that shard ``k`` holds."""
        if not 0 <= k < self.n_shards:
            raise IndexError(f"shard {k} out of range: the store has {self.n_shards} shards")
        start = k * self.instances_per_shard
        return slice(start, min(start + self.instances_per_shard, self.n_instances))

    def done_shards(self) -> np.ndarray:
        """Bool ``(n_shards,)``: which shards are completely written (read fresh from disk on every call)."""
        return self._arrays["shard_done"][:] == 1

    def pending_shards(self) -> list[int]:
        """Shard numbers still to write, ascending (what a resumed run hands out as tasks)."""
        return np.flatnonzero(~self.done_shards()).tolist()

    def write_shard(self, k: int, logits: np.ndarray, *, ann_id, image_id, confidence, crop_box, stored_box,
                    encoded: bool = False) -> None:
        """Encode and write shard ``k`` (rows ``shard_slice(k)``, ``n`` of them), then mark it done.

        Args:
            logits: float32 ``(n, S, S)`` teacher logits in the ``stored_box`` frame (any finite range); with
                ``encoded``, the codec's values already (``codec.dtype``, e.g. from ``codec.encode_logits_torch``).
            ann_id, image_id: int ``(n,)``. confidence: float ``(n,)``.
            crop_box: int ``(n, 4)`` student crop boxes. stored_box: float ``(n, 4)`` frames of ``logits``.
        """
        if not self.writable:
            raise PermissionError(f"{self.path} is open read-only; writers get their store from create_store()")
        rows = self.shard_slice(k)
        n = rows.stop - rows.start
        given = dict(ann_id=ann_id, image_id=image_id, confidence=confidence, crop_box=crop_box, stored_box=stored_box)
        shape = (n, self.side, self.side)
        values = {"logits": _checked(k, "logits", logits, shape, np.dtype(self.codec.dtype), exact=True) if encoded
                  else encode_logits(_checked(k, "logits", logits, shape, np.float32), self.codec)}
        for name, (dtype, tail, _) in META_ARRAYS.items():
            values[name] = _checked(k, name, given[name], (n, *tail), np.dtype(dtype))
        done = self._arrays["shard_done"]
        done[k] = 0  # un-commit first when rewriting a finished shard (fill value: the marker file is deleted)
        for name in DATA_ARRAYS:  # a previous attempt's files, possibly truncated on a non-atomic store
            array = self._arrays[name]
            key = array.metadata.encode_chunk_key((k,) + (0,) * (array.ndim - 1))
            (self.path / array.path / key).unlink(missing_ok=True)
        for name in DATA_ARRAYS:
            self._arrays[name][rows] = values[name]
        done[k] = 1  # the commit: written last, its own file

    def _selection(self, indices) -> int | slice | np.ndarray:
        """``indices`` (int, slice or 1-D int sequence) as a zarr row selection whose shards are all written."""
        n = self.n_instances
        if isinstance(indices, slice):
            start, stop, step = indices.indices(n)
            rows = np.arange(start, stop, step)
            selection: int | slice | np.ndarray = slice(start, stop, step) if step > 0 else rows
        else:
            picked = np.asarray(indices)
            if picked.ndim > 1 or (picked.size and picked.dtype.kind not in "iu"):
                raise IndexError(f"rows must be an int, a slice or a 1-D int sequence, got {picked.dtype} of shape {picked.shape}")
            if ((picked < -n) | (picked >= n)).any():
                raise IndexError(f"row index out of range for a store of {n} instances")
            rows = picked.astype(np.int64) % n  # wraps negatives like numpy
            selection = int(rows) if rows.ndim == 0 else rows
        shards = np.unique(np.atleast_1d(rows) // self.instances_per_shard)
        missing = shards[~self.done_shards()[shards]]
        if len(missing):
            raise PipelineError(
                f"{self.path}: shards {missing[:8].tolist()}{' ...' if len(missing) > 8 else ''} are not written yet "
                f"({len(self.pending_shards())} of {self.n_shards} pending); rerun the teacher stage to finish the store"
            )
        return selection

    def read_raw(self, indices) -> np.ndarray:
        """Stored values ``(n, S, S)`` of ``codec.dtype`` for rows ``indices`` (``(S, S)`` for an int)."""
        return self._arrays["logits"].get_orthogonal_selection((self._selection(indices),))

    def read_logits(self, indices) -> np.ndarray:
        """Decoded teacher logits, float32 ``(n, S, S)`` (``(S, S)`` for an int index); mask = logits > 0.

        ``indices``: an int, a slice or a 1-D int sequence (any order, repeats allowed) of rows.
        Raises PipelineError when a row's shard is not written yet.
        """
        return decode_logits(self.read_raw(indices), self.codec)

    def read_meta(self, indices=slice(None)) -> dict[str, np.ndarray]:
        """Per-instance metadata for rows ``indices``: ``{name: array (n, ...)}`` for each of ``META_ARRAYS``."""
        rows = self._selection(indices)
        return {name: self._arrays[name].get_orthogonal_selection((rows,)) for name in META_ARRAYS}


def create_store(path: str | Path, *, n_instances: int, side: int, instances_per_shard: int, codec: str,
                 compression_level: int, attrs: Mapping[str, Any]) -> LogitStore:
    """Create the store at ``path``, or reopen it to resume: finished shards are kept.

    Call it once, before any writer starts. Creation is atomic (built beside ``path``, then renamed).

    Args:
        n_instances: rows ``N`` (the teacher's index length). side: stored side ``S`` (:func:`stored_side`).
        instances_per_shard: ``K``, rows per shard file and per writer task.
        codec: a name from ``codec.CODECS``. compression_level: Blosc-zstd level 1..9.
        attrs: JSON-serialisable description of the pass (:func:`teacher_attrs`).

    Raises:
        PipelineError: ``path`` holds something else, or a store with another layout, codec, teacher or code
            version (``attrs`` and the layout must match exactly to resume).
    """
    if n_instances < 1 or side < 1 or instances_per_shard < 1:
        raise ValueError(f"create_store: n_instances, side and instances_per_shard must be >= 1, got "
                         f"{n_instances}, {side}, {instances_per_shard}")
    if STORE_ATTR in attrs:
        raise ValueError(f"create_store: the attribute {STORE_ATTR!r} is reserved for the store layout")
    spec = get_codec(codec)
    layout = {
        "format_version": FORMAT_VERSION,
        "code_version": picosam_pipeline.__version__,
        "n_instances": n_instances,
        "side": side,
        "instances_per_shard": instances_per_shard,
        "n_shards": math.ceil(n_instances / instances_per_shard),
        "codec": spec.name,
        "compression_level": compression_level,
        # derived from the two above; also the logits array's attributes, for plain-zarr readers
        "encoding": {**spec.attrs(), "blosc": {"cname": "zstd", "clevel": compression_level, "shuffle": spec.shuffle}},
    }
    expected = json.loads(json.dumps({STORE_ATTR: layout, **attrs}))  # the JSON zarr will hand back
    path = Path(path)
    if path.is_file() or (path.is_dir() and any(path.iterdir())):
        try:
            store = open_store(path, writable=True)
        except PipelineError:
            raise PipelineError(f"{path} already exists and is not a teacher-logit store this code can resume; "
                                f"move or delete it, or set teacher.out to a new path") from None
        differences = _differences(_identity(store.attrs), _identity(expected))
        if differences:
            raise PipelineError(
                f"{path} holds a teacher-logit store made with a different layout or teacher "
                f"({'; '.join(differences[:5])}); delete it (rm -r {path}) to recompute, or set teacher.out to a new path"
            )
        for leftover in path.rglob("*.partial"):  # zarr's temporaries from a write killed mid-file
            leftover.unlink()
        return store
    building = path.with_name(path.name + ".creating")
    shutil.rmtree(building, ignore_errors=True)  # a creation killed half-way
    _build(building, layout, expected, compression_level)
    building.replace(path)
    return open_store(path, writable=True)


def open_store(path: str | Path, writable: bool = False) -> LogitStore:
    """Open an existing store (read-only unless ``writable``); PipelineError if ``path`` is not one."""
    path = Path(path)
    hint = "point to a teacher pass's output (data/teacher/stores/NAME.zarr: <teacher.stores_dir>/<NAME>.zarr)"
    try:
        group = zarr.open_group(path, mode="r+" if writable else "r")
    except (FileNotFoundError, zarr.errors.BaseZarrError):
        raise PipelineError(f"{path} is not a Zarr group, so not a teacher-logit store; {hint}") from None
    layout = group.attrs.get(STORE_ATTR)
    if not isinstance(layout, dict):
        raise PipelineError(f"{path} is a Zarr group without the {STORE_ATTR!r} attribute, so not a teacher-logit store; {hint}")
    if layout.get("format_version") != FORMAT_VERSION:
        raise PipelineError(f"{path} has logit-store format {layout.get('format_version')}, this code reads "
                            f"format {FORMAT_VERSION}; recompute it with this version (delete it and rerun the teacher stage)")
    return LogitStore(path, group, writable)


def _build(path: Path, layout: dict[str, Any], attrs: dict[str, Any], level: int) -> None:
    """Write the empty group and arrays (metadata only; chunks appear as shards are written)."""
    n, s, k = layout["n_instances"], layout["side"], layout["instances_per_shard"]
    codec = get_codec(layout["codec"])
    group = zarr.create_group(path, attributes=attrs)
    group.create_array(
        "logits", shape=(n, s, s), chunks=(1, s, s), shards=(k, s, s), dtype=codec.dtype, fill_value=0,
        compressors=BloscCodec(cname="zstd", clevel=level, shuffle=codec.shuffle),
        dimension_names=("instance", "y", "x"), attributes=layout["encoding"],
    )
    for name, (dtype, tail, description) in META_ARRAYS.items():
        group.create_array(
            name, shape=(n, *tail), chunks=(k, *tail), dtype=dtype, fill_value=0,
            compressors=BloscCodec(cname="zstd", clevel=level, shuffle="shuffle"),
            dimension_names=("instance", "xyxy")[: 1 + len(tail)], attributes={"description": description},
        )
    group.create_array(
        "shard_done", shape=(layout["n_shards"],), chunks=(1,), dtype="uint8", fill_value=0, compressors=None,
        dimension_names=("shard",),
        attributes={"description": f"1 once rows [k * {k}, (k + 1) * {k}) of every array are completely written"},
    )


def _checked(k: int, name: str, value, shape: tuple[int, ...], dtype: np.dtype, exact: bool = False) -> np.ndarray:
    """``value`` as a ``dtype`` array of exactly ``shape`` (no silent broadcasting or truncation); with ``exact``
    it must already be of ``dtype`` (codec values: a cast would silently reinterpret them)."""
    array = np.asarray(value)
    if array.shape != shape:
        raise ValueError(f"write_shard({k}): {name} has shape {array.shape}, expected {shape}")
    if exact and array.dtype != dtype:
        raise ValueError(f"write_shard({k}): encoded {name} must be {dtype}, got {array.dtype}")
    if np.dtype(dtype).kind in "iu" and array.dtype.kind not in "iu":
        raise ValueError(f"write_shard({k}): {name} must hold integers, got {array.dtype}")
    return array.astype(dtype, copy=False)


def _identity(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes that must match to resume a store (the derived ``encoding`` block left out)."""
    return {**attrs, STORE_ATTR: {k: v for k, v in attrs.get(STORE_ATTR, {}).items() if k != "encoding"}}


def _differences(found: Mapping[str, Any], expected: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Human-readable ``key: found != expected`` lines for two JSON trees."""
    out = []
    for key in sorted(set(found) | set(expected)):
        a, b, where = found.get(key), expected.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, where + ".")
        elif a != b:
            out.append(f"{where}: store has {a!r}, this run has {b!r}")
    return out
