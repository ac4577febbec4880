"""Stream packed shards (``shards.py``) into batches for training and evaluation.

``make_loader(shard_dir_or_index, ...)`` returns a :class:`ShardLoader`; iterating it is one epoch (or an
endless stream with ``infinite=True``) of batches::

    image           float32 (B, 3, S, S)  RGB in [0, 1] (the model normalises)
    gt_mask         float32 (B, 1, S, S)  in {0, 1}
    teacher_logits  float32 (B, K, S, S)  decoded logits of the K teachers packed (``loader.teachers`` order);
                                          teacher mask = logits > 0; train/targets.py makes the (B, 1) target
    confidence      float32 (B, K)        each teacher's confidence in [0, 1]
    ann_id, image_id, category_id  int64 (B,);  area float32 (B,)  (COCO mask area, px)
    crop_box        int64 (B, 4)          the student's crop (x1, y1, x2, y2) in image px, before augmentation

``S`` is ``input_size``. Each DataLoader worker runs, with webdataset's stages where they fit::

    shards.json -> shard order (shuffled per epoch when shuffle_buffer > 0) -> wds.split_by_node (DDP rank)
      -> wds.split_by_worker -> read the shard, check size + sha256 against shards.json
      -> list its members (plain files of an uncompressed tar: a link, folder, device or FIFO member is a corrupt
         shard): only <key>.jpg / .mask.png / .logits.<NAME>.png / .json pass
      -> group into samples -> wds.shuffle(shuffle_buffer) of still-encoded samples
      -> decode -> augment -> batch

Shards are untrusted input: webdataset's default decoders unpickle ``.pyd`` / ``.pth`` / ... members. Here
nothing is decoded by extension: a member that is not one of the names above stops the loader with
:class:`ForeignMemberError` naming the shard and the member before any member of that shard is decoded,
and the members go through one PIL plugin each (JPEG, PNG) or ``json``. A shard that does not match
its ``shards.json`` entry (truncated, corrupt, missing) or does not parse is a :class:`CorruptShardError`:
``on_corrupt_shard="stop"`` raises it, ``"skip"`` passes the whole shard over and records it in
:attr:`ShardLoader.skipped`. Workers never raise; they send a :class:`ShardProblem` in place of a batch and
the main process decides, so the error reaches the user as one message, not a worker traceback.

Augmentation is applied identically to image, mask and logits: ``jitter`` moves each edge of the crop box
by up to ``jitter * S_crop`` crop pixels, inside the stored frame (so with a context margin in the store the
box can grow beyond the crop; without one it can only shrink), and the window is resampled to ``S``
(bilinear for image and logits, nearest for the mask); ``hflip`` mirrors all three with probability 1/2.

Order: with ``shuffle_buffer=0`` and ``num_workers <= 1`` batches come in shard order, then sample order (for
evaluation). Otherwise the order is a function of ``seed``, the epoch, the rank and the worker count.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys

from picosam_pipeline.environment import distributed_ranks
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.teacher.codec import decode_logits, get_codec
from picosam_pipeline.train.shards import (
    MAX_RECORD_BYTES,
    MEMBER_NAME,
    Frame,
    ShardEntry,
    ShardIndex,
    TarMemberError,
    decode_jpeg,
    decode_logits_png,
    decode_mask_png,
    logits_member,
    read_shard_index,
    read_tar_members,
    resample_window,
)
from picosam_pipeline.untrusted import UntrustedInputError, load_json_bounded, open_regular, safe_text


class CorruptShardError(PipelineError):
    """A shard that is truncated, corrupt, missing, or differs from its ``shards.json`` entry."""


class ForeignMemberError(PipelineError):
    """A shard holding a member this pipeline never writes (a pickle, an .npy, ...): never decoded, always fatal."""


@dataclass(frozen=True)
class ShardProblem:
    """What a worker sends instead of a batch when a shard (or one of its samples) cannot be used."""

    shard: str
    message: str
    fatal: bool  # a foreign member: stops whatever on_corrupt_shard says


def count_samples(shard_dir_or_index: str | Path) -> int:
    """Samples in a split's shards, from its ``shards.json``."""
    return read_shard_index(shard_dir_or_index).samples


