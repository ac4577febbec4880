"""The teacher-logit store: the teacher's soft logits for every instance, in one Zarr v3 group.

Layout of the group (one per teacher pass, ``data/teacher/stores/<NAME>.zarr``); ``N`` instances, row ``i`` = row
``i`` of the teacher's instance index, ``S`` = stored side, ``K`` = instances per shard, ``n_shards = ceil(N / K)``:

================  ===========  =============  ===============  ============================================
array             shape        dtype          chunks / shards  content
================  ===========  =============  ===============  ============================================
``logits``        (N, S, S)    uint8/float16  (C,S,S)/(K,S,S)  codec values; decode rule in its attributes
``confidence``    (N,)         float32        (K,)             teacher's predicted IoU of the kept mask
``ann_id``        (N,)         int64          (M,)             COCO / LVIS annotation id
``image_id``      (N,)         int64          (M,)             image id
``crop_box``      (N, 4)       int32          (M, 4)           student crop x1, y1, x2, y2 (image px, half-open)
``stored_box``    (N, 4)       float64        (M, 4)           frame of ``logits``: crop_box + context margin
``shard_digest``  (n, 32)      uint8          (1, 32)          sha256 of shard k's files once it is complete
================  ===========  =============  ===============  ============================================

Logits pixel ``(v, u)`` of instance ``i`` samples image point ``x1 + (u + 0.5) * (x2 - x1) / S`` (same for y)
of ``stored_box[i]`` (the ``align_corners=False`` convention of ``crops.crop_pixel_centres``). The group's
``logit_store`` attribute holds the layout, codec, code version and the pass id; the caller's attributes
(:func:`teacher_attrs`) hold the teacher, its checkpoint sha256, the prompt convention and crop parameters.
Plain zarr reads it all: ``zarr.open_group(path, mode="r")["logits"][i]`` plus ``["logits"].attrs``.

``C`` (``chunk_rows``, 16 for ``auto`` shard sizes) instances share an inner chunk of a logits shard.

Files (format 2, for COCO scale). The id and box arrays are known before the teacher runs (they come from the
index), so :func:`create_store` writes them whole, in chunks of ``M = 2**20`` rows. A shard then costs three
files: its ``logits`` shard, its ``confidence`` chunk and its ``shard_digest`` row. ``instances_per_shard: auto``
(:func:`shard_size`) aims at 256 shards per store, 64 to 8,192 instances each: a COCO train2017 + val2017 store
(~897k instances) has 256 shards of 3,504 and ~780 files; a shard is ~4 s of SAM2.1-tiny on an H200, so a kill
loses seconds of teacher work and 256 tasks balance over many GPUs.

Proof of contents. Shard ``k``'s digest is the sha256 of the pass id and the bytes of its two data files, as they
are on disk. The pass id is a sha256 of the layout and attributes (teacher, params, index digest, id/box arrays),
so a shard written by another pass, a lost chunk file (zarr would read its fill value, zeros) or an altered one is
caught. Readers verify every shard they touch, once per open store (:meth:`LogitStore.verify_shard`), and name the
bad shard; a resumed teacher pass rewrites shards that fail.

Writing and crash safety. Writers own whole shards: :meth:`LogitStore.write_shard` for shard ``k`` touches
exactly its two data files and its digest row. It first deletes the digest row and the data files (zarr 3.1.6
reads an existing shard before rewriting it, even for a write that covers the whole shard, and fails on a
truncated one), writes the data, and only then the digest. So a shard is taken as done only after all its
files were written; killed at any moment, a rerun rewrites exactly the shards without a digest, and the result is
byte-identical to an uninterrupted run (the codecs and Blosc are deterministic). zarr 3.1.6's ``LocalStore``
also writes every file to ``<name>.<uuid>.partial`` and renames it into place, so no file is ever half
written in place; a kill can leave such temporaries behind, which :func:`create_store` removes. This covers
process death (SIGKILL, OOM, preemption), not power loss: zarr does not fsync.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

import picosam_pipeline
from picosam_pipeline.config import TeacherConfig
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.teacher.codec import CODECS, LogitCodec, decode_logits, encode_logits, get_codec
from picosam_pipeline.untrusted import (
    UntrustedInputError,
    file_type,
    load_json_bounded,
    read_bounded_bytes,
    require_regular_file,
    safe_text,
)

FORMAT_VERSION = 2  # 2: id/box arrays written at creation, per-shard digests (1: 7 files per shard, no digests)
STORE_ATTR = "logit_store"  # group attribute owned by this module; the rest belongs to the caller
DIGEST = "shard_digest"
META_CHUNK_ROWS = 1 << 20  # rows per chunk of the id/box arrays: one file each up to ~1M instances
AUTO_SHARDS, MIN_AUTO_SHARD, MAX_AUTO_SHARD = 256, 64, 8192
MAX_CHUNK_ROWS = 16  # instances per inner chunk of the logits (zarr's per-chunk cost dominates 1-row chunks)
# Bounds on what an untrusted store may declare, checked before zarr reads or allocates anything: teacher.store_size
# is at most 1024 and context_margin at most 1, so S <= 3 * 1024; a zarr.json is a few KB (the group's holds the
# teacher's config); a chunk file holds at most its raw bytes plus Blosc's and the shard index's few bytes per chunk.
MAX_STORED_SIDE = 3 * 1024
MAX_SHARD_ROWS = 1 << 24
MAX_METADATA_BYTES = 1 << 20
MAX_METADATA_DEPTH = 32
CHUNK_SLACK = 4096  # bytes over a chunk's raw size a file may have: Blosc header and block offsets, shard index
METADATA_FILES = ("zarr.json", ".zgroup", ".zattrs", ".zarray", ".zmetadata")  # zarr reads whichever exist

# name -> (dtype, trailing shape, description): the rows' identity, from the index, written by create_store.
INDEX_ARRAYS: dict[str, tuple[str, tuple[int, ...], str]] = {
    "ann_id": ("int64", (), "COCO / LVIS annotation id"),
    "image_id": ("int64", (), "image id"),
    "crop_box": ("int32", (4,), "student crop (x1, y1, x2, y2), image pixels, half-open"),
    "stored_box": (
        "float64",
        (4,),
        "frame of the stored logits (x1, y1, x2, y2), image pixels: crop_box + context margin",
    ),
}
CONFIDENCE = ("float32", (), "teacher's predicted IoU of the kept mask")
META_ARRAYS = (*INDEX_ARRAYS, "confidence")  # what read_meta returns
SHARD_ARRAYS = ("logits", "confidence")  # written per shard by the teacher, covered by the shard's digest

# Teacher settings that change how the pass runs but not one stored byte; left out of the attributes so
# that resuming on another cluster (or with the store moved) is not refused as a different teacher.
EXECUTION_FIELDS = (
    "executor",
    "scheduler_address",
    "n_workers",
    "threads_per_worker",
    "out",
    "stores_dir",
    "name",
    "checkpoints_dir",
    "onnx_dir",
    "images_per_batch",
)

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


def shard_size(instances_per_shard: int | str, n_instances: int) -> int:
    """Instances per shard ``K``: the given number, or for ``"auto"`` about ``n_instances / 256`` within [64, 8192].

    ``auto`` keeps a store at ~256 shards (~780 files) up to ~2M instances, whatever the dataset's size, while a
    shard stays small enough (seconds of GPU teacher work) to lose on a kill and to balance over many workers.
    """
    if instances_per_shard == "auto":  # a multiple of 16, so that inner chunks of 16 rows tile the shard
        per_shard = MAX_CHUNK_ROWS * math.ceil(n_instances / AUTO_SHARDS / MAX_CHUNK_ROWS)
        return int(min(MAX_AUTO_SHARD, max(MIN_AUTO_SHARD, per_shard)))
    return int(instances_per_shard)


def chunk_rows(instances_per_shard: int) -> int:
    """Rows per inner ``logits`` chunk: the largest divisor of the shard size up to 16 (zarr needs chunks that tile a
    shard). Reading one instance decodes its chunk (16 x 9 KB at most); writing and reading whole shards, what the
    teacher pass and ``pack`` do, is ~5x faster than with 1-row chunks (zarr 3.1's cost per chunk dominates)."""
    return max(d for d in range(1, MAX_CHUNK_ROWS + 1) if instances_per_shard % d == 0)


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
        self.pass_id: str = layout["pass_id"]
        self.codec: LogitCodec = get_codec(layout["codec"])
        self._arrays = {name: group[name] for name in (*META_ARRAYS, "logits", DIGEST)}
        # the most bytes each shard data file may hold (the folder name is the array's)
        self._file_limit = {name: _chunk_bytes(self._arrays[name]) for name in SHARD_ARRAYS}
        self._verified: set[int] = set()  # shards whose files matched their digest in this process

    def __len__(self) -> int:
        return self.n_instances

    def __repr__(self) -> str:
        return (
            f"LogitStore({str(self.path)!r}, {self.n_instances} x {self.side}x{self.side} {self.codec.name}, "
            f"{self.n_shards} shards of {self.instances_per_shard})"
        )

    def __reduce__(self):  # dask ships a store to workers by path; each process opens its own zarr objects
        return open_store, (self.path, self.writable)

    def shard_slice(self, k: int) -> slice:
        """The instance rows ``start:stop`` that shard ``k`` holds."""
        if not 0 <= k < self.n_shards:
            raise IndexError(f"shard {k} out of range: the store has {self.n_shards} shards")
        start = k * self.instances_per_shard
        return slice(start, min(start + self.instances_per_shard, self.n_instances))

    def shard_files(self, k: int) -> list[Path]:
        """Shard ``k``'s data files (its ``logits`` shard and ``confidence`` chunk), in digest order."""
        return [
            self.path / name / self._arrays[name].metadata.encode_chunk_key((k,) + (0,) * (self._arrays[name].ndim - 1))
            for name in SHARD_ARRAYS
        ]

    def digests(self) -> np.ndarray:
        """uint8 ``(n_shards, 32)``: each shard's recorded digest, zeros while it is not complete (read fresh)."""
        return self._arrays[DIGEST][:]

    def done_shards(self) -> np.ndarray:
        """Bool ``(n_shards,)``: which shards carry a digest, i.e. were completely written (read fresh on every
        call)."""
        return self.digests().any(axis=1)

    def pending_shards(self) -> list[int]:
        """Shard numbers still to write, ascending (what a resumed run hands out as tasks)."""
        return np.flatnonzero(~self.done_shards()).tolist()

    def file_digest(self, k: int) -> bytes:
        """sha256 of the pass id and shard ``k``'s data files as they are on disk (b"" for a missing file)."""
        digest = hashlib.sha256(self.pass_id.encode())
        for name, file in zip(SHARD_ARRAYS, self.shard_files(k)):
            digest.update(file.name.encode())
            try:
                digest.update(read_bounded_bytes(file, f"shard {k} file {str(file)!r}", self._file_limit[name]))
            except UntrustedInputError as err:  # missing, not a regular file or too large: never equal to a digest
                digest.update(f"<{err.kind}>".encode())
        return digest.digest()

    def shard_problem(self, k: int, recorded: np.ndarray | None = None) -> str | None:
        """Why shard ``k`` cannot be trusted (missing or altered file, other pass, not written), or None if it is
        sound."""
        recorded = self._arrays[DIGEST][k] if recorded is None else recorded
        if not recorded.any():
            return "not written yet"
        if self.file_digest(k) == bytes(recorded):
            return None
        missing = [f.relative_to(self.path).as_posix() for f in self.shard_files(k) if not f.exists()]
        if missing:
            return f"file {', '.join(missing)} is missing"
        for file in self.shard_files(k):
            try:
                require_regular_file(file, file.relative_to(self.path).as_posix())
            except UntrustedInputError as err:
                return str(err)
        return (
            "its files differ from what the teacher wrote (altered, or written by another teacher pass: "
            f"{', '.join(f.relative_to(self.path).as_posix() for f in self.shard_files(k))})"
        )

    def verify_shard(self, k: int) -> None:
        """Raise PipelineError naming shard ``k`` unless its files match its digest (checked once per open store)."""
        if k in self._verified:
            return
        problem = self.shard_problem(k)
        if problem:
            raise PipelineError(
                f"{self.path}: shard {k} (rows {self.shard_slice(k).start}:{self.shard_slice(k).stop}) cannot be read: "
                f"{problem}. Rerun the teacher stage: it rewrites every shard that fails its digest"
                + (
                    ""
                    if problem == "not written yet"
                    else " (or `dvc pull` / `dvc checkout` the store if it came from a remote)"
                )
            )
        self._verified.add(k)

    def failing_shards(self) -> list[int]:
        """Shards marked complete whose files do not match their digest (reads every complete shard once)."""
        digests = self.digests()
        return [k for k in np.flatnonzero(digests.any(axis=1)).tolist() if self.shard_problem(k, digests[k])]

    def write_shard(self, k: int, logits: np.ndarray, *, confidence, encoded: bool = False) -> None:
        """Encode and write shard ``k`` (rows ``shard_slice(k)``, ``n`` of them), then record its digest.

        Args:
            logits: float32 ``(n, S, S)`` teacher logits in the ``stored_box`` frame (any finite range); with
                ``encoded``, the codec's values already (``codec.dtype``, e.g. from ``codec.encode_logits_torch``).
            confidence: float ``(n,)``, the teacher's predicted IoU of each kept mask.
        """
        if not self.writable:
            raise PermissionError(f"{self.path} is open read-only; writers get their store from create_store()")
        rows = self.shard_slice(k)
        n = rows.stop - rows.start
        shape = (n, self.side, self.side)
        values = {
            "logits": _checked(k, "logits", logits, shape, np.dtype(self.codec.dtype), exact=True)
            if encoded
            else encode_logits(_checked(k, "logits", logits, shape, np.float32), self.codec),
            "confidence": _checked(k, "confidence", confidence, (n,), np.dtype(CONFIDENCE[0])),
        }
        digest = self._arrays[DIGEST]
        digest[k] = 0  # un-commit first when rewriting a finished shard (fill value: its file is deleted)
        self._verified.discard(k)
        for file in self.shard_files(k):  # a previous attempt's files, possibly truncated on a non-atomic store
            file.unlink(missing_ok=True)
        for name in SHARD_ARRAYS:
            self._arrays[name][rows] = values[name]
        digest[k] = np.frombuffer(self.file_digest(k), np.uint8)  # the commit: written last, its own file

    def _selection(self, indices) -> int | slice | np.ndarray:
        """``indices`` (int, slice or 1-D int sequence) as a zarr row selection whose shards are all verified."""
        n = self.n_instances
        if isinstance(indices, slice):
            start, stop, step = indices.indices(n)
            rows = np.arange(start, stop, step)
            selection: int | slice | np.ndarray = slice(start, stop, step) if step > 0 else rows
        else:
            picked = np.asarray(indices)
            if picked.ndim > 1 or (picked.size and picked.dtype.kind not in "iu"):
                raise IndexError(
                    f"rows must be an int, a slice or a 1-D int sequence, got {picked.dtype} of shape {picked.shape}"
                )
            if ((picked < -n) | (picked >= n)).any():
                raise IndexError(f"row index out of range for a store of {n} instances")
            rows = picked.astype(np.int64) % n  # wraps negatives like numpy
            selection = int(rows) if rows.ndim == 0 else rows
        shards = np.unique(np.atleast_1d(rows) // self.instances_per_shard)
        unverified = [int(k) for k in shards if int(k) not in self._verified]
        if unverified:  # only these shards' digest rows are read: a block read costs its own shards, not the store's
            recorded = {k: self._arrays[DIGEST][k] for k in unverified}
            missing = [k for k in unverified if not recorded[k].any()]
            if missing:
                raise PipelineError(
                    f"{self.path}: shards {missing[:8]}{' ...' if len(missing) > 8 else ''} are not written yet "
                    f"({len(self.pending_shards())} of {self.n_shards} pending); rerun the teacher stage to finish "
                    "the store"
                )
            for k in unverified:
                if self.shard_problem(k, recorded[k]):
                    self.verify_shard(k)  # raises, naming the shard and the problem
                self._verified.add(k)
        return selection

    def read_raw(self, indices) -> np.ndarray:
        """Stored values ``(n, S, S)`` of ``codec.dtype`` for rows ``indices`` (``(S, S)`` for an int)."""
        return self._arrays["logits"].get_orthogonal_selection((self._selection(indices),))

    def read_logits(self, indices) -> np.ndarray:
        """Decoded teacher logits, float32 ``(n, S, S)`` (``(S, S)`` for an int index); mask = logits > 0.

        ``indices``: an int, a slice or a 1-D int sequence (any order, repeats allowed) of rows.
        Raises PipelineError when a row's shard is not written yet or fails its digest.
        """
        return decode_logits(self.read_raw(indices), self.codec)

    def read_meta(self, indices=slice(None)) -> dict[str, np.ndarray]:
        """Per-instance metadata for rows ``indices``: ``{name: array (n, ...)}`` for each of ``META_ARRAYS``."""
        rows = self._selection(indices)
        return {name: self._arrays[name].get_orthogonal_selection((rows,)) for name in META_ARRAYS}


def create_store(
    path: str | Path,
    *,
    side: int,
    instances_per_shard: int | str,
    codec: str,
    compression_level: int,
    attrs: Mapping[str, Any],
    rows: Mapping[str, np.ndarray],
) -> LogitStore:
    """Create the store at ``path``, or reopen it to resume: shards that pass their digest are kept.

    Call it once, before any writer starts. Creation is atomic (built beside ``path``, then renamed).

    Args:
        side: stored side ``S`` (:func:`stored_side`).
        instances_per_shard: ``K``, rows per shard file and per writer task, or ``"auto"`` (:func:`shard_size`).
        codec: a name from ``codec.CODECS``. compression_level: Blosc-zstd level 1..9.
        attrs: JSON-serialisable description of the pass (:func:`teacher_attrs`).
        rows: the rows' identity, ``N`` each: ``ann_id``, ``image_id`` int ``(N,)``, ``crop_box`` int ``(N, 4)``,
            ``stored_box`` float ``(N, 4)`` (``INDEX_ARRAYS``).

    Raises:
        PipelineError: ``path`` holds something else, or a store with another layout, codec, teacher, rows or
            code version (``attrs``, ``rows`` and the layout must match exactly to resume).
    """
    if STORE_ATTR in attrs:
        raise ValueError(f"create_store: the attribute {STORE_ATTR!r} is reserved for the store layout")
    if set(rows) != set(INDEX_ARRAYS):
        raise ValueError(f"create_store: rows must hold exactly {sorted(INDEX_ARRAYS)}, got {sorted(rows)}")
    n_instances = len(rows["ann_id"])
    meta = {
        name: _checked(-1, name, rows[name], (n_instances, *tail), np.dtype(dtype))
        for name, (dtype, tail, _) in INDEX_ARRAYS.items()
    }
    per_shard = shard_size(instances_per_shard, n_instances)
    if n_instances < 1 or side < 1 or per_shard < 1:
        raise ValueError(
            f"create_store: n_instances, side and instances_per_shard must be >= 1, got "
            f"{n_instances}, {side}, {per_shard}"
        )
    spec = get_codec(codec)
    layout = {
        "format_version": FORMAT_VERSION,
        "code_version": picosam_pipeline.__version__,
        "n_instances": n_instances,
        "side": side,
        "instances_per_shard": per_shard,
        "n_shards": math.ceil(n_instances / per_shard),
        "chunk_rows": chunk_rows(per_shard),
        "codec": spec.name,
        "compression_level": compression_level,
        "rows_sha256": _rows_digest(meta),
        # derived from the two above; also the logits array's attributes, for plain-zarr readers
        "encoding": {**spec.attrs(), "blosc": {"cname": "zstd", "clevel": compression_level, "shuffle": spec.shuffle}},
    }
    expected = json.loads(json.dumps({STORE_ATTR: layout, **attrs}))  # the JSON zarr will hand back
    layout["pass_id"] = expected[STORE_ATTR]["pass_id"] = hashlib.sha256(
        json.dumps(expected, sort_keys=True).encode()
    ).hexdigest()
    path = Path(path)
    if path.is_file() or (path.is_dir() and any(path.iterdir())):
        try:
            store = open_store(path, writable=True)
        except PipelineError:
            raise PipelineError(
                f"{path} already exists and is not a teacher-logit store this code can resume; "
                f"move or delete it, or set teacher.out to a new path"
            ) from None
        differences = _differences(_identity(store.attrs), _identity(expected))
        if differences:
            raise PipelineError(
                f"{path} holds a teacher-logit store made with a different layout or teacher "
                f"({'; '.join(differences[:5])}); delete it (rm -r {path}) to recompute, or set teacher.out to a "
                "new path"
            )
        for leftover in path.rglob("*.partial"):  # zarr's temporaries from a write killed mid-file
            leftover.unlink()
        for k in store.failing_shards():  # lost or altered since: un-commit, so the pass rewrites it
            store._arrays[DIGEST][k] = 0
        return store
    building = path.with_name(path.name + ".creating")
    shutil.rmtree(building, ignore_errors=True)  # a creation killed half-way
    _build(building, layout, expected, compression_level, meta)
    building.replace(path)
    return open_store(path, writable=True)


def is_logit_store(path: str | Path) -> bool:
    """Whether ``path`` holds a teacher-logit store of any format version (one this code wrote, perhaps an older
    one)."""
    try:
        _check_metadata_files(Path(path))
        return isinstance(zarr.open_group(Path(path), mode="r").attrs.get(STORE_ATTR), dict)
    except (FileNotFoundError, zarr.errors.BaseZarrError, PipelineError):
        return False


def open_store(path: str | Path, writable: bool = False) -> LogitStore:
    """Open an existing store (read-only unless ``writable``); PipelineError if ``path`` is not one."""
    path = Path(path)
    hint = "point to a teacher pass's output (data/teacher/stores/NAME.zarr: <teacher.stores_dir>/<NAME>.zarr)"
    _check_metadata_files(path)
    try:
        group = zarr.open_group(path, mode="r+" if writable else "r")
    except (FileNotFoundError, zarr.errors.BaseZarrError):
        raise PipelineError(f"{path} is not a Zarr group, so not a teacher-logit store; {hint}") from None
    except (ValueError, TypeError, KeyError) as err:  # zarr's own parse of metadata of the wrong structure
        raise _refused(path, f"its zarr.json does not describe a Zarr group ({safe_text(str(err))})") from None
    layout = group.attrs.get(STORE_ATTR)
    if not isinstance(layout, dict):
        raise PipelineError(
            f"{path} is a Zarr group without the {STORE_ATTR!r} attribute, so not a teacher-logit store; {hint}"
        )
    if layout.get("format_version") != FORMAT_VERSION:
        raise PipelineError(
            f"{path} has logit-store format {layout.get('format_version')}, this code reads "
            f"format {FORMAT_VERSION}; recompute it with this version (delete it and rerun the teacher stage)"
        )
    _check_layout(path, layout)
    try:
        missing = [name for name in (*META_ARRAYS, "logits", DIGEST) if name not in group]
        if missing:
            raise PipelineError(
                f"{path}: the store has lost its arrays {missing}; delete it and rerun the teacher stage "
                "(or `dvc checkout` / `dvc pull` it)"
            )
        _check_arrays(path, group, layout)
    except (ValueError, TypeError, KeyError) as err:  # zarr's own parse of an array's metadata
        raise _refused(path, f"an array's zarr.json is not valid Zarr metadata ({safe_text(str(err))})") from None
    _check_chunk_files(path, group, layout)
    return LogitStore(path, group, writable)


# --------------------------------------------------------------------------------------------------
# an untrusted store: its metadata and files checked before they are used


def _refused(path: Path, problem: str) -> PipelineError:
    """The one paragraph for a store whose metadata or files cannot be what the teacher stage wrote."""
    return PipelineError(
        f"{path} is not a teacher-logit store this code can read: {problem}. It is damaged or was not written by "
        "the teacher stage; rerun the teacher stage into a new teacher.out (or `dvc pull` / `dvc checkout` it)"
    )


def _check_metadata_files(path: Path) -> None:
    """Every zarr metadata file of the group and its arrays is a regular file of bounded size holding a JSON object
    of bounded nesting: zarr parses them without bounds (a FIFO blocks it, deep nesting is a RecursionError)."""
    folders = [path, *(path / name for name in (*META_ARRAYS, "logits", DIGEST))]
    for folder in folders:
        for name in METADATA_FILES:
            file = folder / name
            if not os.path.lexists(file):
                continue
            what = f"zarr metadata file {str(file)!r}"
            document = load_json_bounded(read_bounded_bytes(file, what, MAX_METADATA_BYTES), what, MAX_METADATA_DEPTH)
            if not isinstance(document, dict):
                raise _refused(path, f"{file.relative_to(path)} holds a JSON {type(document).__name__}, not an object")


def _shown(value: Any) -> str:
    """An untrusted attribute value as it appears in a message (repr, so "10" and 10 differ; printable, cut short)."""
    return safe_text(repr(value), 80)


def _whole(value: Any, low: int, high: int) -> int | None:
    """``value`` if it is an int in ``[low, high]`` (not a bool or float), else None."""
    return value if type(value) is int and low <= value <= high else None


def _check_layout(path: Path, layout: Mapping[str, Any]) -> None:
    """The ``logit_store`` attribute's fields have their types and ranges and agree with each other."""
    bounds = {"n_instances": (1, 1 << 40), "side": (1, MAX_STORED_SIDE), "instances_per_shard": (1, MAX_SHARD_ROWS)}
    for name, (low, high) in bounds.items():
        if _whole(layout.get(name), low, high) is None:
            raise _refused(
                path,
                f"attribute {STORE_ATTR}.{name} is {_shown(layout.get(name))}, expected a whole number in "
                f"[{low}, {high}]",
            )
    n, k = layout["n_instances"], layout["instances_per_shard"]
    derived = {"n_shards": math.ceil(n / k), "chunk_rows": chunk_rows(k)}
    for name, expected in derived.items():
        if layout.get(name) != expected or type(layout.get(name)) is not int:
            raise _refused(
                path,
                f"attribute {STORE_ATTR}.{name} is {_shown(layout.get(name))}, but {n} instances in shards of "
                f"{k} make {expected}",
            )
    if not isinstance(layout.get("codec"), str) or layout["codec"] not in CODECS:
        raise _refused(
            path, f"attribute {STORE_ATTR}.codec is {_shown(layout.get('codec'))}, expected one of {sorted(CODECS)}"
        )
    pass_id = layout.get("pass_id")
    if not isinstance(pass_id, str) or len(pass_id) != 64 or any(c not in "0123456789abcdef" for c in pass_id):
        raise _refused(path, f"attribute {STORE_ATTR}.pass_id is {_shown(pass_id)}, expected 64 hex digits")


def _expected_arrays(layout: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...], bool]]:
    """name -> (dtype, shape, chunk shape, compressed) of each array, as :func:`_build` creates them for ``layout``
    (for ``logits`` the chunk shape is the shard's; its inner chunks are checked separately)."""
    n, s, k = layout["n_instances"], layout["side"], layout["instances_per_shard"]
    rows = min(n, META_CHUNK_ROWS)
    expected = {name: (dtype, (n, *tail), (rows, *tail), True) for name, (dtype, tail, _) in INDEX_ARRAYS.items()}
    expected["confidence"] = (CONFIDENCE[0], (n,), (k,), True)
    expected["logits"] = (get_codec(layout["codec"]).dtype, (n, s, s), (k, s, s), True)
    expected[DIGEST] = ("uint8", (layout["n_shards"], 32), (1, 32), False)
    return expected


