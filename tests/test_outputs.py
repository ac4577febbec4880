"""Stage outputs (``picosam_pipeline/outputs.py``): every stage replaces only its own output folder, one run at a
time, and says in one paragraph when the disk is full or the folder is not writable.

The refusals happen before any work, so they are tested on every stage with the repo's params and nothing built.
The lock is tested with real processes (a holder, a second run, a killed holder); a full disk and a read-only
file system on a tmpfs the test mounts (root only: skipped with the reason elsewhere).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from picosam_pipeline import output_lock, outputs
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.stages import STAGES
from tests.helpers.stage_outputs import (
    OUT_KEY,
    PARAMS,
    SMALL_SAMPLE,
    make_project,
    run_stage,
    snapshot,
    stage_config,
)

BIN = Path(sys.executable).parent
CLI = str(BIN / "picosam-pipeline")

# A setting of each stage's output param that equals, contains or lies inside one of its inputs.
ON_INPUT = {
    "prepare": ("data/datasets/sample/train", "is the stage's input prepare.splits"),
    "teacher-logits": ("data/checkpoints", "contains the stage's input teacher.checkpoint"),
    "pack": ("data/prepared", "contains the stage's input pack.index"),
    "train": ("data/shards/train/x", "lies inside the stage's input train.shards"),
    "evaluate": ("data", "contains the stage's input evaluate.shards"),
    "quantize": ("data/shards/train", "is the stage's input quantize.train_shards"),
    "export": ("data/quantize", "is the stage's input export.quantized_dir"),
    "package": ("data/export", "is the stage's input package.export_dir"),
    "evaluate-int8": ("data/shards", "contains the stage's input evaluate.shards"),
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project-like working directory (dvc.yaml, params.yaml, .git) with a file of the user's in it."""
    root = make_project(tmp_path / "project")
    monkeypatch.chdir(root)
    return root


# --------------------------------------------------------------------------------------------------
# 1. only its own files, for every stage


@pytest.mark.parametrize("stage", list(OUT_KEY))
def test_every_stage_refuses_the_project_folder_before_any_work(stage, project):
    before = snapshot(project)
    for out, said in ((".", "is the project folder"), ("..", "is the project folder or above it")):
        with pytest.raises(PipelineError, match=f"{OUT_KEY[stage]}: '{out}' {said}.*--set {OUT_KEY[stage]}=PATH"):
            run_stage(stage, stage_config(stage, out))
    other = project / "sub"
    (other / ".git").mkdir(parents=True)
    with pytest.raises(PipelineError, match=r"holds \.git, so it is a project"):
        run_stage(stage, stage_config(stage, "sub"))
    assert snapshot(project) == before and sorted(p.name for p in project.parent.iterdir()) == ["project"]


@pytest.mark.parametrize("stage", list(OUT_KEY))
def test_every_stage_refuses_a_folder_holding_files_it_did_not_write(stage, project):
    mine = project / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    pattern = "is not a teacher-logit store" if stage == "teacher-logits" else r"holds \['thesis.tex'\], which stage"
    with pytest.raises(PipelineError, match=pattern):
        run_stage(stage, stage_config(stage, "mine"))
    assert (mine / "thesis.tex").read_text() == "years of work" and [p.name for p in mine.iterdir()] == ["thesis.tex"]
    # ... and another stage's output: its marker names other params sections
    (mine / "thesis.tex").unlink()
    (mine / "config.resolved.json").write_text(json.dumps({"someone_else": {}}))
    with pytest.raises(PipelineError, match="config.resolved.json" if stage != "teacher-logits" else "not a teacher"):
        run_stage(stage, stage_config(stage, "mine"))
    assert (mine / "config.resolved.json").exists()


@pytest.mark.parametrize("stage", list(ON_INPUT))
def test_every_stage_refuses_an_output_over_its_input(stage, project):
    out, said = ON_INPUT[stage]
    Path(out).mkdir(parents=True)
    (Path(out) / "data.bin").write_bytes(b"input")
    with pytest.raises(PipelineError, match=f"'{out}' {said}"):
        run_stage(stage, stage_config(stage, out))
    assert (Path(out) / "data.bin").read_bytes() == b"input"


