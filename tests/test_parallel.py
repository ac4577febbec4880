"""Worker processes of prepare, pack and the GT-mask teacher: order, laziness, errors, and byte-identical outputs."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
from pathlib import Path

import pytest

from picosam_pipeline import parallel
from picosam_pipeline.config import Config
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.stages import prepare
from picosam_pipeline.teacher.gt_mask import write_mask_teacher_store
from tests.helpers.pipeline_inputs import build_inputs, run_pack


def _square(x: int) -> int:
    if x == 13:
        raise ValueError("job 13 is bad")
    return x * x


@pytest.mark.slow  # worker process pools, seconds each
def test_ordered_map_keeps_job_order_pulls_jobs_lazily_and_raises_a_jobs_error():
    assert list(parallel.ordered_map(_square, range(12), workers=2)) == [x * x for x in range(12)]
    assert list(parallel.ordered_map(_square, range(12), workers=0)) == [x * x for x in range(12)]

    pulled = []
    jobs = (pulled.append(x) or x for x in itertools.count())  # endless: only a lazy map can return
    results = parallel.ordered_map(_square, jobs, workers=2, in_flight=3)
    assert [next(results) for _ in range(5)] == [0, 1, 4, 9, 16]
    assert len(pulled) <= 5 + 3  # the jobs taken are those returned plus at most in_flight queued
    results.close()

    with pytest.raises(ValueError, match="job 13 is bad"):
        list(parallel.ordered_map(_square, range(20), workers=2))


def test_a_worker_that_dies_is_one_message_not_a_broken_pool_traceback():
    with pytest.raises(PipelineError, match="a worker process of this stage died"):
        list(parallel.ordered_map(os._exit, [3], workers=1))


def test_default_workers_skip_small_inputs():
    assert parallel.default_workers(2 * parallel.MIN_JOBS_PER_WORKER - 1) == 0
    assert parallel.default_workers(100 * parallel.MIN_JOBS_PER_WORKER) >= 1


def _tree(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.mark.slow  # its own pipeline, twice, with worker processes
def test_prepare_teacher_and_pack_write_the_same_bytes_with_worker_processes(tmp_path, monkeypatch):
    """The built-in sample through prepare, the GT-mask teacher and pack, in this process and then again with two
    worker processes (the threshold lowered so its 9 images get them): every output file is byte-identical."""
    outputs = ("prepared", "stores", "shards")
    cfg: Config = build_inputs(tmp_path)  # workers=0: the sample is below the threshold
    assert parallel.default_workers(9) == 0
    run_pack(cfg, Path(cfg.pack.out_dir))
    inline = {name: _tree(tmp_path / name) for name in outputs}
    for name in outputs:
        shutil.rmtree(tmp_path / name)

    monkeypatch.setattr(parallel, "MIN_JOBS_PER_WORKER", 1)
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 2)
    assert parallel.default_workers(9) == 2
    prepare.run(cfg, None)
    write_mask_teacher_store(cfg.pack.index, cfg.pack.store_paths()["gt"], splits=cfg.pack.splits)
    run_pack(cfg, Path(cfg.pack.out_dir))
    for name in outputs:
        files = _tree(tmp_path / name)
        assert files.keys() == inline[name].keys(), name
        assert [k for k in files if files[k] != inline[name][k]] == [], name


def _sigint_disposition(_job) -> bool:
    """In a worker: whether SIGINT is ignored there."""
    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_workers_leave_ctrl_c_to_the_main_process():
    """Ctrl-C reaches the whole process group: the pool's workers ignore SIGINT (a job is never cut short, no worker
    prints a traceback), while the main process keeps its own handler, stops the pool and says so once
    (`tests/test_cli.py`: one line, exit 130)."""
    before = signal.getsignal(signal.SIGINT)
    assert all(parallel.ordered_map(_sigint_disposition, range(8), workers=2))
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back: its Ctrl-C still works