def _check_arrays(path: Path, group: zarr.Group, layout: Mapping[str, Any]) -> None:
    """Each array's metadata is what :func:`_build` writes for ``layout``: shape, dtype, chunks and codecs (Blosc
    only; gzip or another codec could expand a small file without bound)."""
    for name, (dtype, shape, chunks, compressed) in _expected_arrays(layout).items():
        array = group[name]
        if not isinstance(array, zarr.Array):
            raise _refused(path, f"{name} is a {type(array).__name__}, not an array")
        found = (str(array.dtype), array.shape, array.shards or array.chunks)
        if found != (dtype, shape, chunks):
            raise _refused(
                path,
                f"array {name} is {found[0]} of shape {found[1]} in chunks of {found[2]}, but the layout attribute "
                f"({layout['n_instances']} instances of side {layout['side']}, {layout['instances_per_shard']} per "
                f"shard) makes it {dtype} of shape {shape} in chunks of {chunks}",
            )
        if name == "logits" and array.chunks != (layout["chunk_rows"], *shape[1:]):
            raise _refused(
                path, f"array logits has inner chunks {array.chunks}, the layout says {layout['chunk_rows']} rows"
            )
        codecs = [type(c) for c in (*array.filters, *array.compressors)]
        if codecs != ([BloscCodec] if compressed else []) or not isinstance(array.serializer, BytesCodec):
            raise _refused(path, f"array {name} uses the codecs {array.metadata.codecs}; the store writes Blosc only")
        if not isinstance(array.metadata.chunk_key_encoding, DefaultChunkKeyEncoding):
            raise _refused(path, f"array {name} has chunk key encoding {array.metadata.chunk_key_encoding}")
        for codec in array.metadata.codecs:
            inner = getattr(codec, "index_codecs", ())
            if any(not isinstance(c, (BytesCodec, Crc32cCodec)) for c in inner):
                raise _refused(path, f"array {name} has shard index codecs {inner}")


