"""Shard loader throughput next to the trainer's, and bytes per sample of the shards.

Run from the repository root:  ``.venv/bin/python bench/loader.py [--data sample|coco] [--teacher gt-mask|stage]``

1. **Pack** (in a temporary folder, unless ``--shards DIR`` names an existing split folder): the built-in
   sample (``sample`` + ``prepare`` stages, default params; ``--data coco``: the real images of
   ``../shared/data/coco-sample``), a teacher store, then the ``pack`` stage twice: with the default 4096
   samples per shard for bytes per sample (a realistic shard: the tar trailer is spread over many samples),
   and with 16 per shard for the loader (so every worker gets shards). The store comes from
   ``--teacher gt-mask`` (default: ``teacher/gt_mask.py``, the GT masks as logits in the teacher stage's layout and
   geometry, seconds) or ``--teacher stage`` (the real ``teacher-logits`` stage, local executor: SAM2.1 tiny
   with random weights when no checkpoint is present, several seconds per image on CPU, and noise logits
   that compress worse than a trained teacher's).
2. **Loader**: ``make_loader`` on the train split, batch 32, shuffle buffer 256, ``--workers`` worker
   processes, real decoders, hflip + box jitter, endless; samples/s over ``--batches`` batches after the
   first one (worker start-up excluded).
3. **Trainer**: the train stage's step (``trainer.TrainStep``: PicoSAM2 forward, its distillation loss, backward,
   AdamW) on CPU at batch 32 on a loader batch; samples/s over ``--steps`` steps after one warm-up step, torch on
   all cores.
4. **Epoch boundaries**: ``--epochs`` epochs of the train split through the trainer's ``batch_stream`` (a fresh,
   seeded loader per epoch, as the train stage makes them), consumed by a stand-in for a GPU step that holds
   each batch for a fixed time (the host idles while the device works) at half the loader's measured rate.
   Side by side in one run: the next epoch's loader started when the last one ends, and ``batch_stream``'s
   default lookahead; for each the wall time and the share of it spent waiting for batches.

Loader and trainer run one after the other, not together. Prints bytes per sample (target <= 15 KB at
96x96), the loader / trainer ratio (target >= 3), and CPU milliseconds per sample of each (the loader's
pipeline in-process, no workers), which a busy machine disturbs much less than wall-clock rates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from picosam_pipeline.config import (  # noqa: E402
    Config,
    PackConfig,
    PrepareConfig,
    RuntimeConfig,
    SampleConfig,
    SplitSource,
    TeacherConfig,
    TrainConfig,
)
from picosam_pipeline.device import Runtime, resolve_runtime  # noqa: E402
from picosam_pipeline.stages import pack, prepare, sample, teacher_logits  # noqa: E402
from picosam_pipeline.teacher.gt_mask import write_mask_teacher_store  # noqa: E402
from picosam_pipeline.train.loader import count_samples, make_loader  # noqa: E402
from picosam_pipeline.train.losses import PRESETS, DistillationLoss  # noqa: E402
from picosam_pipeline.train.shards import read_shard_index  # noqa: E402
from picosam_pipeline.train.students import build_student  # noqa: E402
from picosam_pipeline.train.targets import resolve_target  # noqa: E402
from picosam_pipeline.train.trainer import EPOCH_LOOKAHEAD, TrainData, TrainStep, batch_stream, build_optimizer  # noqa: E402

COCO = REPO.parent / "shared" / "data" / "coco-sample"
BATCH = 32


def build_pack(root: Path, data: str, teacher: str, context_margin: float) -> tuple[Path, float, str]:
    """Pack ``data`` under ``root``; returns (train split folder for the loader, bytes per sample, what was run)."""
    if data == "coco":
        splits = [
            SplitSource(s, str(COCO / f"annotations/instances_{s}2017.json"), str(COCO / f"{s}2017"))
            for s in ("train", "val")
        ]
    else:
        splits = [
            SplitSource(s, str(root / f"sample/annotations/instances_{s}.json"), str(root / "sample" / s))
            for s in ("train", "val")
        ]
    cfg = Config(
        runtime=RuntimeConfig(device="cpu", metrics_dir=str(root / "metrics")),
        sample=SampleConfig(out_dir=str(root / "sample")),
        prepare=PrepareConfig(splits=splits, out_dir=str(root / "prepared")),
        teacher=TeacherConfig(
            index=str(root / "prepared/index.parquet"),
            context_margin=context_margin,
            executor="local",
            allow_random_weights=True,
            out=str(root / "logits.zarr"),
        ),
        pack=PackConfig(
            index=str(root / "prepared/index.parquet"),
            stores_dir=str(root / "stores"),
            teachers=["gt"],
            out_dir=str(root / "shards"),
        ),
    )
    if data == "sample":
        sample.run(cfg, None)
    prepare.run(cfg, None)
    if teacher == "stage":
        teacher_logits.run(cfg, resolve_runtime(cfg.runtime))
        weights = (
            "a checkpoint" if cfg.teacher.checkpoint and Path(cfg.teacher.checkpoint).is_file() else "RANDOM weights"
        )
        made = f"the teacher-logits stage ({cfg.teacher.model}, {weights})"
    else:
        write_mask_teacher_store(
            cfg.pack.index, cfg.pack.store_paths()["gt"], splits=cfg.pack.splits, context_margin=context_margin
        )
        made = "a gt-mask store (GT masks as logits via teacher/gt_mask.py; the teacher stage was not run)"
    pack.run(cfg, None)  # default samples_per_shard: the realistic size per sample
    metrics = json.loads((root / "metrics/pack.json").read_text())
    small = dataclasses.replace(cfg.pack, out_dir=str(root / "small_shards"), samples_per_shard=16)
    pack.run(dataclasses.replace(cfg, pack=small), None)
    return root / "small_shards/train", metrics["bytes_per_sample"], made


def loader_rate(split: Path, workers: int, batches: int, jitter: float) -> float:
    """Samples/s of the loader with real decoders and augmentation, start-up excluded."""
    loader = make_loader(
        split,
        batch_size=BATCH,
        shuffle_buffer=256,
        num_workers=workers,
        seed=0,
        hflip=True,
        jitter=jitter,
        infinite=True,
    )
    if loader.num_workers < workers:
        print(f"  note: {split} has fewer shards than {workers} workers; the loader uses {loader.num_workers}")
    stream = iter(loader)
    next(stream)  # worker start-up and the first shuffle-buffer fill
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(stream)["ann_id"])
    return n / (time.perf_counter() - start)


def loader_cpu_ms(split: Path, batches: int, jitter: float) -> float:
    """CPU milliseconds per sample of the same pipeline in this process (no workers): load-independent."""
    stream = iter(
        make_loader(
            split, batch_size=BATCH, shuffle_buffer=256, num_workers=0, seed=0, hflip=True, jitter=jitter, infinite=True
        )
    )
    next(stream)
    start, n = time.process_time(), 0
    for _ in range(batches):
        n += len(next(stream)["ann_id"])
    return 1000 * (time.process_time() - start) / n


def epoch_boundaries(
    split: Path, workers: int, epochs: int, hold_s: float, lookahead: int | None
) -> tuple[float, float]:
    """(seconds, share of them waiting for batches) for ``epochs`` epochs of ``split`` through ``batch_stream``,
    each batch held ``hold_s`` seconds (a GPU step's time, the host idle)."""

    def train_epoch(epoch: int):
        return make_loader(split, batch_size=BATCH, shuffle_buffer=256, num_workers=workers, seed=epoch, hflip=True)

    data = TrainData(train_epoch=train_epoch, val=list, input_size=96, fingerprint="bench", source=str(split))
    stream = batch_stream(data, 0, 0, lookahead=lookahead)
    next(stream)  # the first epoch's start-up, as the trainer's rate excludes its first step
    waited, start = 0.0, time.perf_counter()
    while True:
        asked = time.perf_counter()
        epoch, _, _ = next(stream)
        if epoch == epochs:
            break
        waited += time.perf_counter() - asked
        time.sleep(hold_s)
    elapsed = time.perf_counter() - start
    stream.close()
    return elapsed, waited / elapsed


def trainer_rate(batch: dict[str, torch.Tensor], steps: int) -> tuple[float, float]:
    """Samples/s of the train stage's step (``trainer.TrainStep``: PicoSAM2 forward, its distillation loss,
    backward, AdamW; no clipping, as the papers) on CPU at the batch's size, and CPU ms per sample."""
    model = build_student("picosam2").train()
    cpu = Runtime(device=torch.device("cpu"), autocast_dtype=None, seed=0)
    step = TrainStep(
        model,
        model,
        build_optimizer(model, TrainConfig(lr=1e-3), cpu.device),
        DistillationLoss(**PRESETS["picosam2"]),
        resolve_target("auto", {}, ("gt",)),
        cpu,
        grad_clip=0.0,
    )
    tensors = (batch["image"], batch["gt_mask"], batch["teacher_logits"], batch["confidence"])

    step(*tensors, 1e-3)  # warm-up: allocator, first-call overheads
    start, cpu_time = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step(*tensors, 1e-3)
    n = steps * len(batch["ann_id"])
    return n / (time.perf_counter() - start), 1000 * (time.process_time() - cpu_time) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        choices=["sample", "coco"],
        default="sample",
        help="built-in synthetic sample, or the real images of ../shared/data/coco-sample",
    )
    parser.add_argument(
        "--teacher",
        choices=["gt-mask", "stage"],
        default="gt-mask",
        help="gt-mask: store from the GT masks (seconds); stage: the real teacher-logits stage (minutes on CPU)",
    )
    parser.add_argument(
        "--context-margin", type=float, default=0.0, help="teacher.context_margin of the store (0.25: 144-px frames)"
    )
    parser.add_argument("--shards", default=None, help="bench this existing split folder instead of packing")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes")
    parser.add_argument("--jitter", type=float, default=0.1, help="box jitter (fraction of the crop side)")
    parser.add_argument("--batches", type=int, default=60, help="timed loader batches")
    parser.add_argument("--steps", type=int, default=10, help="timed trainer steps")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of the epoch-boundary measurement")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        if args.shards:
            split = Path(args.shards)
            index = read_shard_index(split)
            bytes_per_sample, made = sum(s.bytes for s in index.shards) / index.samples, f"existing shards {split}"
        else:
            split, bytes_per_sample, made = build_pack(Path(tmp), args.data, args.teacher, args.context_margin)
        frame, samples = read_shard_index(split).frame, count_samples(split)
        loader_sps = loader_rate(split, args.workers, args.batches, args.jitter)
        loader_ms = loader_cpu_ms(split, args.batches // 2, args.jitter)
        batch = next(iter(make_loader(split, batch_size=BATCH, shuffle_buffer=0, num_workers=0, seed=0, infinite=True)))
        trainer_sps, trainer_ms = trainer_rate(batch, args.steps)
        hold_s = BATCH / (0.5 * loader_sps)  # a consumer at half the loader's rate: it waits mostly at epoch starts
        boundaries = {
            lookahead: epoch_boundaries(split, args.workers, args.epochs, hold_s, lookahead)
            for lookahead in (None, EPOCH_LOOKAHEAD)
        }

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )
    source = "built-in sample" if args.data == "sample" else "../shared/data/coco-sample (real COCO images)"
    print(f"data: {made if args.shards else source}, {samples} train samples; teacher store: {made}")
    print(
        f"shards: {bytes_per_sample:,.0f} bytes/sample, frame {frame.stored_size}x{frame.stored_size} "
        f"(crop {frame.crop_size}) (target <= 15,000 at 96x96)"
    )
    print(
        f"loader: {loader_sps:,.0f} samples/s ({args.workers} workers, batch {BATCH}, shuffle buffer 256, "
        f"hflip + jitter {args.jitter}, {args.batches} batches)"
    )
    print(
        f"trainer: {trainer_sps:,.1f} samples/s (PicoSAM2 forward + loss + backward + AdamW, CPU, batch {BATCH}, "
        f"{args.steps} steps)"
    )
    print(f"ratio loader / trainer: {loader_sps / trainer_sps:,.1f}x (target >= 3)")
    # Wall-clock rates move with whatever else runs on the machine; CPU time per sample does much less.
    print(
        f"CPU per sample: loader {loader_ms:.2f} ms (one process, no workers), trainer {trainer_ms:.1f} ms "
        f"(all threads): one loader core feeds {trainer_ms / loader_ms:,.0f} trainer cores' worth of steps"
    )
    batches = -(-samples // BATCH)
    for lookahead, (elapsed, wait_share) in boundaries.items():
        when = "when the last one ends" if lookahead is None else f"{lookahead} batches ahead"
        print(
            f"epoch boundaries, next epoch's loader started {when}: {args.epochs} epochs of ~{batches} batches, "
            f"each held {hold_s * 1000:.0f} ms: {elapsed:.2f} s, {wait_share * 100:.0f} % waiting for batches"
        )


if __name__ == "__main__":
    main()