def test_the_cli_refuses_export_into_the_checkout_with_one_paragraph(project):
    """The reported data loss: `run-stage export --set export.out_dir=.` deleted a checkout, .git included."""
    before = snapshot(project)
    proc = subprocess.run(
        [CLI, "run-stage", "export", "--params", str(PARAMS), "--set", "export.out_dir=."],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "export.out_dir: '.' is the project folder" in proc.stderr
    assert snapshot(project) == before


def test_a_stage_replaces_its_own_output_and_tidies_a_killed_publish(tmp_path, monkeypatch):
    """A second run replaces the folder it wrote; a publish killed between its renames is undone by the next run."""
    monkeypatch.chdir(tmp_path)
    cfg = stage_config("sample", "sample")
    run_stage("sample", cfg)
    first = snapshot(tmp_path / "sample")
    marker = json.loads(first["config.resolved.json"])
    assert marker.keys() == {"sample", "_output"}
    assert marker["_output"] == {"stage": "sample", "key": "sample.out_dir", "path": "sample"}
    (tmp_path / "sample").rename(tmp_path / "sample.replaced")  # killed after the first rename of a publish
    (tmp_path / "sample.partial").mkdir()  # and a killed run's unfinished folder (its marker is written first)
    (tmp_path / "sample.partial" / "config.resolved.json").write_bytes(first["config.resolved.json"])
    (tmp_path / "sample.partial" / "train").mkdir()
    run_stage("sample", dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, seed=1)))
    assert snapshot(tmp_path / "sample") != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics", "sample"]


def test_an_unfinished_folder_of_someone_else_is_not_deleted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sample.partial").mkdir()
    (tmp_path / "sample.partial" / "draft.txt").write_text("mine")
    with pytest.raises(PipelineError, match="sample.partial exists and was not started by stage sample"):
        run_stage("sample", stage_config("sample", "sample"))
    assert (tmp_path / "sample.partial" / "draft.txt").read_text() == "mine"


def test_pack_index_pointing_at_params_yaml_does_not_advise_deleting_it(packed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.read_text())
    with pytest.raises(PipelineError) as err:
        run_stage(
            "pack",
            stage_config(
                "pack",
                "shards",
                f"pack.index={params}",
                f"pack.stores_dir={packed.pack.stores_dir}",
                "pack.teachers=[gt]",
            ),
        )
    text = str(err.value)
    assert "not the instance index prepare writes" in text and "point the param that names it" in text
    assert "delete" not in text and params.read_text() == PARAMS.read_text()


# --------------------------------------------------------------------------------------------------
# 4. one run at a time: real processes

