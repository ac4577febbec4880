"""The teacher-logits stage: row alignment, one encoder pass per image, resuming, replacing, verify-logits, dask.

Most tests swap the SAM2 build for :class:`FakeTeacher` (deterministic logits from the prompt and the pixels,
milliseconds per image) to check the stage's own logic; the ``slow`` test at the end runs the real random-weight
SAM2.1-tiny in this process and on a dask LocalCluster and checks that both stores are byte-identical.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner
from PIL import Image

from picosam_pipeline.cli import cli
from picosam_pipeline.config import Config, TeacherConfig
from picosam_pipeline.data.checksums import sha256_file as file_sha256
from picosam_pipeline.data.images import load_image
from picosam_pipeline.data.index import column_array, read_index
from picosam_pipeline.device import Runtime, resolve_runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.stages import teacher_logits
from picosam_pipeline.teacher import runner as teacher_runner
from picosam_pipeline.teacher.base import OneImageAtATime, TeacherOutput
from picosam_pipeline.teacher.codec import SIGMOID_ERROR_BOUND, decode_logits, encode_logits
from picosam_pipeline.teacher.executors import make_executor, plan_workers, task_runs
from picosam_pipeline.teacher.geometry import crop_logits
from picosam_pipeline.teacher.runner import TeacherSpec, instance_rows, process_shards
from picosam_pipeline.teacher.store import EXECUTION_FIELDS, open_store
from tests.helpers.teacher_project import REPO, config, stage_figures, store_files, tiny_project

CALLS = {"set_image": 0, "predict": 0}


class FakeTeacher(OneImageAtATime):
    """A deterministic stand-in for SAM2: ``(N, 64, 64)`` whole-image logits from each prompt and the pixels."""

    fail_at: int | None = None  # raise in this predict call (1-based), to interrupt a run

    def __init__(self, cfg, runtime: Runtime) -> None:
        checkpoint = cfg.checkpoint if cfg.checkpoint and Path(cfg.checkpoint).is_file() else None
        self.metadata = {
            "teacher": "fake",
            "model": cfg.model,
            "autocast": "fp32",
            "seed": runtime.seed,
            "weights": "checkpoint" if checkpoint else "random weights",
            "checkpoint": checkpoint,
            "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else None,
            "weights_sha256": None if checkpoint else "0" * 64,
        }
        self.brightness = None

    def set_image(self, rgb: np.ndarray) -> None:
        CALLS["set_image"] += 1
        self.size = rgb.shape[1], rgb.shape[0]
        grey = Image.fromarray(rgb).convert("L").resize((64, 64), Image.BILINEAR)
        self.brightness = np.asarray(grey, dtype=np.float64) / 255.0

    def predict_boxes(self, boxes: np.ndarray) -> TeacherOutput:
        return self._decode(boxes[:, :2], boxes[:, 2:])

    def predict_points(self, points: np.ndarray) -> TeacherOutput:
        return self._decode(points - 20.0, points + 20.0)

    def _decode(self, low: np.ndarray, high: np.ndarray) -> TeacherOutput:
        CALLS["predict"] += 1
        if CALLS["predict"] == self.fail_at:
            raise RuntimeError("teacher failed (test)")
        (w, h), u = self.size, (np.arange(64) + 0.5) / 64
        xs, ys = u[None, None, :] * w, u[None, :, None] * h
        lo, hi = low[:, :, None, None], high[:, :, None, None]
        inside = np.minimum(np.minimum(xs - lo[:, 0], hi[:, 0] - xs), np.minimum(ys - lo[:, 1], hi[:, 1] - ys))
        logits = np.clip(0.5 * inside + 4.0 * (self.brightness - 0.5), -32, 32)
        return TeacherOutput(torch.from_numpy(logits.astype(np.float32)), torch.full((len(low),), 0.75))


@pytest.fixture(scope="module")
def project(teacher_project) -> tuple[Path, list[str]]:
    """The session's teacher project (tiny_project with 2 val images)."""
    return teacher_project


