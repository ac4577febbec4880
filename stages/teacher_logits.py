"""Stage ``teacher-logits``: the SAM2/SAM3 teacher run once per image, its soft logits for every instance stored
in a Zarr v3 store (layout in ``picosam_pipeline/teacher/store.py``). Each teacher pass of ``params.yaml``'s
``teachers`` (``teacher-logits@NAME``, DVC's stage name too) writes ``<teacher.stores_dir>/NAME.zarr`` and
``metrics/teacher-logits@NAME.json``; a run outside the passes (the API, ``teachers: {}``) writes ``teacher.out``.

Rows: store row ``i`` is the ``i``-th index row of ``teacher.splits`` in index order (``(split, image_id,
ann_id)``); the store's ``ann_id`` / ``image_id`` arrays make that checkable, and its attributes record the
teacher (checkpoint sha256 or random-weights digest), the prompt convention, the crop parameters and a sha256 of
the rows' ids, prompts and crop boxes. Work: one task per store shard (``teacher.instances_per_shard`` rows,
:func:`picosam_pipeline.teacher.runner.process_shard`: each image decoded and encoded once, its prompts decoded
in one batch), run by the executor ``teacher.executor`` names (in this process, or dask:
``picosam_pipeline/teacher/executors.py``).

Resuming. The store is built at ``<out>.partial`` and renamed to ``<out>`` only once every shard is done, so
``<out>`` is never half a store (DVC deletes a stage's outputs before it reruns one, but leaves the partial
store alone). Killed at any moment (SIGKILL included), a rerun of the same pass -- same teacher, params and
index rows -- keeps the shards marked done, computes the others, and ends byte-identical to an uninterrupted
run with one image per encoder forward (a CPU's default: each (image, shard) run of prompts is decoded apart, so
nothing depends on which shards a run computes); with batches of images on a GPU, the rerun shards agree with an
uninterrupted run within the codec's bound (the encoder's rounding depends on the batch). A partial store of another
pass is discarded. When ``<out>`` already holds this pass nothing is recomputed; when it holds another one, the new pass
is built beside it and replaces it at the end.

Writes the store with its ``config.resolved.json`` (teacher + runtime sections) inside, and
``metrics/teacher-logits[@NAME].json``: instances, bytes per instance, random-weights flag, ``all_instances_empty`` (a
teacher that returned all-background or zero-confidence masks for every instance, also said on stderr: what the
store holds); the
rate, seconds and encoder passes of each run go to the run log ``metrics/runs/teacher-logits[@NAME].jsonl``.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from picosam_pipeline.config import Config, TeacherConfig, require_inputs
from picosam_pipeline.data.index import read_metadata
from picosam_pipeline.device import Runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.outputs import (
    check_target,
    output_lock,
    probe_writable,
    publish,
    recover,
    save_resolved,
    write_errors,
)
from picosam_pipeline.reports import write_metrics
from picosam_pipeline.teacher.executors import DaskExecutor, InProcess, make_executor
from picosam_pipeline.teacher.geometry import stored_size
from picosam_pipeline.teacher.runner import InstanceRows, instance_rows
from picosam_pipeline.teacher.store import (
    LogitStore,
    create_store,
    is_logit_store,
    open_store,
    stored_boxes,
    teacher_attrs,
)
from picosam_pipeline.teacher.summary import empty_warning, summarize

STAGE = "teacher-logits"
CROP_PARAMS = ("roi_padding", "point_crop_size", "min_roi_side", "min_area")  # prepare params the crops depend on
_NOT_IN_ATTRS = ("checkpoint", "torch_threads", "onnx_folder")  # teacher metadata that is per machine / per process


def partial_path(out: str | Path) -> Path:
    """Where an unfinished store is built: ``<out>.partial`` beside ``out``."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def stage_name(t: TeacherConfig) -> str:
    """``teacher-logits@NAME`` for the pass NAME (DVC's name of the stage; its metrics file), else
    ``teacher-logits``."""
    return f"{STAGE}@{t.name}" if t.name else STAGE


