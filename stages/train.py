"""Stage ``train``: packed shards -> a trained student, with DVC metrics and plots.

Reads ``<train.shards>/train`` and ``<train.shards>/val`` (written by ``pack``) through ``loader.make_loader``
and runs the loop of ``picosam_pipeline/train/trainer.py`` (the shards' checks, the loaders and the report:
``picosam_pipeline/train/shard_training.py``). Writes, from rank 0:

* ``<train.out_dir>/student.pt``: the last step's weights, ``student_best.pt``: the weights of the best val IoU
  (``checkpoints.load_student``; evaluate / quantize / predict read the one params name, default best); both record
  the crop convention of the shards; ``config.resolved.json``; built in ``<out_dir>.partial`` and renamed into place
  at the end (``outputs.py``);
* ``<train.state_dir>/checkpoint.pt`` (default ``<out_dir>.state``): the resumable state, outside the output;
* ``<train.out_dir>/report.json``: student, target, steps, epochs, parameters, both val IoUs, the best step, the final
  loss terms and lambda (mean of the last steps), world size, skipped shards, untrained and its warnings;
* ``metrics/train.json``: the headline, val IoU before (the untrained student) and after, and ``untrained`` (its
  warnings, a run too short to train or no val IoU gain, are said on stderr and carried by report.json and both
  checkpoints, whose meta quantize, export and package read). Samples/s, the share of that
  time spent waiting for the loader, the loader workers and whether the student was compiled go to the run log
  ``metrics/runs/train.jsonl``: a rate is not a result;
* ``metrics/train/``: the dvclive log (``train/live.py``): per step the loss, its terms and the learning rate, per
  evaluation the val IoU (plots for ``dvc plots show``), and ``metrics.json``, the live summary (step, last loss)
  that ``dvc exp show`` shows while the run trains.

A run that is killed and started again resumes from ``checkpoint.pt`` (a checkpoint from other settings or other
shards is not resumed). The state and metrics folders are checked writable, and the state folder's free space
for the checkpoint, before any work, not at the first checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from picosam_pipeline.config import Config, require_inputs
from picosam_pipeline.device import Runtime
from picosam_pipeline.environment import distributed_ranks
from picosam_pipeline.outputs import StageOutput, check_space, probe_writable, save_resolved
from picosam_pipeline.reports import write_metrics, write_report
from picosam_pipeline.train.live import LiveLog
from picosam_pipeline.train.shard_training import (
    ShardLoaders,
    check_shard_crops,
    read_pack_shards,
    resolve_train_config,
    train_headline,
    train_report,
    train_run_facts,
    train_summary,
)
from picosam_pipeline.train.trainer import LOG_COLUMNS, train

LIVE_DIR = "train"  # the dvclive folder in runtime.metrics_dir, beside train.json


def output(cfg: Config) -> StageOutput | None:
    """``train.out_dir`` (student.pt), on rank 0 only; its state folder and the metrics folder are checked writable
    and the free space for the checkpoint and the weights before any work, not at the first checkpoint."""
    if distributed_ranks().rank:  # torchrun's other ranks write nothing
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


def run(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    """Train ``cfg.train.student`` on the shards; returns val IoU before / after, steps and samples/s."""
    t = cfg.train
    # rank 0: <out_dir>.partial, renamed to out_dir when the block ends; the other ranks write nothing
    with output(cfg) or contextlib.nullcontext(Path(t.out_dir)) as out_dir:
        require_inputs({"train.shards": t.shards})
        shards = read_pack_shards(t.shards)  # PipelineError names the fix
        # before any work: the student and the crops must go together
        check_shard_crops(shards, student=t.student, recipe=cfg.recipe.name)
        # auto resolved once (recipe.size by the train shards' size), recorded as such
        t = resolve_train_config(t, runtime.device.type, shards, cfg.recipe, cfg.dataset.name)
        loaders = ShardLoaders(t, runtime, shards)
        data = loaders.train_data()
        # The resumable state lives outside the DVC output, so the output is only the result (and DVC's run cache
        # can restore it); a killed run resumes from state_dir.
        live = (
            LiveLog(Path(cfg.runtime.metrics_dir) / LIVE_DIR, LOG_COLUMNS, every=t.log_every)
            if _is_main_rank()
            else None
        )
        result = train(t, runtime, data, out_dir, state_dir=t.resume_dir(), on_log=live)
        if not result.is_main:
            return {"rank": "worker"}  # rank 0 writes the files

        live.end(result.state)
        save_resolved(dataclasses.replace(cfg, train=t), out_dir, ["recipe", "train", "runtime"])
        report = train_report(t, shards, result, skipped_shards=loaders.skipped_shards)
        write_report(out_dir, report)
        # The step and the last loss are in the live summary (metrics/train/metrics.json); the rest in report.json.
        headline = train_headline(report)
        write_metrics(cfg, "train", headline, train_run_facts(t, runtime, result, loader_workers=loaders.workers))
    return train_summary(result)


def _is_main_rank() -> bool:
    """Rank 0 of a torchrun launch (``RANK``), or a single process: the one that writes the log."""
    return distributed_ranks().rank == 0
