"""Stage ``train``: packed shards -> a trained student, with DVC metrics and plots.

Reads ``<train.shards>/train`` and ``<train.shards>/val`` (written by ``pack``) through ``loader.make_loader``
and runs the loop of ``picosam_pipeline/train/trainer.py``. Writes, from rank 0:

* ``<train.out_dir>/student.pt``: the last step's weights, ``student_best.pt``: the weights of the best val IoU
  (``checkpoints.load_student``; evaluate / quantize / predict read the one params name, default best); both record
  the crop convention of the shards; ``config.resolved.json``; built in ``<out_dir>.partial`` and renamed into place
  at the end (``outputs.py``);
* ``<train.state_dir>/checkpoint.pt`` (default ``<out_dir>.state``): the resumable state, outside the output;
* ``<train.out_dir>/report.json``: student, target, steps, epochs, parameters, both val IoUs, the best step, the final
  loss terms and lambda (mean of the last steps), world size, skipped shards;
* ``metrics/train.json``: the headline, val IoU before (the untrained student) and after (samples/s, the share of
  that time spent waiting for the loader, the loader workers and whether the student was compiled go to the run
  log ``metrics/runs/train.jsonl``: a rate is not a result);
* ``metrics/train/``: the dvclive log (``train/live.py``): per step the loss, its terms and the learning rate, per
  evaluation the val IoU (plots for ``dvc plots show``), and ``metrics.json``, the live summary (step, last loss)
  that ``dvc exp show`` shows while the run trains.

A run that is killed and started again resumes from ``checkpoint.pt`` (a checkpoint from other settings or other
shards is not resumed). The state and metrics folders are checked writable, and the state folder's free space
for the checkpoint, before any work, not at the first checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from pathlib import Path
from typing import Any

from picosam_pipeline.config import Config, ConfigError, require_inputs
from picosam_pipeline.data.crops import convention_differences
from picosam_pipeline.device import Runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.outputs import (
    StageOutput,
    check_space,
    output_folder,
    probe_writable,
    save_resolved,
    writes_output,
)
from picosam_pipeline.recipes import PAIRS
from picosam_pipeline.reports import write_metrics, write_report
from picosam_pipeline.train.live import LiveLog
from picosam_pipeline.train.loader import ShardLoader, make_loader
from picosam_pipeline.train.shards import read_shard_index
from picosam_pipeline.train.targets import resolve_target
from picosam_pipeline.train.trainer import LOG_COLUMNS, TrainData, epoch_seed, train

LIVE_DIR = "train"  # the dvclive folder in runtime.metrics_dir, beside train.json


def output(cfg: Config) -> StageOutput | None:
    """``train.out_dir`` (student.pt), on rank 0 only; its state folder and the metrics folder are checked writable
    and the free space for the checkpoint and the weights before any work, not at the first checkpoint."""
    if int(os.environ.get("RANK", "0")):  # torchrun's other ranks write nothing
        return None
    from picosam_pipeline.train.students import build_student

    t = cfg.train
    params = sum(p.numel() for p in build_student(t.student).parameters())
    # float32 weights + AdamW's two moments in checkpoint.pt (plus its temporary while replaced), weights in student.pt
    probe_writable(t.resume_dir(), "train.state_dir", "train")
    check_space(Path(t.resume_dir()), 2 * 12 * params + 2**20, "train.state_dir", "train", "the resumable checkpoint")
    return StageOutput(
        cfg,
        "train",
        "train.out_dir",
        t.out_dir,
        sections=["recipe", "train", "runtime"],
        names=("student*.pt",),
        what="trained weights",
        inputs={"train.shards": t.shards, "train.state_dir": t.resume_dir()},
        writes={"train.state_dir": t.resume_dir(), "runtime.metrics_dir": cfg.runtime.metrics_dir},
        needed_bytes=4 * params + 2**20,
        resumes=f"the resumable state in {t.resume_dir()} is kept: the rerun resumes from its last "
        "checkpoint (every train.checkpoint_every steps).",
    )


@writes_output(output)
def run(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    """Train ``cfg.train.student`` on the shards; returns val IoU before / after, steps and samples/s."""
    t = cfg.train
    require_inputs({"train.shards": t.shards})
    train_dir, val_dir = Path(t.shards) / "train", Path(t.shards) / "val"
    train_index, val_index = read_shard_index(train_dir), read_shard_index(val_dir)  # PipelineError names the fix
    size = train_index.frame.crop_size
    if size % 16 or val_index.frame.crop_size != size:
        raise PipelineError(
            f"{train_index.path}: crops are {size} px (val {val_index.frame.crop_size} px); the students "
            "need one side, a multiple of 16, for both splits: set teacher.store_size (96) and rerun teacher + pack"
        )

    loaders: list[ShardLoader] = []  # every loader made, to count shards skipped under on_corrupt_shard=skip
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = t.loader_workers(runtime.device.type, cores)
    pin = runtime.device.type == "cuda"  # pinned batches: the trainer's copies to the GPU run behind compute

    def train_epoch(epoch: int) -> ShardLoader:
        loaders.append(
            make_loader(
                train_dir,
                batch_size=t.batch_size,
                shuffle_buffer=t.shuffle_buffer,
                num_workers=workers,
                seed=epoch_seed(runtime.seed, epoch),
                hflip=t.hflip,
                jitter=t.jitter,
                on_corrupt_shard=t.on_corrupt_shard,
                input_size=size,
                pin_memory=pin,
            )
        )
        return loaders[-1]

    def val() -> ShardLoader:  # no shuffling, no augmentation: the mIoU of a fixed set
        loaders.append(
            make_loader(
                val_dir,
                batch_size=t.batch_size,
                shuffle_buffer=0,
                num_workers=workers,
                seed=0,
                on_corrupt_shard=t.on_corrupt_shard,
                input_size=size,
                pin_memory=pin,
            )
        )
        return loaders[-1]

    check_shard_crops(cfg, train_index, val_index)  # before any work: the student and the crops must go together
    t = dataclasses.replace(t, compile=t.compiles(runtime.device.type))  # auto resolved once, recorded as such
    if t.steps == "epoch":  # the papers' one epoch: every train sample once, over all ranks
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        t = dataclasses.replace(t, steps=max(1, math.ceil(train_index.samples / (t.batch_size * world_size))))
        print(
            f"[train] train.steps: epoch = {t.steps} steps ({train_index.samples} samples, batch {t.batch_size} "
            f"x {world_size} rank(s))"
        )
    # shards.json lists every shard's sha256, so its digest identifies the training data for resuming
    fingerprint = hashlib.sha256(train_index.path.read_bytes()).hexdigest()
    if list(val_index.teachers) != list(train_index.teachers):
        raise PipelineError(
            f"{train_index.path} holds teachers {list(train_index.teachers)} but {val_index.path} "
            f"{list(val_index.teachers)}; pack both splits in one run of the pack stage"
        )
    data = TrainData(
        train_epoch=train_epoch,
        val=val,
        input_size=size,
        fingerprint=fingerprint,
        source=str(train_dir),
        teachers=tuple(train_index.teachers),
        crop=train_index.crop,
    )
    # The resumable state lives outside the DVC output, so the output is only the result (and DVC's run cache
    # can restore it); a killed run resumes from state_dir.
    out_dir = output_folder(t.out_dir, missing_ok=True)  # rank 0: <out_dir>.partial, renamed when this returns
    live = (
        LiveLog(Path(cfg.runtime.metrics_dir) / LIVE_DIR, LOG_COLUMNS, every=t.log_every) if _is_main_rank() else None
    )
    result = train(t, runtime, data, out_dir, state_dir=t.resume_dir(), on_log=live)
    if not result.is_main:
        return {"rank": "worker"}  # rank 0 writes the files

    state = result.state
    live.end(state)
    save_resolved(dataclasses.replace(cfg, train=t), out_dir, ["recipe", "train", "runtime"])
    window = max(1, min(100, state.step // 10))
    metrics = {
        "student": t.student,
        "target": resolve_target(t.target, t.target_weights, train_index.teachers).describe(),
        "params": result.params,
        "steps": state.step,
        "epochs": state.step * t.batch_size * result.world_size / train_index.samples,
        "val_iou_before": result.val_iou_before,
        "val_iou_after": result.val_iou_after,
        "best_step": state.best_step,
        "val_iou_best": state.best_iou,
        "crop": train_index.crop,
        "loss": result.final_loss(window),
        "loss_window_steps": window,
        "world_size": result.world_size,
        "skipped_shards": len({problem.shard for loader in loaders for problem in loader.skipped}),
    }
    run = {
        "samples_per_s": result.samples_per_s,
        "loader_wait_share": result.loader_wait_share,
        "device": runtime.describe(),
        "resumed_from_step": result.resumed_from,
        "loader_workers": workers,
        "compiled": t.compile,
    }
    write_report(out_dir, metrics)
    # The step and the last loss are in the live summary (metrics/train/metrics.json); the rest in report.json.
    headline = {k: metrics[k] for k in ("val_iou_before", "val_iou_after")}
    write_metrics(cfg, "train", headline, run)
    return {
        "steps": state.step,
        "val_iou_before": round(result.val_iou_before, 4),
        "val_iou_after": round(result.val_iou_after, 4),
        "best": (state.best_step, round(state.best_iou, 4)),
        "samples_per_s": None if result.samples_per_s is None else round(result.samples_per_s, 1),
    }


def check_shard_crops(cfg: Config, train_index, val_index) -> None:
    """The train and val shards must hold the same crops, of the convention the recipe pairs with the student."""
    differences = convention_differences(val_index.crop, train_index.crop)
    if differences:
        raise PipelineError(
            f"{val_index.path} and {train_index.path} hold different crops ({'; '.join(differences)}); "
            "pack both splits in one run of the pack stage"
        )
    student, convention = cfg.train.student, train_index.crop["convention"]
    if cfg.recipe.name != "custom" and PAIRS[student] != convention:
        raise ConfigError(
            f"train.student={student} (recipe.name={cfg.recipe.name}) is trained on {PAIRS[student]} crops, but "
            f"{train_index.path} holds {convention} crops; repack the shards with this recipe (`dvc repro pack` reruns "
            "the teacher passes and pack with its teacher.prompt), or set recipe.name to the paper the shards were "
            "packed for (recipe.name=custom trains any student on any crops)"
        )


def _is_main_rank() -> bool:
    """Rank 0 of a torchrun launch (``RANK``), or a single process: the one that writes the log."""
    return int(os.environ.get("RANK", "0")) == 0
