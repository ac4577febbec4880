"""One teacher pass: the teacher run once per image over the index rows of ``teacher.splits``, its soft logits for
every instance written into one Zarr v3 logit store (layout in :mod:`picosam_pipeline.teacher.store`).

Rows: store row ``i`` is the ``i``-th index row of ``teacher.splits`` in index order (``(split, image_id,
ann_id)``); the store's ``ann_id`` / ``image_id`` arrays make that checkable, and its attributes record the
teacher (checkpoint sha256 or random-weights digest), the prompt convention, the crop params and a sha256 of the
rows' ids, prompts and crop boxes (:func:`store_attrs`). Work: one task per store shard
(``teacher.instances_per_shard`` rows, :func:`picosam_pipeline.teacher.runner.process_shard`: each image decoded
and encoded once, its prompts decoded in one batch), run by the executor ``teacher.executor`` names (in this
process, or dask: :mod:`picosam_pipeline.teacher.executors`).

Resuming (:func:`open_pass_store`): the store is built in the unfinished folder the stage's output gives
(``<out>.partial``); a store there of the same pass -- same teacher, params and index rows -- keeps its shards
marked done and only the others are computed; one of another pass is discarded. When ``out`` already holds this
pass, it is finished in place (normally nothing is left to compute).
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from picosam_pipeline.config import TeacherConfig
from picosam_pipeline.data.crop_convention import index_crop_params
from picosam_pipeline.device import Runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.teacher.executors import make_executor
from picosam_pipeline.teacher.geometry import stored_size
from picosam_pipeline.teacher.runner import InstanceRows, instance_rows
from picosam_pipeline.teacher.store import LogitStore, create_store, stored_boxes, teacher_attrs
from picosam_pipeline.teacher.summary import empty_warning, summarize_store

_NOT_IN_ATTRS = ("checkpoint", "torch_threads", "onnx_folder")  # teacher metadata that is per machine / per process


@dataclass
class TeacherPass:
    """What one run of a pass did: the finished store (at ``out`` or the unfinished folder, to be published), its
    rows, each computed shard's summary (from ``runner.process_shard``) and the executor's facts."""

    store: LogitStore
    rows: InstanceRows
    summaries: list[dict[str, Any]]
    seconds: float
    setup_seconds: float
    executor: dict[str, Any]  # name, workers, images_per_batch


def compute_pass(t: TeacherConfig, runtime: Runtime, out: Path, work: Path, desc: str) -> TeacherPass:
    """Compute (or finish) the store of pass ``t`` in ``work`` (or in ``out`` when it holds this pass already).

    ``desc`` names the pass on the progress bar (instances, moved as each teacher batch finishes: per image on a
    CPU). Raises RuntimeError if a shard is not marked done after every task returned (a bug, not a user error).
    """
    rows = instance_rows(t.index, t.splits, t.prompt)
    start = time.perf_counter()
    if t.backend == "onnxruntime":  # export once here, before any worker loads the files
        from picosam_pipeline.teacher.sam2_onnx import export_teacher

        export_teacher(t, runtime)
    with make_executor(t, runtime) as executor:
        teacher = executor.teacher_metadata()  # builds the teacher in every worker before any shard is handed out
        store = open_pass_store(out, work, rows, t, store_attrs(t, teacher, rows))
        jobs = [(k, rows.take(store.shard_slice(k))) for k in store.pending_shards()]
        random = teacher.get("weights") == "random weights"
        _say(
            f"{len(rows)} instances of {len(rows.images())} images in {store.n_shards} shards, {len(jobs)} to "
            f"compute; {executor.name} executor, {executor.workers} worker(s), teacher {t.model}"
            + (" with RANDOM WEIGHTS (smoke test: the logits are noise)" if random else "")
        )
        setup_seconds = time.perf_counter() - start
        summaries = []
        with tqdm(total=sum(len(r) for _, r in jobs), unit="inst", desc=desc, dynamic_ncols=True) as bar:
            progress = InstanceProgress(bar)
            try:
                for summary in executor.map_shards(str(store.path.resolve()), jobs, on_progress=progress.computed):
                    summaries.append(summary)
                    progress.written(summary["instances"])
            finally:
                progress.close()
        facts = {"name": executor.name, "workers": executor.workers, "images_per_batch": executor.images_per_batch}
    pending = store.pending_shards()
    if pending:  # every task returned, so this is a bug, not a user error
        raise RuntimeError(
            f"{len(pending)} shards of {store.path} not marked done after all tasks finished: {pending[:8]}"
        )
    return TeacherPass(store, rows, summaries, time.perf_counter() - start, setup_seconds, facts)


class InstanceProgress:
    """The pass's progress bar in instances, moved by whichever is ahead: the instances the teacher computed
    (:meth:`computed`, per teacher batch; a dask executor calls it from its event-loop thread) or those of the
    shards written (:meth:`written`). Capped at the bar's total: a dask task run again counts its images twice."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar
        self.lock = threading.Lock()
        self.done = {"computed": 0, "written": 0}
        self.closed = False

    def computed(self, instances: int) -> None:
        self._add("computed", instances)

    def written(self, instances: int) -> None:
        self._add("written", instances)

    def close(self) -> None:
        """No more moves: a dask event that arrives late is dropped."""
        with self.lock:
            self.closed = True

    def _add(self, kind: str, instances: int) -> None:
        with self.lock:
            if self.closed:
                return
            self.done[kind] += instances
            position = min(self.bar.total, max(self.done.values()))
            if position > self.bar.n:
                self.bar.update(position - self.bar.n)