@pytest.fixture
def fake(project, monkeypatch) -> dict[str, int]:
    """Build FakeTeacher instead of SAM2, start without a cached teacher, run in the project folder."""
    monkeypatch.setattr(teacher_runner, "build_teacher", FakeTeacher)
    monkeypatch.setattr(teacher_runner, "_session", None)
    monkeypatch.setattr(FakeTeacher, "fail_at", None)
    monkeypatch.chdir(project[0])
    CALLS.update(set_image=0, predict=0)
    return CALLS


def run_stage(project, out: Path, *more: str) -> tuple[Config, dict]:
    cfg = config(project[0], project[1], f"teacher.out={out}", f"runtime.metrics_dir={out.parent / 'metrics'}", *more)
    teacher_logits.run(cfg, resolve_runtime(cfg.runtime))
    return cfg, stage_figures(out.parent / "metrics")


@pytest.mark.parametrize("prompt", ["roi", "point"])
def test_rows_follow_the_index_and_each_image_is_encoded_once(project, fake, tmp_path, prompt):
    out = tmp_path / "logits.zarr"
    cfg, metrics = run_stage(project, out, f"recipe.name={'picosam3' if prompt == 'roi' else 'picosam2'}")
    index = read_index("data/prepared/index.parquet", split="val")
    store = open_store(out)
    meta = store.read_meta()
    assert meta["ann_id"].tolist() == index["ann_id"].to_pylist()  # store row i = index row i of the split
    assert meta["image_id"].tolist() == index["image_id"].to_pylist()
    assert (meta["crop_box"] == column_array(index, "roi_box" if prompt == "roi" else "point_box")).all()
    assert (meta["stored_box"] == meta["crop_box"]).all()  # context_margin 0
    # 2 images over 4 shards (shards 0, 1, 3 hold one image, shard 2 both): the shards' rows are one stream of
    # images, so each image is encoded once; its prompts are decoded one call per (image, shard), so that the
    # stored bytes do not depend on how shards are grouped into tasks: 3 + 2 calls.
    assert fake == {"set_image": 2, "predict": 5}
    assert (metrics["instances"], metrics["encoder_passes"], metrics["shards_computed"]) == (16, 2, 4)
    assert metrics["random_weights"] is True and metrics["bytes_per_instance"] > 0
    assert metrics["all_instances_empty"] is False and 0 < metrics["confidence_mean"] <= 1
    assert json.loads((out / "config.resolved.json").read_text())["teacher"]["prompt"] == prompt

    # Row 11 (image 200002) recomputed by hand: prompt = COCO bbox as xyxy (roi) or the index point,
    # crop = the index box.
    row = index.slice(11, 1)
    teacher = FakeTeacher(cfg.teacher, resolve_runtime(cfg.runtime))
    teacher.set_image(load_image(row["image_path"][0].as_py()).pixels)
    x, y, w, h = column_array(row, "bbox")[0]
    out_ = (
        teacher.predict_boxes(np.array([[x, y, x + w, y + h]], np.float32))
        if prompt == "roi"
        else teacher.predict_points(column_array(row, "point").astype(np.float32))
    )
    size = (row["width"][0].as_py(), row["height"][0].as_py())
    expected = crop_logits(out_.image_logits, size, meta["crop_box"][11:12], cfg.teacher.store_size)
    assert np.array_equal(store.read_raw([11]), encode_logits(expected.numpy(), store.codec))


def test_a_run_of_some_shards_encodes_their_images_once_and_rewrites_the_same_bytes(project, fake, tmp_path):
    out = tmp_path / "logits.zarr"
    cfg, _ = run_stage(project, out)
    before = store_files(out)
    rows = instance_rows(cfg.teacher.index, cfg.teacher.splits, cfg.teacher.prompt)
    spec = TeacherSpec.of(cfg.teacher, resolve_runtime(cfg.runtime))
    teacher_runner._session = None  # a fresh worker process
    CALLS.update(set_image=0, predict=0)
    summaries = list(process_shards(str(out), [(2, rows.take(slice(8, 12))), (3, rows.take(slice(12, 16)))], spec))
    # shard 2 holds the end of image 1 and the start of image 2, shard 3 the rest of image 2: 2 encoder passes
    assert [s["shard"] for s in summaries] == [2, 3] and sum(s["encoder_passes"] for s in summaries) == 2
    assert CALLS == {"set_image": 2, "predict": 3}  # image 1 in shard 2; image 2 in shards 2 and 3
    assert store_files(out) == before  # rewriting shards gives the same bytes
    with pytest.raises(ValueError, match="shard 2: got 3 rows, the store expects rows 8:12"):
        list(process_shards(str(out), [(2, rows.take(slice(8, 11)))], spec))