def make_loader(
    shard_dir_or_index: str | Path,
    *,
    batch_size: int,
    shuffle_buffer: int,
    num_workers: int,
    seed: int,
    hflip: bool = False,
    jitter: float = 0.0,
    on_corrupt_shard: str = "stop",
    infinite: bool = False,
    input_size: int = 96,
    pin_memory: bool = False,
) -> ShardLoader:
    """Batches from the shards of one split (a split folder or its ``shards.json``); see the module doc.

    ``num_workers`` is capped at the number of shards this rank reads, so a small split never leaves a
    worker without a shard. Under DDP every rank needs a shard of its own (ranks read disjoint shards).
    ``pin_memory`` (for a CUDA trainer) lets its host-to-device copies run behind compute.

    Raises:
        PipelineError: a bad argument, an unreadable index, or more DDP ranks than shards.
    """
    index = read_shard_index(shard_dir_or_index)
    if batch_size < 1 or input_size < 1 or min(shuffle_buffer, num_workers, seed) < 0:
        raise PipelineError(
            f"make_loader: batch_size and input_size must be >= 1, shuffle_buffer, num_workers and "
            f"seed >= 0; got {batch_size}, {input_size}, {shuffle_buffer}, {num_workers}, {seed}"
        )
    if not 0.0 <= jitter < 0.5:
        raise PipelineError(f"jitter: expected a fraction of the crop side in [0, 0.5), got {jitter}")
    if on_corrupt_shard not in ("stop", "skip"):
        raise PipelineError(f"on_corrupt_shard: expected stop or skip, got {on_corrupt_shard!r}")
    distributed_ranks()  # webdataset reads RANK / WORLD_SIZE itself, unchecked: a bad value is one paragraph here
    rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    if len(index.shards) < world_size:
        raise PipelineError(
            f"{index.path}: {len(index.shards)} shards cannot feed {world_size} DDP ranks (each reads "
            f"its own shards); repack with pack.samples_per_shard <= {index.samples // world_size}"
        )
    stream = ShardStream(
        index,
        batch_size=batch_size,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        hflip=hflip,
        jitter=jitter,
        infinite=infinite,
        input_size=input_size,
    )
    rank_shards = index.shards[rank::world_size]
    return ShardLoader(
        stream,
        num_workers=min(num_workers, len(rank_shards)),
        on_corrupt_shard=on_corrupt_shard,
        samples=sum(s.samples for s in rank_shards),
        pin_memory=pin_memory,
    )


