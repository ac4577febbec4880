"""WebDataset shards of distillation samples: the sample format, the shard index, and packing.

One sample per instance, tar members ``<ann_id>.<ext>`` (``T`` = stored side, see Frames), one logits member
per teacher pass packed (``pack.teachers``, e.g. ``sam2`` and ``sam3``; format version 2):

=====================  ====================================================================================
member                 content
=====================  ====================================================================================
``jpg``                image crop, RGB JPEG ``T x T``: the stored frame of the image, bilinear (PIL)
``mask.png``           ground-truth mask crop, 1-bit PNG ``T x T``: the same frame, nearest
``logits.<NAME>.png``  teacher NAME's logits exactly as its store keeps them, lossless: uint8 codec values as an
                       8-bit grayscale PNG (the float16 codec: its bit patterns as a 16-bit PNG)
``json``               record: ``ann_id``, ``image_id``, ``category_id``, ``area``, ``split``, ``crop_box``,
                       ``stored_box``, ``frame`` {``crop_size`` S, ``stored_size`` T}, ``confidence``
                       {NAME: the teacher's confidence in [0, 1]}, ``logits`` {NAME: {``codec``, ``decode``}}
=====================  ====================================================================================

Every teacher's store covers the same crop boxes (pack checks it), so all members share one frame. Format 1
(one ``logits.png``, before two-teacher packs) is refused with a message to repack.

Frames. All three arrays cover the teacher store's ``stored_box``: the student's ``crop_box`` (computed
by the teacher stage from the index with the configured prompt convention) grown by ``k = (T - S) / 2``
crop pixels per side (the teacher's ``context_margin``; with the default 0, stored_box = crop_box and
T = S = 96). Pixel ``(v, u)`` samples image point ``x1 + (u + 0.5) (x2 - x1) / T`` of stored_box (the
``align_corners=False`` convention of ``crops.crop_pixel_centres``), so image, mask and logits are
pixel-aligned and ``[k:k+S, k:k+S]`` of each is the student's crop; the margin lets the loader jitter the
box without a second trip to the images. Beyond the image border the image and mask repeat their edge
pixels, as the stored logits do (``teacher/geometry.py``). With no margin this is exactly PicoSAM's
``image.crop(box).resize((96, 96), BILINEAR)`` (``NEAREST`` for the mask).

What a sample costs: a JPEG q90 crop, the logits as a PNG at zlib level 6 (level 9 saves ~5 % at 5x the encoding
time, which made it pack's largest cost at COCO scale; lossless WebP is smaller but not a format the loader
accepts), the mask PNG, the JSON, and a 512-byte tar header and padding per member. ``bench/loader.py`` prints the
bytes per sample of a whole pack; noise logits (a random-weights teacher) cost about three times real ones.

Layout: ``<out_dir>/<split>/shard-000000.tar ...`` and ``<out_dir>/<split>/shards.json`` (:class:`ShardIndex`:
frame, codec, the crop convention (``crop``: ``crops.crop_convention``, PicoSAM3 ROI or PicoSAM2 point window and its
parameters), and every shard with its sample count, size and sha256).

Packing (:func:`pack_split`): a seeded permutation of the split's instances decides each sample's position,
so every shard is a uniform random sample of the split, and each image is still decoded once. Pass 1
walks the images in index order and appends each encoded sample to a spill file of its destination shard;
pass 2 puts each spill into permutation order and writes the final shard. Memory stays at one shard; the
disk traffic is twice the shard bytes. Encoders and tar headers (fixed mtime and owner) are deterministic,
so a rerun reproduces every sha256.
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

from picosam_pipeline.data.checksums import sha256_file
from picosam_pipeline.data.images import load_rgb
from picosam_pipeline.data.index import decode_mask_window, stream_images
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.parallel import default_workers, ordered_map, worker_pool
from picosam_pipeline.teacher.codec import LogitCodec, get_codec
from picosam_pipeline.teacher.store import MAX_STORED_SIDE, LogitStore
from picosam_pipeline.untrusted import load_json_bounded, read_bounded_bytes, safe_text

INDEX_FILE = "shards.json"
# Bounds on what an untrusted shards.json and shard may declare, checked before anything is read or allocated:
# the index lists ~150 bytes per shard (64 MiB: ~400k shards); pack.samples_per_shard is at most 100,000; a
# sample's JSON record is ~500 bytes; a tar archive ends with up to a 10 KiB record of padding.
MAX_INDEX_BYTES = 64 << 20
MAX_SAMPLES_PER_SHARD = 100_000
MAX_RECORD_BYTES = 64 << 10
TAR_SLACK = 20 << 10
SHARD_NAME = "shard-{:06d}.tar"
FORMAT, FORMAT_VERSION = "picosam-shards", 2
# A member is "<key>.<ext>", the key a plain name and ext one of sample_members(); anything else is not ours
# (see loader.py). Teacher names follow config.TEACHER_NAME.
MEMBER_NAME = re.compile(r"^([^./]+)\.(jpg|mask\.png|logits\.[a-z][a-z0-9_]{0,31}\.png|json)$")

# Fixed tar header fields: the same samples give byte-identical shards, hence stable sha256s (and DVC hashes).
# mtime must be an int: Python's tarfile stores a float mtime (webdataset's default, time.time()) in an extra
# 1 KB PAX header per member, which made a 96x96 sample 11.5 KB instead of 7.4 KB.
TAR_OPTIONS: dict[str, Any] = {"encoder": False, "mtime": 0, "user": "picosam", "group": "picosam"}
# The index columns pack holds for the whole split (ids and both crop conventions' boxes: about 40 bytes a row);
# the rest (RLE strings, paths: ten times more) is streamed image by image (index.stream_images).
INDEX_COLUMNS = ["ann_id", "image_id", "roi_box", "point_box"]
STREAMED_COLUMNS = ["category_id", "area", "rle_counts"]


def logits_member(teacher: str) -> str:
    """The member holding teacher pass ``teacher``'s logits: ``logits.<teacher>.png``."""
    return f"logits.{teacher}.png"