def store_attrs(t: TeacherConfig, teacher: dict[str, Any], rows: InstanceRows) -> dict[str, Any]:
    """The store's description of this pass; a store is resumed only when these match exactly."""
    crop = index_crop_params(t.index).as_dict()
    attrs = teacher_attrs(t, checkpoint_sha256=teacher.get("checkpoint_sha256"), crop=crop)
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


def open_pass_store(out: Path, work: Path, rows: InstanceRows, t: TeacherConfig, attrs: dict[str, Any]) -> LogitStore:
    """The store to write: ``out`` itself when it already holds this pass (any other unfinished ``work`` is then
    discarded, since the stage publishes ``work`` when it exists), else ``work`` (created or resumed).

    Both are known to be missing or logit stores (the stage's output refuses anything else before it gets here).
    """
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
        try:
            store = create_store(out, **layout)  # the same pass: resume in place (normally nothing is left)
        except PipelineError:
            pass  # another pass (params changed): build the new one beside it, swap it in when finished
        else:
            if work.exists():  # a leftover of another pass: the stage would publish it over this one when done
                _say(f"discarding the unfinished store {work}: {out} already holds this pass")
                shutil.rmtree(work)
            return store
    if work.exists():
        try:
            return create_store(work, **layout)
        except PipelineError:  # our own leftover, from a different teacher, params or index
            _say(f"discarding the unfinished store {work}: it was started for a different teacher, params or index")
            shutil.rmtree(work)
    return create_store(work, **layout)


def pass_metrics(done: TeacherPass) -> tuple[dict[str, Any], dict[str, Any]]:
    """``metrics/teacher-logits[@NAME].json`` (what the store holds and costs on disk: the same after a rerun that
    computed nothing) and this run's facts for the run log (what was computed, how fast, where). A store in which
    every instance came back empty is flagged there (``all_instances_empty``) and said on stderr."""
    summary = summarize_store(done.store)  # sampled logit ranges; `inspect --scan 0` reads all
    teacher = done.store.attrs["teacher"]
    summaries = done.summaries
    computed = sum(s["instances"] for s in summaries)
    task_seconds = sum(s["seconds"] for s in summaries)
    teacher_seconds = sum(s["teacher_seconds"] for s in summaries)
    # The headline (what `dvc exp show` compares); the store's details (shards, codec, backend, prompt, bytes on
    # disk, scan counts) are what `picosam-pipeline inspect STORE` prints from the store itself.
    metrics = {
        "model": teacher["model"],
        "random_weights": teacher["random_weights"],
        "instances": len(done.rows),
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
        "seconds": round(done.seconds, 3),
        "setup_seconds": round(done.setup_seconds, 3),
        "instances_per_s": round(computed / done.seconds, 3) if computed else None,
        "teacher_seconds": round(teacher_seconds, 3),  # encoder + decoder calls
        "teacher_share_of_task_time": round(teacher_seconds / task_seconds, 4) if task_seconds else None,
        "executor": done.executor["name"],
        "workers": done.executor["workers"],
        "images_per_batch": done.executor["images_per_batch"],
        "batch_splits": sum(s.get("batch_splits", 0) for s in summaries),  # batches split to fit device memory
        "images_decoded_on_device": sum(s.get("images_decoded_on_device", 0) for s in summaries),  # nvJPEG, not PIL
    }
    return metrics, run


def _say(message: str) -> None:
    print(f"[teacher-logits] {message}", file=sys.stderr, flush=True)
