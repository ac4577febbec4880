"""Stage ``train``: packed shards -> a trained student, with DVC metrics and plots.

Reads ``<train.shards>/train`` and ``<train.shards>/val`` (written by ``pack``) through ``loader.make_loader``
and runs the loop of ``picosam_pipeline/train/trainer.py``. Writes, from rank 0:

* ``<train.out_dir>/student.pt``: the final weights (``checkpoints.load_student``; what evaluate / export read),
  ``checkpoint.pt``: the resumable state, ``config.resolved.json``;
* ``metrics/train.json``: val IoU before (the untrained student) and after, final loss terms (mean of the
  last steps), samples/s, steps, epochs, parameters;
* plots ``metrics/train_steps.csv`` (per step: learning rate, loss and its terms) and ``metrics/train_val.csv``
  (crop-space val IoU per evaluation, step 0 = untrained), rendered by ``dvc plots show``.

A run that is killed and started again resumes from ``checkpoint.pt``; ``dvc.yaml`` keeps ``out_dir`` across
``dvc repro`` (``persist: true``) for that, and a checkpoint from other settings or other shards is not resumed.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Any

from picosam_pipeline.config import Config, require_inputs, save_resolved, write_metrics
from picosam_pipeline.device import Runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.train.loader import ShardLoader, make_loader
from picosam_pipeline.train.shards import read_shard_index
from picosam_pipeline.train.targets import resolve_target
from picosam_pipeline.train.trainer import LOG_COLUMNS, VAL_COLUMNS, TrainData, epoch_seed, train

STEPS_PLOT, VAL_PLOT = "train_steps.csv", "train_val.csv"  # in runtime.metrics_dir, beside train.json


def run(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    """Train ``cfg.train.student`` on the shards; returns val IoU before / after, steps and samples/s."""
    t = cfg.train
    require_inputs({"train.shards": t.shards})
    train_dir, val_dir = Path(t.shards) / "train", Path(t.shards) / "val"
    train_index, val_index = read_shard_index(train_dir), read_shard_index(val_dir)  # PipelineError names the fix
    size = train_index.frame.crop_size
    if size % 16 or val_index.frame.crop_size != size:
        raise PipelineError(f"{train_index.path}: crops are {size} px (val {val_index.frame.crop_size} px); the students "
                            "need one side, a multiple of 16, for both splits: set teacher.store_size (96) and rerun teacher + pack")

    loaders: list[ShardLoader] = []  # every loader made, to count shards skipped under on_corrupt_shard=skip
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = t.loader_workers(runtime.device.type, cores)
    pin = runtime.device.type == "cuda"  # pinned batches: the trainer's copies to the GPU run behind compute

    def train_epoch(epoch: int) -> ShardLoader:
        loaders.append(make_loader(train_dir, batch_size=t.batch_size, shuffle_buffer=t.shuffle_buffer,
                                   num_workers=workers, seed=epoch_seed(runtime.seed, epoch), hflip=t.hflip,
                                   jitter=t.jitter, on_corrupt_shard=t.on_corrupt_shard, input_size=size,
                                   pin_memory=pin))
        return loaders[-1]

    def val() -> ShardLoader:  # no shuffling, no augmentation: the mIoU of a fixed set
        loaders.append(make_loader(val_dir, batch_size=t.batch_size, shuffle_buffer=0, num_workers=workers,
                                   seed=0, on_corrupt_shard=t.on_corrupt_shard, input_size=size, pin_memory=pin))
        return loaders[-1]

    # shards.json lists every shard's sha256, so its digest identifies the training data for resuming
    fingerprint = hashlib.sha256(train_index.path.read_bytes()).hexdigest()
    if list(val_index.teachers) != list(train_index.teachers):
        raise PipelineError(f"{train_index.path} holds teachers {list(train_index.teachers)} but {val_index.path} "
                            f"{list(val_index.teachers)}; pack both splits in one run of the pack stage")
    data = TrainData(train_epoch=train_epoch, val=val, input_size=size, fingerprint=fingerprint, source=str(train_dir),
                     teachers=tuple(train_index.teachers))
    # The resumable state lives outside the DVC output, so the output is only the result (and DVC's run cache
    # can restore it); a killed run resumes from state_dir.
    result = train(t, runtime, data, t.out_dir, state_dir=t.resume_dir())
    if not result.is_main:
        return {"rank": "worker"}  # rank 0 writes the files

    state = result.state
    save_resolved(cfg, t.out_dir, ["train", "runtime"])
    metrics_dir = Path(cfg.runtime.metrics_dir)
    write_csv(metrics_dir / STEPS_PLOT, LOG_COLUMNS, state.train_log)
    write_csv(metrics_dir / VAL_PLOT, VAL_COLUMNS, state.val_log)
    window = max(1, min(100, state.step // 10))
    metrics = {
        "student": t.student,
        "target": resolve_target(t.target, t.target_weights, train_index.teachers).describe(),
        "params": result.params,
        "steps": state.step,
        "epochs": state.step * t.batch_size * result.world_size / train_index.samples,
        "val_iou_before": result.val_iou_before,
        "val_iou_after": result.val_iou_after,
        "loss": result.final_loss(window),
        "loss_window_steps": window,
        "world_size": result.world_size,
        "skipped_shards": len({problem.shard for loader in loaders for problem in loader.skipped}),
    }
    run = {"samples_per_s": result.samples_per_s, "device": runtime.describe(), "resumed_from_step": result.resumed_from,
           "loader_workers": workers, "compiled": t.compile}
    write_metrics(cfg, "train", metrics, run)
    return {"steps": state.step, "val_iou_before": round(result.val_iou_before, 4),
            "val_iou_after": round(result.val_iou_after, 4),
            "samples_per_s": None if result.samples_per_s is None else round(result.samples_per_s, 1)}


def write_csv(path: Path, columns: tuple[str, ...], rows: list[list[float]]) -> None:
    """A DVC plot file: header, then one row per step (``step`` written as an integer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([int(row[0]), *row[1:]] for row in rows)