def _chunk_bytes(array: zarr.Array) -> int:
    """The most bytes one of ``array``'s chunk (shard) files can hold: its raw bytes plus per-chunk overhead."""
    shape = array.shards or array.chunks
    inner = math.prod(shape) // math.prod(array.chunks)  # inner chunks per shard file (1 unsharded)
    return math.prod(shape) * array.dtype.itemsize + CHUNK_SLACK * (inner + 1)


def _check_chunk_files(path: Path, group: zarr.Group, layout: Mapping[str, Any]) -> None:
    """Every file under an array's folder is a regular file no larger than a chunk of it can be, and each id/box
    array (written whole at creation) has all its chunk files: the instance count is backed by files on disk."""
    for name in (*META_ARRAYS, "logits", DIGEST):
        array = group[name]
        limit = _chunk_bytes(array)
        files = _chunk_files(path, path / name / "c", array.ndim - 1)
        for file, mode, size in files:
            where = file.relative_to(path).as_posix()
            if not stat.S_ISREG(mode):
                raise _refused(path, f"{where} is {file_type(mode)}, not a regular file (only regular files are read)")
            if size > limit:
                raise _refused(path, f"{where} holds {size:,} bytes; a chunk of array {name} holds at most {limit:,}")
        if name in INDEX_ARRAYS:
            expected = math.ceil(layout["n_instances"] / array.chunks[0])
            found = sum(1 for file, _, _ in files if not file.name.endswith(".partial"))
            if found != expected:
                raise _refused(
                    path,
                    f"array {name} has {found} chunk files, but {layout['n_instances']} instances make {expected} "
                    f"(it is written whole when the store is created)",
                )


