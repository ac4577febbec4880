"""Training a student on a pack's shards: the train and val splits, checked to go together and with the student, the
loaders :func:`trainer.train` reads them through, and what the train stage reports of a run.

The pack (``pack.out_dir``, the train stage's ``train.shards``) holds ``train/`` and ``val/``, each with its
``shards.json`` (:class:`~picosam_pipeline.train.shards.ShardIndex`). Both must hold crops of one side, a multiple
of 16 (the students' strides), of the same teachers and the same crop convention (:func:`read_pack_shards`,
:func:`check_shard_crops`); unless ``recipe.name`` is ``custom`` the convention must be the one the student's paper
trains it on. ``shards.json`` lists every shard's sha256, so its digest identifies the training data for resuming
(:attr:`TrainData.fingerprint <picosam_pipeline.train.trainer.TrainData>`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from picosam_pipeline.config import RecipeConfig, TrainConfig
from picosam_pipeline.data.crop_convention import check_crops, student_crops
from picosam_pipeline.device import Runtime
from picosam_pipeline.environment import distributed_ranks
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.recipes import AUTO, full_run_min_samples, settle_auto_size
from picosam_pipeline.train.checkpoints import checkpoint_provenance
from picosam_pipeline.train.loader import ShardLoader, make_loader
from picosam_pipeline.train.shards import ShardIndex, read_shard_index
from picosam_pipeline.train.targets import resolve_target
from picosam_pipeline.train.trainer import TrainData, TrainResult, epoch_seed


@dataclass(frozen=True)
class PackShards:
    """The train and val splits of a pack: their folders and ``shards.json``."""

    train_dir: Path
    val_dir: Path
    train: ShardIndex
    val: ShardIndex

    @property
    def input_size(self) -> int:
        """The crops' side in px (both splits': :func:`read_pack_shards` checks it), the students' input size."""
        return self.train.frame.crop_size


def read_pack_shards(shards: str | Path) -> PackShards:
    """Read ``shards/train`` and ``shards/val``; PipelineError (naming the fix) when one is not a shard folder, or
    when their crops are not of one side that is a multiple of 16, or their teachers differ."""
    train_dir, val_dir = Path(shards) / "train", Path(shards) / "val"
    train_index, val_index = read_shard_index(train_dir), read_shard_index(val_dir)  # PipelineError names the fix
    size = train_index.frame.crop_size
    if size % 16 or val_index.frame.crop_size != size:
        raise PipelineError(
            f"{train_index.path}: crops are {size} px (val {val_index.frame.crop_size} px); the students "
            "need one side, a multiple of 16, for both splits: set teacher.store_size (96) and rerun teacher + pack"
        )
    if list(val_index.teachers) != list(train_index.teachers):
        raise PipelineError(
            f"{train_index.path} holds teachers {list(train_index.teachers)} but {val_index.path} "
            f"{list(val_index.teachers)}; pack both splits in one run of the pack stage"
        )
    return PackShards(train_dir, val_dir, train_index, val_index)


def check_shard_crops(shards: PackShards, *, student: str, recipe: str) -> None:
    """The train and val shards must hold the same crops (the whole record), and, unless ``recipe`` is ``custom``,
    of the convention the recipe pairs with ``student``; :class:`CropMismatch` otherwise, before any work."""
    train, val = shards.train, shards.val
    check_crops(val.crop, str(val.path), train.crop, str(train.path), "pack both splits in one run of the pack stage")
    if recipe != "custom":
        check_crops(
            train.crop,
            str(train.path),
            student_crops(student),
            f"train.student={student} (recipe.name={recipe})",
            "repack the shards with this recipe (`dvc repro pack` reruns the teacher passes and pack with its "
            "teacher.prompt), or set recipe.name to the paper the shards were packed for (recipe.name=custom trains "
            "any student on any crops)",
            keys=("convention",),
        )


def resolve_train_config(
    t: TrainConfig,
    device_type: str,
    shards: PackShards,
    recipe: RecipeConfig | None = None,
    dataset_name: str = "sample",
) -> TrainConfig:
    """``t`` with ``recipe.size: auto`` settled on the train shards' size (:func:`settle_recipe_size`), ``compile:
    auto`` resolved for the device and ``steps: epoch`` turned into the steps of one pass over the train shards on
    all ranks (``WORLD_SIZE``): resolved once, recorded as such."""
    if recipe is not None:
        t = settle_recipe_size(t, recipe, dataset_name, shards.train.samples)
    t = dataclasses.replace(t, compile=t.compiles(device_type))
    if t.steps == "epoch":  # the papers' one epoch: every train sample once, over all ranks
        samples = shards.train.samples
        world_size = distributed_ranks().world_size
        t = dataclasses.replace(t, steps=max(1, math.ceil(samples / (t.batch_size * world_size))))
        print(
            f"[train] train.steps: epoch = {t.steps} steps ({samples} samples, batch {t.batch_size} "
            f"x {world_size} rank(s))"
        )
    return t


def settle_recipe_size(t: TrainConfig, recipe: RecipeConfig, dataset_name: str, train_samples: int) -> TrainConfig:
    """``t`` with the training keys of ``recipe.size: auto`` chosen by the train split's size
    (``recipes.settle_auto_size``: the papers' full run only when an epoch of it outlasts its warm-up twice, else the
    sample run); said on stdout. Unchanged for a recipe ``custom`` or a size given as sample or full."""
    if recipe.name == "custom" or recipe.size != AUTO:
        return t
    current = {f"train.{f.name}": getattr(t, f.name) for f in dataclasses.fields(t)}
    size, changes = settle_auto_size(recipe.name, dataset_name, train_samples, current)
    need = full_run_min_samples(recipe.name)
    print(
        f"[train] recipe.size: auto = {size} ({train_samples} train samples; the {recipe.name} full run needs "
        f"{need} or more, so that one epoch lasts twice its warm-up)"
        + (f": {', '.join(f'{k}={v}' for k, v in changes.items())}" if changes else "")
    )
    return dataclasses.replace(t, **{k.removeprefix("train."): v for k, v in changes.items()})