class ShardLoader:
    """Iterable of batches (one epoch per ``iter``, each epoch reshuffled); raises or records shard problems.

    Attributes:
        teachers: the teacher passes packed, in the order of the batches' ``teacher_logits`` channels.
        samples: samples this rank reads per epoch.
        num_workers: DataLoader worker processes actually used (capped at this rank's shards).
        skipped: the :class:`ShardProblem` s passed over under ``on_corrupt_shard="skip"``, across epochs.
    """

    def __init__(
        self, stream: ShardStream, *, num_workers: int, on_corrupt_shard: str, samples: int, pin_memory: bool = False
    ) -> None:
        self.stream = stream
        self.teachers = list(stream.index.teachers)
        self.pin_memory = pin_memory
        self.num_workers = num_workers
        self.on_corrupt_shard = on_corrupt_shard
        self.samples = samples
        self.skipped: list[ShardProblem] = []
        self._epoch = 0

    @property
    def expected_batches(self) -> int:
        """Batches of one epoch when no shard is skipped: at least this many, and at most ``num_workers - 1`` more
        (each worker batches its own shards and ends with a short batch)."""
        return -(-self.samples // self.stream.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch. The worker processes start here, not at the first ``next``: a trainer can start the next
        epoch's loader ahead of time (``trainer.batch_stream``)."""
        self.stream.epoch, self._epoch = self._epoch, self._epoch + 1  # workers get a fresh copy per epoch
        loader = torch.utils.data.DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            worker_init_fn=_one_thread,
            prefetch_factor=4 if self.num_workers else None,
            persistent_workers=False,
            pin_memory=self.pin_memory,
        )
        return self._deliver(iter(loader))

    def _deliver(self, items: Iterator[dict[str, torch.Tensor] | ShardProblem]) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``items``; a shard problem raises or is recorded, as ``on_corrupt_shard`` says."""
        for item in items:
            if isinstance(item, ShardProblem):
                if item.fatal:
                    raise ForeignMemberError(item.message)
                if self.on_corrupt_shard == "stop":
                    raise CorruptShardError(
                        f"{item.message}; repack it (dvc repro pack) or `dvc pull` it, or set "
                        "on_corrupt_shard=skip to train on without it (counted in metrics)"
                    )
                self.skipped.append(item)
                continue
            yield item


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # a worker decodes and collates; intra-op threads would only compete


class ShardStream(torch.utils.data.IterableDataset):
    """The per-worker pipeline of the module doc; yields batches and :class:`ShardProblem` s."""

    def __init__(
        self,
        index: ShardIndex,
        *,
        batch_size: int,
        shuffle_buffer: int,
        seed: int,
        hflip: bool,
        jitter: float,
        infinite: bool,
        input_size: int,
    ) -> None:
        self.index = index
        self.codecs = {name: get_codec(codec) for name, codec in index.teachers.items()}
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.hflip, self.jitter, self.infinite, self.input_size = hflip, jitter, infinite, input_size
        self.epoch = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor] | ShardProblem]:
        epoch = self.epoch
        while True:
            yield from self._epoch(epoch)
            if not self.infinite:
                return
            epoch += 1

    def _epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor] | ShardProblem]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        shards = list(self.index.shards)
        if self.shuffle_buffer > 0:  # same permutation in every rank and worker, so their splits stay disjoint
            shards = [shards[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(shards))]
        raw = self._read(wds.split_by_worker(wds.split_by_node(shards)))
        if self.shuffle_buffer > 1:
            stream_seed = np.random.SeedSequence([self.seed, epoch, rank, worker]).generate_state(1)[0]
            raw = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(int(stream_seed)))(
                raw
            )
        rng = np.random.default_rng([self.seed, epoch, rank, worker, 1])
        yield from _batches(self._decode(raw, rng), self.batch_size)

    def _read(self, shards: Iterable[ShardEntry]) -> Iterator[dict[str, Any] | ShardProblem]:
        for entry in shards:
            path = self.index.shard_path(entry)
            try:
                yield from read_shard(path, entry, self.index.members)
            except ForeignMemberError as err:
                yield ShardProblem(str(path), str(err), fatal=True)
                return
            except CorruptShardError as err:
                yield ShardProblem(str(path), str(err), fatal=False)

    def _decode(self, raw: Iterable[dict[str, Any] | ShardProblem], rng: np.random.Generator) -> Iterator:
        for sample in raw:
            if isinstance(sample, ShardProblem):
                yield sample
                continue
            try:
                decoded = decode_sample(sample, self.index.frame, self.codecs)
            except (
                ValueError,
                KeyError,
                TypeError,
                OSError,
                SyntaxError,
                Image.DecompressionBombError,
                PipelineError,  # untrusted.py's refusal of the json member
            ) as err:
                yield ShardProblem(
                    sample["__url__"],
                    f"{sample['__url__']}: sample {safe_text(sample['__key__'])!r} does not "
                    f"decode ({type(err).__name__}: {safe_text(str(err), 300)}); the shard is corrupt",
                    fatal=False,
                )
                continue
            yield augment(decoded, self.index.frame, self.input_size, rng, hflip=self.hflip, jitter=self.jitter)


def read_shard(path: Path, entry: ShardEntry, expected: tuple[str, ...]) -> list[dict[str, Any]]:
    """The samples of one shard, still encoded (``{"__key__", "__url__", member: bytes}``), after every check.

    ``expected``: the members every sample must hold (``ShardIndex.members``: one logits member per teacher packed).

    The whole shard is read and checked before any sample is handed on, so a skipped shard contributes
    nothing. Raises CorruptShardError or ForeignMemberError, naming the shard (and member).
    """
    data = _read_listed_bytes(path, entry)
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise CorruptShardError(
            f"shard {path}: sha256 differs from shards.json, the file is corrupt; copy it again or repack"
        )
    try:
        members = list(read_tar_members(io.BytesIO(data), str(path), len(data)))
    except TarMemberError as err:  # a link, folder, device, FIFO or sparse member: reported, never skipped silently
        raise CorruptShardError(f"shard {path}: {err}; shards hold plain files only") from None
    except (tarfile.TarError, OSError, ValueError) as err:
        raise CorruptShardError(
            f"shard {path} is not a readable uncompressed tar file ({safe_text(str(err))})"
        ) from None
    for member in members:
        if not MEMBER_NAME.match(member["fname"]):
            raise ForeignMemberError(
                f"shard {path} holds member {safe_text(member['fname'])!r}, which the pack stage never writes "
                f"(samples are <key>.{{{','.join(expected)}}}); pickles and arbitrary files are refused and nothing "
                "was decoded. "
                "Do not train on shards from an unknown source; repack from your own data with `run-stage pack`"
            )
    try:
        samples = list(group_by_keys(iter(members), lcase=False))
    except ValueError as err:  # the same member twice
        raise CorruptShardError(f"shard {path}: {err}") from None
    incomplete = [s["__key__"] for s in samples if set(s) - {"__key__", "__url__"} != set(expected)]
    if incomplete or len(samples) != entry.samples:
        raise CorruptShardError(
            f"shard {path} holds {len(samples)} samples ({len(incomplete)} incomplete, e.g. "
            f"{incomplete[:2]}) where shards.json lists {entry.samples} complete ones; repack"
        )
    return samples


def _read_listed_bytes(path: Path, entry: ShardEntry) -> bytes:
    """The bytes of shard ``path``, a regular file of exactly the size shards.json lists: the size is compared
    before anything is read, and a FIFO, device or folder is refused without blocking."""
    try:
        fd = open_regular(path, f"shard {path}")
    except UntrustedInputError as err:
        raise CorruptShardError(str(err)) from None
    with open(fd, "rb") as stream:
        size = os.fstat(fd).st_size
        if size != entry.bytes:
            raise CorruptShardError(
                f"shard {path} has {size} bytes but shards.json lists {entry.bytes}: it is "
                "truncated or was replaced; copy it again or repack"
            )
        try:
            data = stream.read(entry.bytes + 1)
        except OSError as err:
            raise CorruptShardError(f"shard {path} cannot be read ({err.strerror or err})") from None
    if len(data) != entry.bytes:  # the file changed size while it was read
        raise CorruptShardError(f"shard {path} changed while it was read ({len(data)} bytes, {entry.bytes} listed)")
    return data


# The record fields collate() turns into tensors, and what each must be.
_RECORD_INTS = ("ann_id", "image_id", "category_id")
_INT64 = (-(2**63), 2**63 - 1)


def check_record(record: Any) -> dict[str, Any]:
    """``record`` (a sample's parsed JSON) if the fields the batches carry have their types; ValueError names the
    first that does not (a string or a 2**80 id would otherwise fail in collate, outside the shard's report)."""
    if not isinstance(record, dict):
        raise ValueError(f"the json member is {type(record).__name__}, not an object")
    for name in _RECORD_INTS:
        value = record.get(name)
        if type(value) is not int or not _INT64[0] <= value <= _INT64[1]:
            raise ValueError(f"json field {name!r} is {safe_text(repr(value), 80)}, expected a 64-bit integer")
    area = record.get("area")
    if type(area) not in (int, float) or not math.isfinite(area):
        raise ValueError(f"json field 'area' is {safe_text(repr(area), 80)}, expected a finite number")
    box = record.get("crop_box")
    if not isinstance(box, list) or len(box) != 4 or any(type(v) is not int or abs(v) > 2**31 for v in box):
        raise ValueError(f"json field 'crop_box' is {safe_text(repr(box), 80)}, expected 4 integers (x1, y1, x2, y2)")
    for name in ("frame", "logits", "confidence"):
        if not isinstance(record.get(name), dict):
            raise ValueError(f"json field {name!r} is {safe_text(repr(record.get(name)), 80)}, expected an object")
    return record


def decode_sample(sample: dict[str, Any], frame: Frame, codecs: dict[str, Any]) -> dict[str, Any]:
    """Encoded sample -> ``image`` uint8 (T, T, 3), ``mask`` uint8 (T, T), ``logits`` float32 (K, T, T) and
    ``confidence`` float32 (K,) (one entry per teacher of ``codecs``, in its order), ``record``."""
    if len(sample["json"]) > MAX_RECORD_BYTES:
        raise ValueError(f"the json member has {len(sample['json']):,} bytes, over a record's {MAX_RECORD_BYTES:,}")
    record = check_record(load_json_bounded(sample["json"], "the json member", max_depth=8))
    packed = {name: spec["codec"] for name, spec in record["logits"].items()}
    if Frame(**record["frame"]) != frame or packed != {name: c.name for name, c in codecs.items()}:
        raise ValueError(f"frame {record['frame']} / teacher codecs {packed} differ from shards.json")
    if set(record["confidence"]) != set(codecs):
        raise ValueError(f"confidences of {sorted(record['confidence'])}, expected {sorted(codecs)}")
    side = frame.stored_size
    logits = np.stack(
        [
            decode_logits(decode_logits_png(sample[logits_member(name)], side, codec), codec)
            for name, codec in codecs.items()
        ]
    ).astype(np.float32, copy=False)
    confidence = np.array([record["confidence"][name] for name in codecs], dtype=np.float32)  # (K,), codecs' order
    return {
        "image": decode_jpeg(sample["jpg"], side),
        "mask": decode_mask_png(sample["mask.png"], side),
        "logits": logits,
        "confidence": confidence,
        "record": record,
    }


def augment(
    sample: dict[str, Any], frame: Frame, size: int, rng: np.random.Generator, *, hflip: bool, jitter: float
) -> dict[str, Any]:
    """Cut the student's view (``size`` x ``size``) from the stored frame; the same window and flip for all three.

    Without jitter the window is the crop itself (``[k, k + S_crop)`` of the stored frame); with it, each edge
    moves by ``U(-jitter, jitter) * S_crop`` stored pixels, clipped to the frame.
    """
    k, crop = frame.context_px, frame.crop_size
    window = np.array([k, k, k + crop, k + crop], dtype=np.float64)
    if jitter > 0:
        window = np.clip(window + rng.uniform(-jitter, jitter, 4) * crop, 0, frame.stored_size)
    image, mask, logits = sample["image"], sample["mask"], sample["logits"]  # logits (K, T, T)
    if crop == size and np.array_equal(window, [k, k, k + crop, k + crop]):
        image, mask, logits = (
            image[k : k + crop, k : k + crop],
            mask[k : k + crop, k : k + crop],
            logits[:, k : k + crop, k : k + crop],
        )
    else:
        image = resample_window(image, window, size, Image.Resampling.BILINEAR)
        mask = resample_window(mask, window, size, Image.Resampling.NEAREST)
        logits = np.stack(
            [
                resample_window(channel, window, size, Image.Resampling.BILINEAR)  # PIL mode "F"
                for channel in logits
            ]
        )
    if hflip and rng.random() < 0.5:
        image, mask, logits = image[:, ::-1], mask[:, ::-1], logits[:, :, ::-1]
    return {
        "image": image,
        "mask": mask,
        "logits": logits,
        "confidence": sample["confidence"],
        "record": sample["record"],
    }


def _batches(items: Iterable[dict[str, Any] | ShardProblem], batch_size: int) -> Iterator:
    """Collate samples into batches of ``batch_size`` (the last one may be smaller); problems pass straight on."""
    batch: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, ShardProblem):
            yield item
            continue
        batch.append(item)
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch:
        yield collate(batch)


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack augmented samples into the batch dict of the module doc."""
    records = [s["record"] for s in samples]
    # uint8 (B, T, T, 3) -> float32 (B, 3, T, T) / 255 in numpy: one pass, no torch threads in the workers.
    rgb = np.stack([s["image"] for s in samples]).transpose(0, 3, 1, 2)
    image = np.divide(rgb, 255, out=np.empty(rgb.shape, np.float32), dtype=np.float32)  # C-contiguous (B, 3, T, T)
    return {
        "image": torch.from_numpy(image),
        "gt_mask": torch.from_numpy(np.stack([s["mask"] for s in samples])[:, None].astype(np.float32)),
        "teacher_logits": torch.from_numpy(np.stack([s["logits"] for s in samples]).astype(np.float32)),
        "confidence": torch.from_numpy(np.stack([s["confidence"] for s in samples])),
        "ann_id": torch.tensor([r["ann_id"] for r in records], dtype=torch.int64),
        "image_id": torch.tensor([r["image_id"] for r in records], dtype=torch.int64),
        "category_id": torch.tensor([r["category_id"] for r in records], dtype=torch.int64),
        "area": torch.tensor([r["area"] for r in records], dtype=torch.float32),
        "crop_box": torch.tensor([r["crop_box"] for r in records], dtype=torch.int64),
    }