def sample_members(teachers: Iterable[str]) -> tuple[str, ...]:
    """Every member of a sample packed with ``teachers``, in write order."""
    return ("jpg", "mask.png", *(logits_member(t) for t in teachers), "json")


@dataclass(frozen=True)
class Frame:
    """Sides of the student's crop ``S`` (``crop_size``) and of the stored frame ``T`` (``stored_size``)."""

    crop_size: int
    stored_size: int

    @property
    def context_px(self) -> int:
        """``k``: stored pixels on each side of the crop; the crop is ``[k:k+S, k:k+S]`` of the stored frame."""
        return (self.stored_size - self.crop_size) // 2


# --------------------------------------------------------------------------------------------------
# members: encode (pack) and decode (loader)


def _window(box, width: int, height: int) -> tuple[tuple[int, int, int, int], tuple, tuple[float, ...]]:
    """Geometry shared by :func:`resample_window` and :func:`crop_window`: the whole pixels covering ``box`` clipped
    to the image (x1, y1, x2, y2), the edge padding per side ((top, bottom), (left, right)) that completes them, and
    ``box`` in the padded window's pixels (PIL's ``resize(box=...)``)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    ix1, iy1, ix2, iy2 = math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2)
    clipped = (max(ix1, 0), max(iy1, 0), min(ix2, width), min(iy2, height))
    pad = ((max(0, -iy1), max(0, iy2 - height)), (max(0, -ix1), max(0, ix2 - width)))
    return clipped, pad, (x1 - ix1, y1 - iy1, x2 - ix1, y2 - iy1)


def resample_window(pixels: np.ndarray, box, side: int, resample: Image.Resampling) -> np.ndarray:
    """Resample window ``box`` = (x1, y1, x2, y2) (float image px) of ``pixels`` (H, W[, 3]) uint8 to ``side``.

    PIL's ``resize(box=...)`` uses the ``align_corners=False`` convention of the module doc. The window may
    leave the image (a context margin at a border): only the part outside is edge-padded, never the image.
    """
    h, w = pixels.shape[:2]
    (cx1, cy1, cx2, cy2), pad, inner = _window(box, w, h)
    return _pad_and_resize(pixels[cy1:cy2, cx1:cx2], pad, inner, side, resample)


def resample_mask_window(rle_counts: str, height: int, width: int, box, side: int) -> np.ndarray:
    """``resample_window(decode_mask(rle_counts, height, width), box, side, NEAREST)``, decoding only the window."""
    clipped, pad, inner = _window(box, width, height)
    return _pad_and_resize(
        decode_mask_window(rle_counts, height, width, clipped), pad, inner, side, Image.Resampling.NEAREST
    )


def _pad_and_resize(window: np.ndarray, pad, inner, side: int, resample: Image.Resampling) -> np.ndarray:
    window = _edge_pad(window, pad)
    return np.asarray(Image.fromarray(np.ascontiguousarray(window)).resize((side, side), resample, box=inner))


def _edge_pad(window: np.ndarray, pad) -> np.ndarray:
    """``window`` (H, W[, C]) with its edge pixels repeated by ``pad`` ((top, bottom), (left, right)); as is if none."""
    if not any(any(p) for p in pad):
        return window
    return np.pad(window, pad + ((0, 0),) * (window.ndim - 2), mode="edge")


def crop_window(image: Image.Image, box, side: int, resample: Image.Resampling) -> Image.Image:
    """:func:`resample_window` of a PIL image, same pixels: the window is cropped in PIL, so the whole image is
    never copied into numpy (pack cuts several crops from each decoded image)."""
    clipped, pad, inner = _window(box, *image.size)
    window = image.crop(clipped)
    if any(any(p) for p in pad):
        window = Image.fromarray(_edge_pad(np.asarray(window), pad))
    return window.resize((side, side), resample, box=inner)


def encode_jpeg(rgb: np.ndarray | Image.Image, quality: int) -> bytes:
    """RGB uint8 ``(T, T, 3)`` (or that PIL image) -> JPEG (``optimize``: Huffman tables fitted to the crop, 11 %
    smaller)."""
    out = io.BytesIO()
    (rgb if isinstance(rgb, Image.Image) else Image.fromarray(rgb, "RGB")).save(
        out, "JPEG", quality=quality, optimize=True
    )
    return out.getvalue()


def encode_mask_png(mask: np.ndarray) -> bytes:
    """{0, 1} mask ``(T, T)`` -> 1-bit PNG."""
    out = io.BytesIO()
    Image.fromarray(mask.astype(bool)).save(out, "PNG", compress_level=6)  # optimize: 1.6x the time, same bytes
    return out.getvalue()


def encode_logits_png(values: np.ndarray) -> bytes:
    """Stored codec values ``(T, T)`` (uint8, or float16 kept as its uint16 bit patterns) -> lossless PNG."""
    if values.dtype == np.float16:
        values = values.view(np.uint16)
    elif values.dtype != np.uint8:
        raise ValueError(f"logit store values must be uint8 or float16, got {values.dtype}")
    out = io.BytesIO()
    # zlib level 6: ~5 % more bytes than optimize (level 9) but 5x faster, and this member dominated pack's time
    Image.fromarray(values).save(out, "PNG", compress_level=6)
    return out.getvalue()


def _open(data: bytes, fmt: str, side: int, modes: tuple[str, ...]) -> np.ndarray:
    """Decode one member with exactly one PIL plugin; size and mode are checked before any pixel is decoded."""
    image = Image.open(io.BytesIO(data), formats=[fmt])
    if image.size != (side, side) or image.mode not in modes:
        raise ValueError(f"expected a {side}x{side} {fmt} of mode {'/'.join(modes)}, got {image.size} {image.mode}")
    image.load()
    return np.asarray(image)


def decode_jpeg(data: bytes, side: int) -> np.ndarray:
    """JPEG member -> uint8 ``(T, T, 3)`` RGB. Raises ValueError / OSError for a bad member."""
    return _open(data, "JPEG", side, ("RGB",))


def decode_mask_png(data: bytes, side: int) -> np.ndarray:
    """``mask.png`` member -> uint8 ``(T, T)`` in {0, 1}."""
    return _open(data, "PNG", side, ("1",)).astype(np.uint8)


def decode_logits_png(data: bytes, side: int, codec: LogitCodec) -> np.ndarray:
    """``logits.<NAME>.png`` member -> the stored values ``(T, T)`` of ``codec.dtype``, bit-exact."""
    if codec.dtype == "float16":
        return _open(data, "PNG", side, ("I;16",)).astype(np.uint16).view(np.float16)
    return _open(data, "PNG", side, ("L",))


class TarMemberError(ValueError):
    """A shard member that is not a plain file (link, folder, device, FIFO, sparse file) or runs past the shard's
    end; the message names the member."""


# What each tar member type is, in words, for the members a shard never holds.
_MEMBER_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.DIRTYPE: "a folder",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.CONTTYPE: "a contiguous file",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}


def read_tar_members(stream: IO[bytes], url: str, size: int) -> Iterator[dict[str, Any]]:
    """Members of an uncompressed tar stream of ``size`` bytes as ``{"fname", "data", "__url__"}``; nothing decoded.

    Every member is a plain file whose bytes lie inside the stream, or :class:`TarMemberError` names it: links,
    folders, devices, FIFOs and sparse files are reported, not skipped. A compressed tar is refused by
    ``tarfile`` (mode ``r|``): a gzip shard could expand without bound.
    """
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            name = safe_text(info.name)
            if not info.isreg() or info.issparse() or info.type == tarfile.CONTTYPE:
                kind = _MEMBER_KINDS.get(info.type, f"of tar type {info.type!r}")
                target = f" to {safe_text(info.linkname)!r}" if info.issym() or info.islnk() else ""
                raise TarMemberError(f"member {name!r} is {kind}{target}, not a plain file")
            if info.offset_data + info.size > size:  # checked before the member's bytes are read
                raise TarMemberError(
                    f"member {name!r} declares {info.size:,} bytes at byte {info.offset_data:,}, past the end of "
                    f"the {size:,}-byte file"
                )
            file = tar.extractfile(info)
            yield {"fname": info.name, "data": file.read() if file else b"", "__url__": url}


# --------------------------------------------------------------------------------------------------
# the shard index


@dataclass(frozen=True)
class ShardEntry:
    name: str  # file name inside the split folder
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardIndex:
    """``shards.json`` of one split: what the loader checks every shard against before reading it."""

    path: Path  # the shards.json file
    split: str
    frame: Frame
    teachers: dict[str, str]  # teacher pass name -> its logits codec, in pack.teachers order
    shards: tuple[ShardEntry, ...]
    crop: dict[str, Any]  # the crop convention of every sample (crops.crop_convention): what the student learns

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def members(self) -> tuple[str, ...]:
        return sample_members(self.teachers)

    def shard_path(self, entry: ShardEntry) -> Path:
        return self.path.parent / entry.name


def read_shard_index(path: str | Path) -> ShardIndex:
    """Read ``shards.json`` (``path`` is the file or its split folder); PipelineError names what is wrong.

    The index is untrusted: read within :data:`MAX_INDEX_BYTES`, parsed with bounded nesting, and every field the
    loader relies on is checked for its type and range here (a shard's size is compared with the file before it
    is read, so the listed size must be plausible for its samples).
    """
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_FILE
    hint = "point to a split folder written by `picosam-pipeline run-stage pack` (e.g. data/shards/train)"
    if not path.exists():
        splits = sorted(p.parent.name for p in path.parent.glob(f"*/{INDEX_FILE}"))
        more = f"; it holds the splits {splits}, pick one (e.g. {path.parent / splits[0]})" if splits else f"; {hint}"
        raise PipelineError(f"{path} not found, so {path.parent} is not a shard folder{more}")
    what = f"shard index {str(path)!r}"
    raw = load_json_bounded(read_bounded_bytes(path, what, MAX_INDEX_BYTES), what)
    try:
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
        if raw.get("format") == FORMAT and raw.get("format_version") == 1:
            raise PipelineError(
                f"{path} was written by an older pack (shard format 1: one teacher, member logits.png); "
                f"this code reads format {FORMAT_VERSION} (a logits member per teacher). Repack with "
                "`picosam-pipeline run-stage pack` (or `dvc repro pack`)"
            )
        if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"format {safe_text(raw.get('format'))!r} version {safe_text(raw.get('format_version'))!r}, this "
                f"code reads {FORMAT!r} version {FORMAT_VERSION}"
            )
        if not isinstance(raw["teachers"], list) or not all(isinstance(t, dict) for t in raw["teachers"]):
            raise ValueError("teachers: expected a list of objects")
        teachers = {t["name"]: get_codec(t["codec"]["codec"]).name for t in raw["teachers"]}
        if not teachers or any(not MEMBER_NAME.match(f"k.{logits_member(t)}") for t in teachers):
            raise ValueError(f"teachers {safe_text(list(teachers))}: expected at least one teacher pass name")
        frame = _checked_frame(raw["frame"])
        if not isinstance(raw["shards"], list) or not raw["shards"]:
            raise ValueError("shards: expected a non-empty list of shard entries")
        shards = tuple(_checked_entry(entry, frame, len(teachers)) for entry in raw["shards"])
        if not isinstance(raw["split"], str):
            raise ValueError(f"split: expected a name, got {safe_text(repr(raw['split']), 80)}")
        if not isinstance(raw.get("crop"), dict) or "convention" not in raw["crop"]:
            raise PipelineError(
                f"{path} does not record its crop convention (written by an older pack); repack with "
                "`picosam-pipeline run-stage pack` (or `dvc repro pack`)"
            )
        index = ShardIndex(path, raw["split"], frame, teachers, shards, raw["crop"])
    except (ValueError, KeyError, TypeError) as err:
        raise PipelineError(
            f"{path} is not a shard index this code reads ({safe_text(str(err), 300)}); repack with "
            "`picosam-pipeline run-stage pack`"
        ) from None
    bad = [s.name for s in shards if not re.fullmatch(r"[\w.-]+\.tar", s.name) or s.name.startswith(".")]
    if bad:
        raise PipelineError(
            f"{path}: shard names must be plain .tar file names in the index's folder, got {safe_text(bad[:3])}"
        )
    return index


def _whole(value: Any, name: str, low: int, high: int) -> int:
    """``value`` if it is an int in ``[low, high]`` (a JSON bool or float is not), else ValueError naming ``name``."""
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{name}: expected a whole number in [{low:,}, {high:,}], got {safe_text(repr(value), 80)}")
    return value


def _checked_frame(raw: Any) -> Frame:
    """The index's frame, each side a whole number of pixels the teacher can store, the crop inside the frame."""
    if not isinstance(raw, dict) or set(raw) != {"crop_size", "stored_size"}:
        raise ValueError(f"frame: expected {{crop_size, stored_size}}, got {safe_text(raw)}")
    stored = _whole(raw["stored_size"], "frame.stored_size", 1, MAX_STORED_SIDE)
    crop = _whole(raw["crop_size"], "frame.crop_size", 1, stored)
    if (stored - crop) % 2:
        raise ValueError(f"frame: stored_size {stored} - crop_size {crop} must be even (a margin on each side)")
    return Frame(crop, stored)