class ShardLoaders:
    """The loaders of a run on ``shards``: one per train epoch (seeded by ``runtime.seed`` and the epoch), and the
    val pass; all kept, to count the shards skipped under ``on_corrupt_shard: skip``."""

    def __init__(self, t: TrainConfig, runtime: Runtime, shards: PackShards) -> None:
        self.t, self.runtime, self.shards = t, runtime, shards
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.workers = t.loader_workers(runtime.device.type, cores)
        self.pin = runtime.device.type == "cuda"  # pinned batches: the trainer's copies to the GPU run behind compute
        self.made: list[ShardLoader] = []

    def train_epoch(self, epoch: int) -> ShardLoader:
        t = self.t
        self.made.append(
            make_loader(
                self.shards.train_dir,
                batch_size=t.batch_size,
                shuffle_buffer=t.shuffle_buffer,
                num_workers=self.workers,
                seed=epoch_seed(self.runtime.seed, epoch),
                hflip=t.hflip,
                jitter=t.jitter,
                on_corrupt_shard=t.on_corrupt_shard,
                input_size=self.shards.input_size,
                pin_memory=self.pin,
            )
        )
        return self.made[-1]

    def val(self) -> ShardLoader:
        """No shuffling, no augmentation: the mIoU of a fixed set."""
        self.made.append(
            make_loader(
                self.shards.val_dir,
                batch_size=self.t.batch_size,
                shuffle_buffer=0,
                num_workers=self.workers,
                seed=0,
                on_corrupt_shard=self.t.on_corrupt_shard,
                input_size=self.shards.input_size,
                pin_memory=self.pin,
            )
        )
        return self.made[-1]

    def train_data(self) -> TrainData:
        """What :func:`trainer.train` reads: these loaders, the shards' teachers and crop record, and the sha256 of
        the train ``shards.json`` as the data's fingerprint."""
        train = self.shards.train
        return TrainData(
            train_epoch=self.train_epoch,
            val=self.val,
            input_size=self.shards.input_size,
            fingerprint=hashlib.sha256(train.path.read_bytes()).hexdigest(),
            source=str(self.shards.train_dir),
            teachers=tuple(train.teachers),
            crop=train.crop,
        )

    @property
    def skipped_shards(self) -> int:
        """Distinct shards any loader skipped (``on_corrupt_shard: skip``)."""
        return len({problem.shard for loader in self.made for problem in loader.skipped})


def train_report(t: TrainConfig, shards: PackShards, result: TrainResult, *, skipped_shards: int) -> dict[str, Any]:
    """The train stage's ``report.json``: student, target, parameters, steps, epochs, both val IoUs, the best step,
    the crop record, the final loss terms (mean of the last ``loss_window_steps``), world size, skipped shards, and
    whether the student is untrained with the ``warnings`` that say why (``trainer.TrainResult.warnings``)."""
    state = result.state
    window = max(1, min(100, state.step // 10))
    return {
        "student": t.student,
        "target": resolve_target(t.target, t.target_weights, shards.train.teachers).describe(),
        "params": result.params,
        "steps": state.step,
        "epochs": state.step * t.batch_size * result.world_size / shards.train.samples,
        "val_iou_before": result.val_iou_before,
        "val_iou_after": result.val_iou_after,
        "best_step": state.best_step,
        "val_iou_best": state.best_iou,
        "crop": shards.train.crop,
        "loss": result.final_loss(window),
        "loss_window_steps": window,
        "world_size": result.world_size,
        "skipped_shards": skipped_shards,
        "untrained": result.untrained,
        "warnings": result.warnings,
        "provenance": checkpoint_provenance(result.student_path),
    }


def train_headline(report: dict[str, Any]) -> dict[str, Any]:
    """``metrics/train.json``: val IoU before (the untrained student) and after, and whether the student is untrained
    (the warnings that say why are in report.json: text is not a metric DVC can compare)."""
    return {k: report[k] for k in ("val_iou_before", "val_iou_after", "untrained")}


def train_run_facts(t: TrainConfig, runtime: Runtime, result: TrainResult, *, loader_workers: int) -> dict[str, Any]:
    """How the run went (the run log's record, not a result): samples/s, the share of that time spent waiting for the
    loader, device, the step it resumed from, loader workers, whether the student was compiled."""
    return {
        "samples_per_s": result.samples_per_s,
        "loader_wait_share": result.loader_wait_share,
        "device": runtime.describe(),
        "resumed_from_step": result.resumed_from,
        "loader_workers": loader_workers,
        "compiled": t.compile,
    }


def train_summary(result: TrainResult) -> dict[str, Any]:
    """What the train stage returns (run-stage prints it): steps, val IoU before / after, the best step and its IoU
    (rounded to 4 places), samples/s, whether the student is untrained."""
    state = result.state
    return {
        "steps": state.step,
        "val_iou_before": round(result.val_iou_before, 4),
        "val_iou_after": round(result.val_iou_after, 4),
        "best": (state.best_step, round(state.best_iou, 4)),
        "samples_per_s": None if result.samples_per_s is None else round(result.samples_per_s, 1),
        "untrained": result.untrained,
    }
