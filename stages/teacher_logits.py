"""Stage ``teacher-logits``: the SAM2/SAM3 teacher run once per image, its soft logits for every instance stored
in a Zarr v3 store (what a pass computes: ``picosam_pipeline/teacher/teacher_pass.py``; the store's layout:
``picosam_pipeline/teacher/store.py``). Each teacher pass of ``params.yaml``'s ``teachers``
(``teacher-logits@NAME``, DVC's stage name too) writes ``<teacher.stores_dir>/NAME.zarr`` and
``metrics/teacher-logits@NAME.json``; a run outside the passes (the API, ``teachers: {}``) writes ``teacher.out``.

Resuming. The store is built at ``<out>.partial`` (the output's resumable mode, ``outputs.StageOutput``) and
renamed to ``<out>`` only once every shard is done, so ``<out>`` is never half a store (DVC deletes a stage's
outputs before it reruns one, but leaves the partial store alone). Killed at any moment (SIGKILL included), a rerun
of the same pass -- same teacher, params and index rows -- keeps the shards marked done, computes the others, and
ends byte-identical to an uninterrupted run with one image per encoder forward (a CPU's default: each (image,
shard) run of prompts is decoded apart, so nothing depends on which shards a run computes); with batches of images
on a GPU, the rerun shards agree with an uninterrupted run within the codec's bound (the encoder's rounding depends
on the batch). A partial store of another pass is discarded. When ``<out>`` already holds this pass nothing is
recomputed; when it holds another one, the new pass is built beside it and replaces it at the end.

Writes the store with its ``config.resolved.json`` (teacher + runtime sections) inside, and
``metrics/teacher-logits[@NAME].json``: instances, bytes per instance, random-weights flag, ``all_instances_empty`` (a
teacher that returned all-background or zero-confidence masks for every instance, also said on stderr: what the
store holds); the rate, seconds and encoder passes of each run go to the run log
``metrics/runs/teacher-logits[@NAME].jsonl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from picosam_pipeline.config import Config, TeacherConfig, require_inputs
from picosam_pipeline.device import Runtime
from picosam_pipeline.outputs import PARTIAL, StageOutput, save_resolved
from picosam_pipeline.reports import write_metrics
from picosam_pipeline.teacher.store import is_logit_store
from picosam_pipeline.teacher.teacher_pass import compute_pass, pass_metrics
from picosam_pipeline.written_paths import sibling

STAGE = "teacher-logits"


def partial_path(out: str | Path) -> Path:
    """Where an unfinished store is built: ``<out>.partial`` beside ``out``."""
    return sibling(out, PARTIAL)


def stage_name(t: TeacherConfig) -> str:
    """``teacher-logits@NAME`` for the pass NAME (DVC's name of the stage; its metrics file), else
    ``teacher-logits``."""
    return f"{STAGE}@{t.name}" if t.name else STAGE


def output(cfg: Config) -> StageOutput:
    """``teacher.out``, in the resumable mode: never a store over the project or an input, nothing but a logit store
    replaced, one run per store (the dask workers write its shards only while this client holds the lock: the
    executor is closed before the lock is released), the finished shards kept when a run fails."""
    t = cfg.teacher
    return StageOutput(
        cfg,
        stage_name(t),
        "teacher.out",
        t.out,
        sections=None,
        inputs={
            "teacher.index": t.index,
            "teacher.checkpoint": t.checkpoint,
            "teacher.checkpoints_dir": t.checkpoints_dir,
        },
        writes={
            "teacher.stores_dir" if t.name else "teacher.out": Path(t.out).parent,
            "runtime.metrics_dir": cfg.runtime.metrics_dir,
        },
        what="teacher-logit store",
        resumable=f"The finished shards in {partial_path(t.out)} are kept: rerunning the same command resumes from "
        "them.",
        recognise=is_logit_store,  # a store of an older format is ours too: replaced by the new pass
    )


def run(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    """Compute (or finish) the teacher-logit store for ``cfg.teacher``; returns a small summary.

    ``cfg.teacher`` is one pass: :meth:`Config.teacher_pass` resolves the named passes of ``teachers``.
    """
    t = cfg.teacher
    store_output = output(cfg)
    with store_output as work:
        require_inputs({"teacher.index": t.index})
        done = compute_pass(t, runtime, out=Path(t.out), work=work, desc=stage_name(t))
        save_resolved(cfg, done.store.path, ["teacher", "runtime"], owner=store_output.owner)
        metrics, run_facts = pass_metrics(done)
        write_metrics(cfg, stage_name(t), metrics, run_facts)
    return (
        {"instances": metrics["instances"], "random_weights": metrics["random_weights"]}
        | {k: run_facts[k] for k in ("instances_computed", "shards_computed", "instances_per_s")}
        | {"store": str(t.out)}
    )