def test_an_interrupted_run_resumes_where_it_stopped_and_ends_byte_identical(project, fake, tmp_path):
    clean = tmp_path / "clean" / "logits.zarr"
    run_stage(project, clean)
    out = tmp_path / "run" / "logits.zarr"
    FakeTeacher.fail_at = CALLS["predict"] + 4  # the next run's 2nd image (image 1 took 3 calls): after shards 0
    # and 1 were handed to the writer
    with pytest.raises(RuntimeError, match="teacher failed"):
        run_stage(project, out)
    partial = teacher_logits.partial_path(out)
    assert not out.exists()  # the out only ever appears complete
    assert open_store(partial).done_shards().tolist() == [True, True, False, False]
    # A half-written shard 2 as a crash on a non-atomic file system could leave it, plus a zarr temporary.
    logits = zarr.open_array(partial / "logits", mode="r")
    half = partial / "logits" / logits.metadata.encode_chunk_key((2, 0, 0))
    half.parent.mkdir(parents=True, exist_ok=True)
    half.write_bytes((clean / "logits" / logits.metadata.encode_chunk_key((2, 0, 0))).read_bytes()[:100])
    (partial / "logits" / "c" / "junk.123.partial").write_bytes(b"x")
    done_file = partial / "logits" / logits.metadata.encode_chunk_key((0, 0, 0))
    mtime = done_file.stat().st_mtime_ns

    FakeTeacher.fail_at = None
    _, metrics = run_stage(project, out)
    assert (metrics["shards_computed"], metrics["instances_computed"]) == (2, 8)  # shards 2 and 3 only
    assert (out / "logits" / logits.metadata.encode_chunk_key((0, 0, 0))).stat().st_mtime_ns == mtime
    assert not partial.exists()
    assert store_files(out) == store_files(clean)


def test_changed_params_replace_the_store_and_discard_a_stale_partial(project, fake, tmp_path, capsys):
    out = tmp_path / "logits.zarr"
    FakeTeacher.fail_at = 2
    with pytest.raises(RuntimeError):
        run_stage(project, out, "teacher.codec=float16")  # leaves a float16 partial store
    FakeTeacher.fail_at = None
    run_stage(project, out)  # another pass (sigmoid_uint8): the stale partial is discarded
    assert "discarding the unfinished store" in capsys.readouterr().err
    assert open_store(out).codec.name == "sigmoid_uint8" and not teacher_logits.partial_path(out).exists()

    metrics_file = out.parent / "metrics" / "teacher-logits.json"
    before = metrics_file.read_bytes()
    _, metrics = run_stage(project, out)  # same pass again: nothing to compute
    assert metrics["shards_computed"] == 0 and metrics["instances_per_s"] is None
    assert metrics_file.read_bytes() == before  # metrics describe the store, not the run: dvc status stays clean

    _, metrics = run_stage(project, out, "teacher.codec=float16", "teacher.context_margin=0.25")
    store = open_store(out)
    assert (store.codec.name, store.side, metrics["shards_computed"]) == ("float16", 144, 4)
    meta = store.read_meta()
    assert np.allclose(
        meta["stored_box"][:, 2] - meta["stored_box"][:, 0], 1.5 * (meta["crop_box"][:, 2] - meta["crop_box"][:, 0])
    )


class NaNTeacher(FakeTeacher):
    """FakeTeacher whose 3rd prompt of every call decodes to NaN logits (or whose confidence is infinite)."""

    broken = "logits"

    def _decode(self, low, high):
        out = super()._decode(low, high)
        if len(low) > 2:
            if self.broken == "logits":
                out.image_logits[2, 5, 7] = float("nan")
            else:
                out.confidence[2] = float("inf")
        return out