def max_sample_bytes(frame: Frame, teachers: int) -> int:
    """The most bytes one sample can take in a shard: every member at twice its raw pixel bytes (JPEG and PNG of
    noise stay under it), the JSON record, and per member a tar header, its padding and slack for format overhead."""
    pixels = frame.stored_size**2 * (3 + 1 + 2 * teachers)  # RGB, mask, logits (float16 at most)
    return 2 * pixels + MAX_RECORD_BYTES + (4 + teachers) * (1024 + 65536)


def _checked_entry(raw: Any, frame: Frame, teachers: int) -> ShardEntry:
    """A ``shards`` entry whose fields have their types, and whose size is possible for its sample count."""
    if not isinstance(raw, dict) or set(raw) != {"name", "samples", "bytes", "sha256"}:
        raise ValueError(f"shard entry: expected {{name, samples, bytes, sha256}}, got {safe_text(raw)}")
    name = raw["name"]
    if not isinstance(name, str):
        raise ValueError(f"shard entry name: expected a file name, got {safe_text(name)}")
    samples = _whole(raw["samples"], f"shard {name!r} samples", 1, MAX_SAMPLES_PER_SHARD)
    size = _whole(raw["bytes"], f"shard {name!r} bytes", 1, samples * max_sample_bytes(frame, teachers) + TAR_SLACK)
    if not isinstance(raw["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", raw["sha256"]):
        raise ValueError(f"shard {name!r} sha256: expected 64 hex digits, got {safe_text(repr(raw['sha256']), 80)}")
    return ShardEntry(name, samples, size, raw["sha256"])


# --------------------------------------------------------------------------------------------------
# packing


@dataclass(frozen=True)
class _ImageJob:
    """One image and its instances' records, stored values per teacher ``{name: (n, T, T)}``, stored boxes (n, 4)."""

    path: str
    size: tuple[int, int]  # (width, height) from the annotations
    rle_counts: list[str]
    records: list[dict[str, Any]]
    values: dict[str, np.ndarray]
    stored_boxes: np.ndarray


def _encode_image(job: _ImageJob, side: int, quality: int, fields: tuple[str, ...]) -> list[bytes]:
    """Decode the image once and encode every instance's sample as a spill record body (runs in a worker process)."""
    image, _ = load_rgb(job.path, expected_size=job.size)
    width, height = job.size
    samples = []
    for i, (rle, record, box) in enumerate(zip(job.rle_counts, job.records, job.stored_boxes)):
        samples.append(
            _spill_body(
                fields,
                {
                    "__key__": str(record["ann_id"]).encode(),
                    "jpg": encode_jpeg(crop_window(image, box, side, Image.Resampling.BILINEAR), quality),
                    "mask.png": encode_mask_png(resample_mask_window(rle, height, width, box, side)),
                    **{logits_member(name): encode_logits_png(values[i]) for name, values in job.values.items()},
                    "json": json.dumps(record, sort_keys=True, separators=(",", ":")).encode(),
                },
            )
        )
    return samples


# A spill record: the sample's position (int64), the byte length of each field (uint32, ``("__key__", *members)``
# order), then the fields' bytes. Plain records, not tar members: pass 1 only appends them and pass 2 builds each
# tar header once (spill tars had tarfile build every header twice, in Python, and parse them once).
_POSITION = struct.Struct("<q")


def _spill_body(fields: tuple[str, ...], sample: dict[str, bytes]) -> bytes:
    """A spill record without its position: the lengths of ``sample[f]`` for ``f`` in ``fields``, then the bytes."""
    parts = [sample[f] for f in fields]
    return struct.pack(f"<{len(parts)}I", *map(len, parts)) + b"".join(parts)


def _read_spill(data: bytes, fields: tuple[str, ...], path: Path) -> list[tuple[int, list[memoryview]]]:
    """Every ``(position, field bytes)`` record of a spill file's ``data``; PipelineError when it is cut short."""
    lengths_of = struct.Struct(f"<{len(fields)}I")
    view, at, records = memoryview(data), 0, []
    while at < len(data):
        if at + _POSITION.size + lengths_of.size > len(data):
            raise PipelineError(f"{path}: the spill file ends inside a record header at byte {at}")
        (position,), lengths = _POSITION.unpack_from(data, at), lengths_of.unpack_from(data, at + _POSITION.size)
        at += _POSITION.size + lengths_of.size
        if at + sum(lengths) > len(data):
            raise PipelineError(f"{path}: the spill file ends inside the record of sample position {position}")
        parts = []
        for length in lengths:
            parts.append(view[at : at + length])
            at += length
        records.append((position, parts))
    return records


class _BlockReader:
    """Stored values of store rows, read in blocks of whole store shards (rows mostly come in store order)."""

    def __init__(self, store: LogitStore, block_rows: int = 4096) -> None:
        self.store = store
        self.block_rows = max(block_rows, store.instances_per_shard)
        self.start = self.stop = 0
        self.values = np.zeros((0, store.side, store.side), store.codec.dtype)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        lo, hi = int(rows.min()), int(rows.max()) + 1
        if not (self.start <= lo and hi <= self.stop):
            self.start = lo // self.store.instances_per_shard * self.store.instances_per_shard
            self.stop = min(len(self.store), max(hi, self.start + self.block_rows))
            self.values = self.store.read_raw(slice(self.start, self.stop))
        return self.values[rows - self.start]


@dataclass
class SplitSummary:
    """What :func:`pack_split` wrote (also the per-split part of ``metrics/pack.json``)."""

    samples: int
    shards: int
    bytes: int
    bytes_per_sample: float
    member_bytes_per_sample: dict[str, float]  # payload only; the rest of bytes_per_sample is tar headers


@dataclass(frozen=True)
class PackedTeacher:
    """One teacher pass to pack: its store, ``store.read_meta()``, and the store row of each of a split's rows."""

    name: str
    store: LogitStore
    meta: dict[str, np.ndarray]
    rows_in_store: np.ndarray


def pack_split(
    split: str,
    index: str | Path,
    rows: pa.Table,
    teachers: list[PackedTeacher],
    frame: Frame,
    out: Path,
    *,
    samples_per_shard: int,
    seed: int,
    jpeg_quality: int,
    crop: dict[str, Any],
    workers: int | None = None,
    provenance: dict[str, Any] | None = None,
) -> SplitSummary:
    """Write split ``split`` as shards + ``shards.json`` in ``out`` (two passes, see the module doc).

    Args:
        index: the instance index file; the split's images, RLEs and records are streamed from it in batches.
        rows: the split's index rows (``INDEX_COLUMNS``) in index order, as ``read_index`` returns them.
        teachers: the passes to pack, in member order; their stores hold the same crop boxes for ``rows``
            (``packing.check_crop_boxes`` checks it), so the first one's stored boxes and frame serve all.
        frame: ``packing.store_frame`` of the stores.
        crop: the crop convention record (``crops.crop_convention``) written into ``shards.json``.
        workers: processes encoding samples (``parallel.ordered_map``); default one per core, none for a small split.
        provenance: the teachers', dataset's and recipe's record (``Provenance.as_dict``), last in ``shards.json``.
    """
    n = rows.num_rows
    if n == 0:
        raise PipelineError(f"split {split!r} has no instances in the index; remove it from pack.splits")
    # Position of each instance in the split's sample order; a stream per split, so splits are independent.
    position = np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(n)  # of each row
    if len(np.unique(rows["ann_id"].to_numpy())) != n:
        raise PipelineError(f"split {split!r} of the index holds an ann_id twice; rerun prepare (it drops duplicates)")
    spill_dir = out / ".spill"
    spill_dir.mkdir(parents=True, exist_ok=True)

    # Pass 1: images in index order -> one spill file per destination shard.
    members = sample_members(t.name for t in teachers)
    fields = ("__key__", *members)
    lengths_of = struct.Struct(f"<{len(fields)}I")
    jobs = _image_jobs(split, index, rows, teachers, frame)
    encode = partial(_encode_image, side=frame.stored_size, quality=jpeg_quality, fields=fields)
    images = len(np.unique(rows["image_id"].to_numpy()))
    workers = default_workers(images) if workers is None else workers
    field_bytes = np.zeros(len(fields), np.int64)
    spills: dict[int, IO[bytes]] = {}
    spilled = np.zeros(-(-n // samples_per_shard), np.int64)  # samples written to each spill
    row = 0
    pool = worker_pool(workers) if workers else None  # one pool for both passes: a worker's start costs ~2 s
    try:
        for samples in tqdm(
            ordered_map(encode, jobs, workers=workers, pool=pool), total=images, desc=f"pack {split}", unit="img"
        ):
            for body, at in zip(samples, position[row : row + len(samples)].tolist()):  # results come in row order
                k = at // samples_per_shard
                if k not in spills:
                    spills[k] = open(spill_dir / f"{k:06d}.spill", "wb")
                spills[k].write(_POSITION.pack(at) + body)
                spilled[k] += 1
                field_bytes += lengths_of.unpack_from(body)
            row += len(samples)
        close_all(spills.values())
        shards, spills = len(spills), {}
        # Pass 2: each spill in position order -> the final shard, then its size and sha256; shards are independent,
        # so the workers take one each.
        finish = (
            (spill_dir / f"{k:06d}.spill", int(spilled[k]), out / SHARD_NAME.format(k), fields) for k in range(shards)
        )  # every shard has samples: positions are a permutation of the rows
        entries = list(
            tqdm(
                ordered_map(_finish_shard, finish, workers=workers, pool=pool),
                total=shards,
                desc=f"shards {split}",
                unit="shard",
            )
        )
    finally:
        close_all(spills.values())
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    spill_dir.rmdir()
    member_bytes = dict(zip(members, field_bytes[1:].tolist()))

    index = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "split": split,
        "samples": n,
        "samples_per_shard": samples_per_shard,
        "seed": seed,
        "jpeg_quality": jpeg_quality,
        "frame": asdict(frame),
        "crop": crop,
        "members": list(members),
        "teachers": [
            {
                "name": t.name,
                "codec": t.store.codec.attrs(),
                "store": str(t.store.path),
                "model": t.store.attrs.get("teacher", {}).get("model"),
            }
            for t in teachers
        ],
        "shards": [asdict(e) for e in entries],
    } | ({"provenance": provenance} if provenance is not None else {})
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    total = sum(e.bytes for e in entries)
    return SplitSummary(n, len(entries), total, total / n, {m: b / n for m, b in member_bytes.items()})


def _finish_shard(job: tuple[Path, int, Path, tuple[str, ...]]) -> ShardEntry:
    """Pass 2 of one shard (runs in a worker): the ``count`` records of its spill file, in the order of their
    positions, written as WebDataset samples to the final shard; the spill is deleted."""
    spill, count, target, fields = job
    records = _read_spill(spill.read_bytes(), fields, spill)
    if len(records) != count:
        raise PipelineError(
            f"{spill}: {len(records)} samples read back of the {count} written; is the disk "
            f"of {target.parent} full or failing?"
        )
    records.sort(key=lambda record: record[0])
    with TarWriter(str(target), **TAR_OPTIONS) as sink:
        for _, parts in records:
            sink.write({"__key__": bytes(parts[0]).decode(), **dict(zip(fields[1:], parts[1:]))})
    spill.unlink()
    return ShardEntry(target.name, count, target.stat().st_size, sha256_file(target))


def close_all(sinks) -> None:
    """Close every tar writer even when one fails (a full disk), then raise the first error: a writer left unclosed
    would be flushed by the garbage collector into its closed file, with a traceback after the user's message."""
    error = None
    for sink in sinks:
        try:
            sink.close()
        except BaseException as err:  # re-raised below, after the other writers are closed
            error = error or err
    if error is not None:
        raise error


def _image_jobs(
    split: str, index: str | Path, rows: pa.Table, teachers: list[PackedTeacher], frame: Frame
) -> Iterator[_ImageJob]:
    """One job per image of ``rows``, with its instances' JSON records and every teacher's stored values (read lazily).

    The images, RLEs and record fields are streamed from ``index`` (``stream_images``), whose rows must be
    ``rows`` in the same order (checked per image: the store rows and positions are indexed by it)."""
    readers = {t.name: _BlockReader(t.store) for t in teachers}
    codecs = {t.name: {"codec": t.store.codec.name, "decode": t.store.codec.formula} for t in teachers}
    first = teachers[0]  # every store holds the same crop boxes (packing.check_crop_boxes checks it)
    frame_record = asdict(frame)
    start = 0
    ann_ids = rows["ann_id"].to_numpy()
    for group in stream_images(
        index, split, STREAMED_COLUMNS
    ):  # in index order: each image is the next len(group) rows
        if not np.array_equal(group.rows["ann_id"].to_numpy(), ann_ids[start : start + len(group)]):
            raise PipelineError(
                f"{index} changed while pack read it (image {group.image_id} of split {split!r} is not "
                "where it was); rerun pack"
            )
        in_store = {t.name: t.rows_in_store[start : start + len(group)] for t in teachers}  # store row of each instance
        start += len(group)
        confidence = {t.name: t.meta["confidence"][in_store[t.name]] for t in teachers}
        boxes = {key: first.meta[key][in_store[first.name]] for key in ("crop_box", "stored_box")}
        records = [
            {
                **r,
                "split": split,
                "confidence": {name: float(c[j]) for name, c in confidence.items()},
                "crop_box": boxes["crop_box"][j].tolist(),
                "stored_box": boxes["stored_box"][j].tolist(),
                "frame": frame_record,
                "logits": codecs,
            }
            for j, r in enumerate(group.rows.select(["ann_id", "image_id", "category_id", "area"]).to_pylist())
        ]
        yield _ImageJob(
            group.image_path,
            (group.width, group.height),
            group.rows["rle_counts"].to_pylist(),
            records,
            {t.name: readers[t.name](in_store[t.name]) for t in teachers},
            boxes["stored_box"],
        )