HOLD = """
import sys, time
from picosam_pipeline.output_lock import output_lock
with output_lock(sys.argv[1], "sample"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@contextlib.contextmanager
def holder(out: Path, seconds: float):
    """A second process holding the lock of ``out`` for ``seconds``."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def sample_cli(tmp_path: Path, *extra: str, **popen) -> subprocess.Popen:
    sets = [
        a
        for s in ("sample.out_dir=sample", *SMALL_SAMPLE, f"runtime.metrics_dir={tmp_path / 'metrics'}")
        for a in ("--set", s)
    ]
    return subprocess.Popen(
        [CLI, "run-stage", "sample", "--params", str(PARAMS), *sets, *extra],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_a_second_run_fails_naming_the_holder(tmp_path):
    with holder(tmp_path / "sample", 120) as proc:
        run = sample_cli(tmp_path, "--on-locked", "fail")
        _, err = run.communicate(timeout=300)
    assert run.returncode == 1 and "Traceback" not in err, err
    assert (
        f"sample is being written by another run (stage sample, pid {proc.pid} on host {socket.gethostname()}, "
        "started 20"
        in err
        and "sample.stage-lock" in err
    ), err
    assert not (tmp_path / "sample").exists() and not (tmp_path / "sample.partial").exists()


def test_a_second_run_waits_for_the_holder_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(output_lock.ON_LOCKED_ENV, raising=False)
    cfg = stage_config("sample", "sample")
    with holder(tmp_path / "sample", 3) as proc:
        start = time.monotonic()
        run_stage("sample", cfg)
        waited = time.monotonic() - start
        assert proc.wait(timeout=30) == 0
    assert waited > 1.5 and (tmp_path / "sample" / "BAD_INPUTS.md").is_file()
    assert not (tmp_path / "sample.stage-lock").exists()  # released


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with holder(tmp_path / "sample", 120) as proc:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (tmp_path / "sample.stage-lock").exists()  # what a killed run leaves
    run_stage("sample", stage_config("sample", "sample"))
    assert (
        f"took over the lock of sample left by a run that is gone (stage sample, pid {proc.pid}"
        in capsys.readouterr().err
    )
    assert (tmp_path / "sample" / "BAD_INPUTS.md").is_file() and not (tmp_path / "sample.stage-lock").exists()


def test_two_runs_at_once_both_finish_one_after_the_other(tmp_path, monkeypatch):
    """Two real `run-stage sample` on one output: one waits for the other; the output is whole, no leftovers."""
    runs = [sample_cli(tmp_path) for _ in range(2)]
    errs = [r.communicate(timeout=300)[1] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], errs
    assert sum("waiting for sample: another run holds it" in e for e in errs) <= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics", "sample"]
    alone = tmp_path / "alone"
    alone.mkdir()
    monkeypatch.chdir(alone)  # the same run alone, in this process
    run_stage("sample", stage_config("sample", "sample", f"runtime.metrics_dir={alone / 'metrics'}"))
    assert snapshot(tmp_path / "sample") == snapshot(alone / "sample")


def test_the_teacher_stage_refuses_a_locked_store_before_building_the_teacher(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    index = tmp_path / "index.parquet"
    index.write_bytes(b"")  # never read: the lock is checked first
    store = tmp_path / "stores" / "sam2.zarr"
    store.parent.mkdir()
    output_lock.set_on_locked("fail")
    try:
        with holder(store, 120) as proc:
            with pytest.raises(PipelineError, match=f"sam2.zarr is being written by another run .*pid {proc.pid}"):
                run_stage("teacher-logits", stage_config("teacher-logits", str(store), f"teacher.index={index}"))
    finally:
        output_lock.set_on_locked(None)


# --------------------------------------------------------------------------------------------------
# 6. full disk, read-only file system, permission denied


@contextlib.contextmanager
def tmpfs(where: Path, size: str):
    """A tmpfs of ``size`` mounted at ``where`` (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root (the test makes its own file system); not root here")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): no small file system to fill")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture(scope="module")
def packed(sample_inputs, tmp_path_factory):
    """The session's sample inputs (read-only: index and gt store), writing into this module's folder."""
    from tests.helpers.pipeline_inputs import elsewhere

    return elsewhere(sample_inputs, tmp_path_factory.mktemp("outputs"))


def test_a_full_disk_during_pack_is_one_paragraph_and_leaves_the_previous_output(packed, tmp_path):
    from tests.helpers.pipeline_inputs import run_pack

    cfg = dataclasses.replace(
        packed, runtime=dataclasses.replace(packed.runtime, metrics_dir=str(tmp_path / "metrics"))
    )
    with tmpfs(tmp_path / "small", "400k") as disk:
        run_pack(cfg, disk / "shards", splits=["val"])  # a small previous output that fits
        before = snapshot(disk / "shards")
        unraisable = []  # a tar writer left half-closed would print a traceback when collected, after the message
        hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
        try:
            with pytest.raises(PipelineError) as err:
                run_pack(cfg, disk / "shards")  # both splits: ~2.5x as big
            text = str(err.value)
            del err  # its traceback holds the stage's frames: let them go
            gc.collect()
        finally:
            sys.unraisablehook = hook
        assert not unraisable, [repr(u.exc_value) for u in unraisable]
        assert text.startswith(f"stage pack could not write {disk}/shards.partial") and "(its shards)" in text, text
        assert "the file system is full (No space left on device)" in text and re.search(r"KB free there\.", text)
        assert re.search(
            rf"needs more than the [\d.]+ KB it had written when the disk filled \(the previous output "
            rf"{disk}/shards, kept until the new one is complete, holds [\d.]+ KB\); [\d.]+ KB free",
            text,
        ), text
        assert f"The unfinished output {disk}/shards.partial was removed" in text and "rerun starts over" in text
        assert "\n" not in text and snapshot(disk / "shards") == before
        assert sorted(p.name for p in disk.iterdir()) == ["shards"]


def test_train_checks_the_space_for_its_checkpoint_before_any_work(packed, tmp_path):
    from picosam_pipeline.config import TrainConfig
    from picosam_pipeline.stages import train

    with tmpfs(tmp_path / "small", "64k") as disk:
        cfg = dataclasses.replace(
            packed,
            train=TrainConfig(
                shards=packed.pack.out_dir, out_dir=str(tmp_path / "train"), state_dir=str(disk / "state"), steps=2
            ),
        )
        start = time.monotonic()
        with pytest.raises(
            PipelineError,
            match=r"stage train needs about [\d.]+ MB for the resumable checkpoint in "
            rf"{disk}/state, but only [\d.]+ KB are free there; nothing was computed",
        ):
            train.run(cfg, None)
        assert time.monotonic() - start < 20 and not (tmp_path / "train").exists()


def test_the_resumable_mode_keeps_the_teachers_partial_store_and_says_so(tmp_path):
    def is_store(path):
        return (path / "shard").is_file() or not any(path.iterdir())

    with tmpfs(tmp_path / "small", "64k") as disk:
        out = disk / "sam2.zarr"
        output = outputs.StageOutput(
            None,
            "teacher-logits@sam2",
            "teacher.out",
            out,
            sections=None,
            inputs={},
            what="teacher-logit store",
            resumable="The finished shards are kept: rerunning resumes from them.",
            recognise=is_store,
        )
        with pytest.raises(PipelineError) as err, output as work:
            assert work == disk / "sam2.zarr.partial" and not work.exists()  # the stage opens or resumes it
            work.mkdir()
            (work / "shard").write_bytes(b"\0" * 2**20)
        text = str(err.value)
        assert "stage teacher-logits@sam2 could not write" in text and "the file system is full" in text
        assert "The finished shards are kept" in text and (disk / "sam2.zarr.partial").is_dir()
        assert not out.exists()  # nothing published
        (out / "foreign").mkdir(parents=True)  # not recognised as the stage's own: refused, never replaced
        with pytest.raises(PipelineError, match="is not a teacher-logit store, so stage teacher-logits@sam2 does not"):
            output.__enter__()
        assert (out / "foreign").is_dir()


def test_the_resumable_mode_publishes_the_unfinished_folder_only_when_there_is_one(tmp_path):
    out = tmp_path / "store"
    output = outputs.StageOutput(None, "teacher-logits", "teacher.out", out, sections=None, inputs={}, resumable="k")
    with output as work:
        work.mkdir()
        (work / "a").write_text("new")
    assert (out / "a").read_text() == "new" and not work.exists()
    with output as work:  # finished in place (out held this pass): nothing to publish, out stays
        (out / "a").write_text("in place")
    assert (out / "a").read_text() == "in place" and not work.exists()


@pytest.mark.parametrize("stage", list(OUT_KEY))
def test_every_stage_on_a_read_only_file_system_says_so_before_any_work(stage, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with tmpfs(tmp_path / "ro", "1m") as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(PipelineError) as err:
            run_stage(stage, stage_config(stage, str(disk / "out"), "teacher.index=index.parquet"))
        text = str(err.value)
        assert f"could not write {disk}" in text and "the file system is read-only" in text, text
        key = "train.state_dir" if stage == "train" else OUT_KEY[stage]  # train checks its state folder first
        assert "remount it read-write" in text and f"set {key} to a writable folder" in text and "\n" not in text


def _in_child_as_nobody(func, *args) -> str:
    import filelock

    assert filelock.SoftFileLock and filelock.Timeout  # loaded here: the child may not read the interpreter's files
    """Run ``func(*args)`` in a forked child that dropped root for user nobody; returns its PipelineError text."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.setgid(65534)
            os.setuid(65534)
            func(*args)
            message = "no error"
        except PipelineError as err:
            message = str(err)
        except BaseException as err:  # a traceback would be the failure this test looks for
            message = f"{type(err).__name__}: {err}"
            code = 1
        os.write(write, message.encode())
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        message = f.read()
    os.waitpid(pid, 0)
    return message


def test_an_output_folder_without_write_permission_is_one_paragraph(monkeypatch):
    root = Path(tempfile.mkdtemp(prefix="picosam-eacces-"))  # pytest's tmp_path is not reachable by another user
    try:
        os.chmod(root, 0o755)
        locked = root / "locked"
        locked.mkdir(mode=0o555)
        metrics = root / "metrics"
        metrics.mkdir()
        os.chmod(metrics, 0o777)
        monkeypatch.chdir(root)
        cfg = stage_config("export", str(locked / "export"), f"runtime.metrics_dir={metrics}")
        run = STAGES["export"].load()
        if os.geteuid() == 0:
            message = _in_child_as_nobody(run, cfg, None)
        else:
            with pytest.raises(PipelineError) as err:
                run(cfg, None)
            message = str(err.value)
        assert f"stage export could not write {locked}" in message and "permission denied" in message, message
        assert "make" in message and "writable" in message
    finally:
        os.chmod(root / "locked", 0o755)
        import shutil

        shutil.rmtree(root)