@pytest.mark.parametrize("broken", ["logits", "confidence"])
def test_a_teacher_returning_nan_stops_the_pass_naming_image_instance_and_teacher(
    project, fake, tmp_path, monkeypatch, broken
):
    monkeypatch.setattr(teacher_runner, "build_teacher", NaNTeacher)
    monkeypatch.setattr(NaNTeacher, "broken", broken)
    out = tmp_path / "logits.zarr"
    with pytest.raises(PipelineError) as err:
        run_stage(project, out)
    rows = instance_rows("data/prepared/index.parquet", ["val"], "roi")
    # The first batch is image 200001 (rows 0-8), decoded one call per shard: rows 0-3, 4-7, 8. The 3rd prompt of
    # the first two calls is broken: rows 2 and 6.
    assert (
        f"teacher sam2.1_hiera_tiny (backend torch) returned NaN/inf logits or confidences for 2 instance(s): "
        f"ann_id {rows.ann_id[2]} of image {rows.image_id[2]}, ann_id {rows.ann_id[6]} of image {rows.image_id[6]};"
    ) in str(err.value)
    assert not open_store(teacher_logits.partial_path(out)).done_shards().any()  # nothing of that batch was stored


class EmptyTeacher(FakeTeacher):
    """FakeTeacher gone blank: all-background logits and confidence 0 for every prompt (what SAM3 with NaN scores
    once wrote silently)."""

    def _decode(self, low, high):
        out = super()._decode(low, high)
        return TeacherOutput(torch.full_like(out.image_logits, -16.0), torch.zeros_like(out.confidence))