def _chunk_files(root: Path, folder: Path, levels: int) -> list[tuple[Path, int, int]]:
    """``(path, st_mode, st_size)`` of every entry ``levels`` folders below ``folder`` (where an array's chunk keys
    put its files; symlinks followed) and of anything not a folder above that depth."""
    found: list[tuple[Path, int, int]] = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return found
    except OSError as err:
        raise _refused(root, f"{folder.relative_to(root)} cannot be listed ({err.strerror or err})") from None
    for entry in entries:
        try:
            info = entry.stat()
        except OSError as err:  # a dangling symlink: a lost DVC cache file
            raise _refused(
                root, f"{Path(entry.path).relative_to(root)} cannot be read ({err.strerror or err})"
            ) from None
        if levels > 0 and stat.S_ISDIR(info.st_mode) and not entry.is_symlink():
            found += _chunk_files(root, Path(entry.path), levels - 1)
        else:
            found.append((Path(entry.path), info.st_mode, info.st_size))
    return found


def _build(path: Path, layout: dict[str, Any], attrs: dict[str, Any], level: int, meta: dict[str, np.ndarray]) -> None:
    """Write the group, the empty per-shard arrays and the id/box arrays (``meta``) whole."""
    n, s, k = layout["n_instances"], layout["side"], layout["instances_per_shard"]
    codec = get_codec(layout["codec"])
    group = zarr.create_group(path, attributes=attrs)
    group.create_array(
        "logits",
        shape=(n, s, s),
        chunks=(layout["chunk_rows"], s, s),
        shards=(k, s, s),
        dtype=codec.dtype,
        fill_value=0,
        compressors=BloscCodec(cname="zstd", clevel=level, shuffle=codec.shuffle),
        dimension_names=("instance", "y", "x"),
        attributes=layout["encoding"],
    )
    arrays = {**INDEX_ARRAYS, "confidence": CONFIDENCE}
    for name, (dtype, tail, description) in arrays.items():
        rows = k if name == "confidence" else min(n, META_CHUNK_ROWS)
        array = group.create_array(
            name,
            shape=(n, *tail),
            chunks=(rows, *tail),
            dtype=dtype,
            fill_value=0,
            compressors=BloscCodec(cname="zstd", clevel=level, shuffle="shuffle"),
            dimension_names=("instance", "xyxy")[: 1 + len(tail)],
            attributes={"description": description},
        )
        if name in meta:
            array[:] = meta[name]
    group.create_array(
        DIGEST,
        shape=(layout["n_shards"], 32),
        chunks=(1, 32),
        dtype="uint8",
        fill_value=0,
        compressors=None,
        dimension_names=("shard", "byte"),
        attributes={
            "description": f"sha256 of the pass id and shard k's files (logits, confidence: rows "
            f"[k * {k}, (k + 1) * {k})), written once both are complete; zeros = not written"
        },
    )


def _rows_digest(meta: Mapping[str, np.ndarray]) -> str:
    """sha256 of the id/box arrays (names, dtypes, shapes, bytes): which rows the store is for."""
    digest = hashlib.sha256()
    for name in INDEX_ARRAYS:
        array = np.ascontiguousarray(meta[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _checked(k: int, name: str, value, shape: tuple[int, ...], dtype: np.dtype, exact: bool = False) -> np.ndarray:
    """``value`` as a ``dtype`` array of exactly ``shape`` (no silent broadcasting or truncation); with ``exact``
    it must already be of ``dtype`` (codec values: a cast would silently reinterpret them). ``k`` < 0: creation."""
    where = f"write_shard({k})" if k >= 0 else "create_store"
    array = np.asarray(value)
    if array.shape != shape:
        raise ValueError(f"{where}: {name} has shape {array.shape}, expected {shape}")
    if exact and array.dtype != dtype:
        raise ValueError(f"{where}: encoded {name} must be {dtype}, got {array.dtype}")
    if np.dtype(dtype).kind in "iu" and array.dtype.kind not in "iu":
        raise ValueError(f"{where}: {name} must hold integers, got {array.dtype}")
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