def run(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    """Compute (or finish) the teacher-logit store for ``cfg.teacher``; returns a small summary.

    ``cfg.teacher`` is one pass: :meth:`Config.teacher_pass` resolves the named passes of ``teachers``.
    """
    t = cfg.teacher
    out = Path(t.out)
    # Before any work: never a store over the project or an input; one run per store (the dask workers write
    # its shards only while this client holds the lock: the executor is closed before the lock is released).
    check_target(
        stage_name(t),
        "teacher.out",
        out,
        {"teacher.index": t.index, "teacher.checkpoint": t.checkpoint, "teacher.checkpoints_dir": t.checkpoints_dir},
        sections=None,
    )
    check_store_target(out)
    probe_writable(out.parent, "teacher.out", stage_name(t))
    probe_writable(cfg.runtime.metrics_dir, "runtime.metrics_dir", stage_name(t))
    require_inputs({"teacher.index": t.index})
    kept = f"The finished shards in {partial_path(out)} are kept: rerunning the same command resumes from them."
    with (
        write_errors(stage_name(t), "teacher.out", out, "the teacher-logit store", kept),
        output_lock(out, stage_name(t)),
    ):
        recover(out)
        return _run(cfg, runtime, t, out)


def _run(cfg: Config, runtime: Runtime, t: TeacherConfig, out: Path) -> dict[str, Any]:
    rows = instance_rows(t.index, t.splits, t.prompt)
    start = time.perf_counter()
    if t.backend == "onnxruntime":  # export once here, before any worker loads the files
        from picosam_pipeline.teacher.sam2_onnx import export_teacher

        export_teacher(t, runtime)
    with make_executor(t, runtime) as executor:
        teacher = executor.teacher_metadata()  # builds the teacher in every worker before any shard is handed out
        store = open_output(out, rows, t, store_attrs(t, teacher, rows))
        jobs = [(k, rows.take(store.shard_slice(k))) for k in store.pending_shards()]
        _say(
            f"{len(rows)} instances of {len(rows.images())} images in {store.n_shards} shards, "
            f"{len(jobs)} to compute; {executor.name} executor, {executor.workers} worker(s), teacher {t.model}"
            + (
                " with RANDOM WEIGHTS (smoke test: the logits are noise)"
                if teacher.get("weights") == "random weights"
                else ""
            )
        )
        setup_seconds = time.perf_counter() - start
        summaries = []
        with tqdm(total=sum(len(r) for _, r in jobs), unit="inst", desc=stage_name(t), dynamic_ncols=True) as bar:
            for summary in executor.map_shards(str(store.path.resolve()), jobs):
                summaries.append(summary)
                bar.update(summary["instances"])
    store = finish(store, out, cfg)
    seconds = time.perf_counter() - start
    metrics, run = stage_metrics(store, rows, summaries, seconds, setup_seconds, executor)
    write_metrics(cfg, stage_name(t), metrics, run)
    return (
        {"instances": metrics["instances"], "random_weights": metrics["random_weights"]}
        | {k: run[k] for k in ("instances_computed", "shards_computed", "instances_per_s")}
        | {"store": str(out)}
    )


def store_attrs(t: TeacherConfig, teacher: dict[str, Any], rows: InstanceRows) -> dict[str, Any]:
    """The store's description of this pass; a store is resumed only when these match exactly."""
    prepare = read_metadata(t.index).get("prepare", {})
    attrs = teacher_attrs(
        t, checkpoint_sha256=teacher.get("checkpoint_sha256"), crop={k: prepare[k] for k in CROP_PARAMS if k in prepare}
    )
    attrs["teacher"]["build"] = {k: v for k, v in teacher.items() if k not in _NOT_IN_ATTRS}
    attrs["rows"] = {
        "order": "index rows of teacher.splits in index order (split, image_id, ann_id)",
        "index": t.index,
        "splits": list(t.splits),
        "instances": len(rows),
        "images": len(rows.images()),
        "sha256": rows.digest(),  # ann_id, image_id, image size, prompt, crop box of every row
    }
    return attrs


def open_output(out: Path, rows: InstanceRows, t: TeacherConfig, attrs: dict[str, Any]) -> LogitStore:
    """The store to write: ``out`` itself when it already holds this pass, else ``<out>.partial`` (created or
    resumed)."""
    layout = dict(
        side=stored_size(t.store_size, t.context_margin),
        instances_per_shard=t.instances_per_shard,
        codec=t.codec,
        compression_level=t.compression_level,
        attrs=attrs,
        rows=dict(
            ann_id=rows.ann_id,
            image_id=rows.image_id,
            crop_box=rows.crop_box,
            stored_box=stored_boxes(rows.crop_box, t.store_size, t.context_margin),
        ),
    )
    if out.exists():
        check_store_target(out)
        try:
            return create_store(out, **layout)  # the same pass: resume in place (normally nothing is left)
        except PipelineError:
            pass  # another pass (params changed): build the new one beside it, swap it in when finished
    work = partial_path(out)
    if work.exists():
        try:
            return create_store(work, **layout)
        except PipelineError:  # our own leftover, from a different teacher, params or index
            check_store_target(work)  # ... or not a store at all: then it is not ours to delete
            _say(f"discarding the unfinished store {work}: it was started for a different teacher, params or index")
            shutil.rmtree(work)
    return create_store(work, **layout)


def check_store_target(path: Path) -> None:
    """Refuse ``path`` (the store or its ``.partial``) unless it is missing or a teacher-logit store: never replace
    or delete a folder this stage did not write."""
    if path.exists() and not is_logit_store(path):  # a store of an older format is ours: replaced by the new pass
        raise PipelineError(
            f"teacher.out: {path} exists and is not a teacher-logit store, so this stage does not "
            "replace it; move it away or set teacher.out to a new path"
        )


def finish(store: LogitStore, out: Path, cfg: Config) -> LogitStore:
    """Check every shard is done, save the resolved config inside the store, move it to ``out``; returns it reopened."""
    pending = store.pending_shards()
    if pending:  # every task returned, so this is a bug, not a user error
        raise RuntimeError(
            f"{len(pending)} shards of {store.path} not marked done after all tasks finished: {pending[:8]}"
        )
    save_resolved(cfg, store.path, ["teacher", "runtime"])
    if store.path != out:
        publish(store.path, out)  # replaces the store of a previous pass: the old one or the new one, never none mixed
    return open_store(out)


def stage_metrics(
    store: LogitStore,
    rows: InstanceRows,
    summaries: list[dict],
    seconds: float,
    setup_seconds: float,
    executor: InProcess | DaskExecutor,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``metrics/teacher-logits[@NAME].json`` (what the store holds and costs on disk: the same after a rerun that
    computed nothing) and this run's facts for the run log (what was computed, how fast, where). A store in which
    every instance came back empty is flagged there (``all_instances_empty``) and said on stderr."""
    summary = summarize(store)  # sampled logit ranges; `inspect --scan 0` reads all
    teacher = store.attrs["teacher"]
    computed = sum(s["instances"] for s in summaries)
    task_seconds = sum(s["seconds"] for s in summaries)
    # The headline (what `dvc exp show` compares); the store's details (shards, codec, backend, prompt, bytes on
    # disk, scan counts) are what `picosam-pipeline inspect STORE` prints from the store itself.
    metrics = {
        "model": teacher["model"],
        "random_weights": teacher["random_weights"],
        "instances": len(rows),
        "bytes_per_instance": round(summary["bytes_per_instance"], 1),
        "confidence_mean": round(summary["confidence_mean"], 4),
        # A teacher that returned nothing (all background / confidence 0 everywhere) is flagged, not trusted.
        "all_instances_empty": summary["all_instances_empty"],
    }
    if warning := empty_warning(summary):
        _say(f"WARNING: {warning}")
    run = {
        "instances_computed": computed,
        "shards_computed": len(summaries),
        "encoder_passes": sum(s["encoder_passes"] for s in summaries),
        "seconds": round(seconds, 3),
        "setup_seconds": round(setup_seconds, 3),
        "instances_per_s": round(computed / seconds, 3) if computed else None,
        "teacher_seconds": round(sum(s["teacher_seconds"] for s in summaries), 3),  # encoder + decoder calls
        "teacher_share_of_task_time": round(sum(s["teacher_seconds"] for s in summaries) / task_seconds, 4)
        if task_seconds
        else None,
        "executor": executor.name,
        "workers": executor.workers,
        "images_per_batch": executor.images_per_batch,
        "batch_splits": sum(s.get("batch_splits", 0) for s in summaries),  # batches split to fit device memory
        "images_decoded_on_device": sum(s.get("images_decoded_on_device", 0) for s in summaries),  # nvJPEG, not PIL
    }
    return metrics, run


def _say(message: str) -> None:
    print(f"[{STAGE}] {message}", file=sys.stderr, flush=True)