def test_a_pass_where_every_instance_comes_back_empty_is_flagged_in_metrics_and_on_stderr(
    project, fake, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(teacher_runner, "build_teacher", EmptyTeacher)
    out = tmp_path / "logits.zarr"
    _, metrics = run_stage(project, out)
    assert metrics["all_instances_empty"] is True
    assert metrics["confidence_mean"] == 0  # (the all-background and zero-confidence counts: `inspect`, below)
    headline = json.loads((tmp_path / "metrics" / "teacher-logits.json").read_text())
    assert set(headline) == {
        "model",
        "random_weights",
        "instances",
        "bytes_per_instance",
        "confidence_mean",
        "all_instances_empty",
    }
    assert "WARNING: every instance of the teacher pass came back empty (16 of 16 scanned" in capsys.readouterr().err
    result = CliRunner().invoke(cli, ["inspect", str(out)])
    assert result.exit_code == 0 and "WARNING     every instance of the teacher pass came back empty" in result.output


def test_bad_inputs_are_refused_with_the_key_to_fix(project, fake, tmp_path):
    with pytest.raises(PipelineError, match=r"teacher.splits: \['test'\] not in the instance index"):
        run_stage(project, tmp_path / "a.zarr", "teacher.splits=[test]")
    (tmp_path / "b.zarr").mkdir()
    (tmp_path / "b.zarr" / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="teacher.out: .* exists and is not a teacher-logit store"):
        run_stage(project, tmp_path / "b.zarr")
    assert (tmp_path / "b.zarr" / "notes.txt").exists()


def test_verify_logits_passes_an_intact_store_and_fails_a_tampered_one(project, fake, tmp_path):
    checkpoint = tmp_path / "teacher.pt"
    checkpoint.write_bytes(b"weights v1")
    out = tmp_path / "logits.zarr"
    run_stage(project, out, f"teacher.checkpoint={checkpoint}")
    runner = CliRunner()
    result = runner.invoke(cli, ["verify-logits", str(out), "--sample", "6", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert re.search(r"identical to the recomputation +100.00%", result.output) and result.output.rstrip().endswith(
        "OK"
    )

    logits = zarr.open_array(out / "logits", mode="r+")
    logits[:] = 254 - logits[:]  # every probability mirrored: every decision flipped
    result = runner.invoke(cli, ["verify-logits", str(out), "--sample", "6", "--device", "cpu"])
    assert result.exit_code == 1 and "differ from what the teacher wrote" in result.output  # the shard digests
    digests, store = zarr.open_array(out / "shard_digest", mode="r+"), open_store(out)
    for k in range(store.n_shards):  # a pass that wrote wrong logits consistently: only recomputing catches it
        digests[k] = np.frombuffer(store.file_digest(k), np.uint8)
    result = runner.invoke(cli, ["verify-logits", str(out), "--sample", "6", "--device", "cpu"])
    assert result.exit_code == 1 and "FAILED" in result.output

    checkpoint.write_bytes(b"weights v2")
    result = runner.invoke(cli, ["verify-logits", str(out), "--device", "cpu"])
    assert result.exit_code == 1 and "refusing to verify" in result.output and "sha256" in result.output


def test_an_existing_dask_cluster_runs_the_shard_tasks(project, fake, tmp_path):
    """teacher.scheduler_address: a cluster started elsewhere (here in-process, so that FakeTeacher applies)."""
    from distributed import LocalCluster

    local = tmp_path / "local" / "logits.zarr"
    run_stage(project, local)
    out = tmp_path / "dask" / "logits.zarr"
    # Two threads: two shard tasks at once on one worker, which share (and take turns with) its one teacher.
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        _, metrics = run_stage(
            project, out, "teacher.executor=dask", f"teacher.scheduler_address={cluster.scheduler_address}"
        )
    assert (metrics["executor"], metrics["workers"], metrics["shards_computed"]) == ("dask", 1, 4)
    assert store_files(out) == store_files(local)


@pytest.mark.parametrize("codec", sorted(SIGMOID_ERROR_BOUND))
def test_the_codec_bound_verify_logits_uses_holds_and_is_tight(codec):
    x = np.concatenate([np.linspace(-40, 40, 400_001), np.linspace(-0.3, 0.3, 200_001), [1e-9, -1e-9]]).astype(
        np.float32
    )
    sigmoid = lambda v: 0.5 * (1.0 + np.tanh(0.5 * v.astype(np.float64)))  # noqa: E731
    err = np.abs(sigmoid(decode_logits(encode_logits(x, codec), codec)) - sigmoid(x)).max()
    assert 0.5 * SIGMOID_ERROR_BOUND[codec] < err <= SIGMOID_ERROR_BOUND[codec]


def test_dask_tasks_are_runs_of_consecutive_shards():
    jobs = [(k, range(256)) for k in (0, 1, 2, 3, 5, 6, 7, 8, 9, 10)]  # shard 4 already done
    runs = [[k for k, _ in run] for run in task_runs(jobs, workers=1)]
    assert runs == [[0, 1, 2, 3], [5, 6, 7, 8, 9, 10]]  # 2048 instances = 8 shards per task, never across a gap
    assert [[k for k, _ in run] for run in task_runs(jobs, workers=2)] == [[0, 1], [2, 3], [5, 6], [7, 8], [9, 10]]
    assert [len(run) for run in task_runs(jobs, workers=1, instances_per_task=1)] == [1] * 10  # a CPU: per shard
    assert task_runs([], workers=1) == []


def test_local_cluster_plan_one_worker_per_gpu_or_one_cpu_worker_with_all_cores():
    plans, device = plan_workers(0, 0, torch.device("cpu"), 0, None, cores=16)
    assert device == "cpu" and [(p.threads, "CUDA_VISIBLE_DEVICES" in p.env) for p in plans] == [(16, False)]
    assert plans[0].env["OMP_NUM_THREADS"] == "16"  # dask's nanny would set 1
    plans, device = plan_workers(0, 0, torch.device("cuda"), 4, None, cores=16)
    assert device == "cuda" and [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["0", "1", "2", "3"]
    assert {p.threads for p in plans} == {4}
    plans, _ = plan_workers(0, 2, torch.device("cuda:1"), 2, "4,5", cores=16)
    assert [(p.env["CUDA_VISIBLE_DEVICES"], p.threads) for p in plans] == [("5", 2)]  # cuda:1 = 2nd visible GPU
    plans, _ = plan_workers(3, 0, torch.device("cpu"), 0, None, cores=16)
    assert [p.threads for p in plans] == [5, 5, 5]


@pytest.mark.slow  # starts a real LocalCluster (a nanny and a worker process): a few seconds
def test_local_cluster_leaves_this_process_environment_as_it_was(monkeypatch):
    # dask's nanny writes OMP_NUM_THREADS=1 (and MKL_, OPENBLAS_, MALLOC_TRIM_) into the process that starts it;
    # left there, every process started afterwards computed with 1 thread, and stored bytes depend on threads.
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PICOSAM_TEST_KEPT", "yes")
    before = dict(os.environ)
    cfg = TeacherConfig(executor="dask", n_workers=1, threads_per_worker=1)
    with make_executor(cfg, Runtime(torch.device("cpu"), None, 0)) as executor:
        assert executor.workers == 1 and os.environ.get("OMP_NUM_THREADS") == "1"  # what the nanny did
    assert dict(os.environ) == before


def test_stage_is_registered_and_its_dvc_params_are_the_keys_that_change_stored_bytes():
    from picosam_pipeline.stages import STAGES

    assert list(STAGES)[:3] == ["sample", "prepare", "teacher-logits"]
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["teacher-logits"]
    assert stage["foreach"] == "${teachers}"  # one DVC stage per teacher pass: teacher-logits@sam2, ...
    stage = stage["do"]
    assert stage["cmd"] == "picosam-pipeline run-stage teacher-logits@${key}"
    fields = {f.name for f in dataclasses.fields(TeacherConfig)}
    # A new teacher field must be listed (or declared execution-only in store.EXECUTION_FIELDS).
    byte_relevant = {f"teacher.{n}" for n in fields - set(EXECUTION_FIELDS)}
    # recipe.name: the recipe decides teacher.prompt when params.yaml leaves it auto
    assert set(stage["params"]) == byte_relevant | {
        "teachers.${key}",
        "runtime.seed",
        "runtime.precision",
        "recipe.name",
    }
    assert {
        "stages/teacher_logits.py",
        "picosam_pipeline/teacher/runner.py",
        "picosam_pipeline/teacher/executors.py",
        "picosam_pipeline/teacher/build.py",
        "${teacher.index}",
    } <= set(stage["deps"])
    # the path comes from params.yaml (DVC templating), written once; pack reads the folder
    assert stage["outs"] == ["${teacher.stores_dir}/${key}.zarr"]


@pytest.mark.slow
def test_real_teacher_in_process_and_on_dask_write_identical_stores(tmp_path, monkeypatch):
    """SAM2.1-tiny with random weights, 1 image (9 instances, 3 shards): here, then on a LocalCluster worker."""
    sets = tiny_project(tmp_path, 1)
    monkeypatch.chdir(tmp_path)
    stores = {}
    for executor in ("local", "dask"):
        out = tmp_path / executor / "logits.zarr"
        metrics_dir = out.parent / "metrics"
        cfg = config(
            tmp_path, sets, f"teacher.executor={executor}", f"teacher.out={out}", f"runtime.metrics_dir={metrics_dir}"
        )
        teacher_logits.run(cfg, resolve_runtime(cfg.runtime))
        metrics = stage_figures(metrics_dir)
        assert (metrics["executor"], metrics["shards_computed"], metrics["random_weights"]) == (executor, 3, True)
        # local: the 3 shards are one stream of images, one encoder pass; dask on a CPU: one task per shard
        assert metrics["encoder_passes"] == (1 if executor == "local" else 3)
        stores[executor] = out
    local, dask = (open_store(stores[k]) for k in ("local", "dask"))
    # Weights drawn from runtime.seed: the worker process built the same random weights as this one.
    assert local.attrs["teacher"]["build"]["weights_sha256"] == dask.attrs["teacher"]["build"]["weights_sha256"]
    assert local.attrs == dask.attrs
    assert store_files(stores["local"]) == store_files(stores["dask"])

    result = CliRunner().invoke(cli, ["verify-logits", str(stores["dask"]), "--sample", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "100.00%" in result.output and "0 of 36,864 pixels" in result.output


# --------------------------------------------------------------------------------------------------
# errors from dask workers, the scheduler's port, verify-logits --checkpoint (issue 13 items 3 and 9)


def test_verify_logits_refuses_a_checkpoint_for_a_random_weights_store(project, fake, tmp_path):
    out = tmp_path / "logits.zarr"
    run_stage(project, out)  # no checkpoint file: the store records random weights
    other = tmp_path / "sam2.pt"
    other.write_bytes(b"weights")
    result = CliRunner().invoke(cli, ["verify-logits", str(out), "--checkpoint", str(other), "--device", "cpu"])
    assert result.exit_code == 1
    assert f"--checkpoint '{other}' does not apply" in result.output and "RANDOM weights" in result.output


def test_a_bad_input_error_in_a_dask_task_is_returned_not_logged_and_survives_pickling():
    from distributed.protocol.pickle import dumps, loads

    from picosam_pipeline.data.images import BadImageError
    from picosam_pipeline.teacher.executors import _reporting, _result

    def unreadable():
        try:
            raise BadImageError("truncated", "a.jpg", "image 'a.jpg' is truncated")
        except BadImageError as err:  # as load_pixels does: the BadImageError stays chained as __context__
            raise PipelineError(f"{err} (image 7)") from None

    refused = loads(dumps(_reporting(unreadable)))  # as a worker returns it to the client
    with pytest.raises(PipelineError, match=r"^image 'a.jpg' is truncated \(image 7\)$"):
        _result(refused)
    assert _result(loads(dumps(_reporting(sum, [1, 2])))) == 3
    with pytest.raises(ZeroDivisionError):  # a bug is not a bad input: raised as it is, dask reports it
        _reporting(lambda: 1 / 0)
    err = loads(dumps(BadImageError("missing", "b.jpg", "image 'b.jpg' does not exist")))
    assert (err.kind, err.path, str(err)) == ("missing", "b.jpg", "image 'b.jpg' does not exist")


def test_an_unreadable_image_in_a_dask_task_is_one_paragraph_without_compute_failed(
    project, fake, tmp_path, monkeypatch, caplog
):
    """A real LocalCluster (in this process, so that FakeTeacher applies); its worker logs into caplog."""
    from distributed import LocalCluster

    from picosam_pipeline.data.images import BadImageError

    def unreadable(path, expected_size=None):
        raise BadImageError("unreadable", path, f"image {str(path)!r} cannot be decoded (test)")

    monkeypatch.setattr(teacher_runner, "load_image", unreadable)
    messages = {}
    for executor in ("local", "dask"):
        with (
            LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
            pytest.raises(PipelineError) as err,
        ):
            run_stage(
                project,
                tmp_path / executor / "logits.zarr",
                f"teacher.executor={executor}",
                f"teacher.scheduler_address={cluster.scheduler_address}",
            )
        messages[executor] = str(err.value)
    assert messages["dask"] == messages["local"]
    assert "cannot be decoded (test) (image 200001" in messages["dask"]
    assert not [r for r in caplog.records if "Compute Failed" in r.getMessage()]


@pytest.mark.slow
def test_worker_process_errors_and_a_busy_dashboard_port_print_only_our_message(project, capfd, monkeypatch):
    """The default LocalCluster (worker processes) on a machine where port 8787 is taken: a missing checkpoint
    is one paragraph, as in process; no "Compute Failed" block, no traceback, no warning about the port."""
    import socket
    import warnings

    monkeypatch.chdir(project[0])
    sets = [a for s in project[1] if "allow_random_weights" not in s for a in ("--set", s)]
    sets += ["--set", "teacher.allow_random_weights=false", "--set", "runtime.device=cpu"]
    busy = socket.socket()
    try:
        busy.bind(("", 8787))  # what another user's dask dashboard does (taken already: just as good)
        busy.listen()
    except OSError:
        pass
    outputs = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for executor in ("local", "dask"):
                result = CliRunner().invoke(
                    cli,
                    [
                        "run-stage",
                        "teacher-logits",
                        *sets,
                        "--set",
                        f"teacher.executor={executor}",
                        "--set",
                        f"teacher.out={executor}.zarr",
                    ],
                )
                assert result.exit_code == 1, result.output
                outputs[executor] = result.output + capfd.readouterr().err  # the worker's stderr is fd 2
    finally:
        busy.close()
    for _executor, text in outputs.items():
        error = [line for line in text.splitlines() if line.startswith("Error: ")]
        assert len(error) == 1 and "teacher.checkpoint" in error[0] and "does not exist" in error[0], text
        assert not re.search(r"Compute Failed|Traceback|already in use|distributed\.", text), text
    assert outputs["dask"].split("Error: ")[1] == outputs["local"].split("Error: ")[1]
    assert not [w for w in caught if "already in use" in str(w.message)]
