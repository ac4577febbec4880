"""Crash safety, for real: SIGKILL the teacher stage mid-run, rerun it, get the store of an uninterrupted run.

``picosam-pipeline run-stage teacher-logits`` (random-weight SAM2.1-tiny on a dask LocalCluster, 2 images,
4 shards) is started in its own process group and the whole group (the CLI and its dask worker) is killed with
SIGKILL as soon as the first shard is marked done. The rerun must keep the finished shards (same files, not
recomputed), compute the others, and end with exactly the bytes of an uninterrupted in-process run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from picosam_pipeline.device import resolve_runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.reports import last_run
from picosam_pipeline.stages import teacher_logits
from picosam_pipeline.teacher.store import open_store
from tests.helpers.teacher_project import CLI, config, store_files, tiny_project

pytestmark = pytest.mark.slow


def done_shards(path: Path) -> list[bool]:
    try:
        return open_store(path).done_shards().tolist()
    except PipelineError:  # not created yet (the store appears atomically)
        return []


def run_stage_cli(root: Path, sets: list[str], log: Path, **popen) -> subprocess.Popen:
    args = [CLI, "run-stage", "teacher-logits", *(a for s in sets for a in ("--set", s))]
    return subprocess.Popen(args, cwd=root, stdout=log.open("w"), stderr=subprocess.STDOUT, **popen)


def test_sigkill_then_rerun_gives_the_store_of_an_uninterrupted_run(tmp_path, monkeypatch):
    sets = tiny_project(tmp_path, 2)
    monkeypatch.chdir(tmp_path)
    clean = tmp_path / "clean" / "logits.zarr"
    cfg = config(tmp_path, sets, f"teacher.out={clean}", f"runtime.metrics_dir={clean.parent / 'metrics'}")
    teacher_logits.run(cfg, resolve_runtime(cfg.runtime))

    # `run-stage teacher-logits` runs the passes of params.yaml's `teachers`: the one pass sam2 writes its store here
    out = tmp_path / "data" / "teacher" / "stores" / "sam2.zarr"
    partial = teacher_logits.partial_path(out)
    log = tmp_path / "killed.log"
    proc = run_stage_cli(tmp_path, [*sets, "teacher.executor=dask"], log, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not any(done_shards(partial)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"the stage ended before it could be killed:\n{log.read_text()}"
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its dask worker, at once
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = done_shards(partial)
    assert 0 < sum(done) < len(done) == 4 and not out.exists(), log.read_text()
    logits = partial / "logits" / "c"
    finished = {f: f.stat().st_mtime_ns for f in logits.rglob("*") if f.is_file()}

    rerun = run_stage_cli(tmp_path, sets, tmp_path / "rerun.log")
    assert rerun.wait(timeout=600) == 0, (tmp_path / "rerun.log").read_text()
    run = last_run(tmp_path / "metrics", "teacher-logits@sam2")
    assert run["shards_computed"] == len(done) - sum(done)  # the finished shards were not recomputed
    for f, mtime in finished.items():  # ... and their files were kept as they were
        kept = out / f.relative_to(partial)
        if done[int(f.relative_to(logits).parts[0])]:
            assert kept.stat().st_mtime_ns == mtime
    assert not partial.exists()
    assert store_files(out) == store_files(clean)
