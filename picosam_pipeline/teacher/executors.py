"""Where the teacher's shard tasks run: in this process, on a dask LocalCluster sized to the machine, or on an
existing dask cluster.

The stage (``stages/teacher_logits.py``) hands the pending shards to either executor, which runs
:func:`runner.process_shards` over them (in this process: one run of all; on dask: one task per run of
consecutive shards, :func:`task_runs`); dask wraps the stage's work, it does not live inside it. Both executors are
context managers with two methods: :meth:`teacher_metadata` (build the teacher once in every process that will run
tasks, check that they all built the same one) and :meth:`map_shards` (run the shard tasks, yield their small
summaries as they finish; ``on_progress(instances)`` hears of every teacher batch as it finishes, for the progress
bar: in this process directly, from dask workers as events of a topic this client subscribes to, so it is called
on the client's event-loop thread).

LocalCluster sizing (``teacher.n_workers: 0``): with CUDA, one worker process per visible GPU, each pinned with
``CUDA_VISIBLE_DEVICES`` (as dask-cuda's ``LocalCUDACluster`` does) and computing on its ``cuda`` device; on a
CPU, ONE worker computing with all cores as torch threads (measured on 2 cores: two torch threads in one
process ran SAM2 faster than two single-threaded processes, and each extra process holds another teacher).
Every worker runs one task at a time (dask ``nthreads=1``); the parallelism inside a task is torch's.
``teacher.threads_per_worker`` sets the torch threads per worker (0 = the stage process's torch threads, i.e.
``runtime.num_threads`` or one per core, divided among the workers).

An existing cluster (``--set teacher.scheduler_address=tcp://host:8786``): its workers must see the index,
images, store and checkpoint at the same absolute paths (a shared file system) and have the same packages
(checked: every worker reports its teacher's weights digest). Start GPU workers one per GPU, e.g.
``dask cuda worker tcp://host:8786``, or ``CUDA_VISIBLE_DEVICES=i dask worker tcp://host:8786 --nthreads 1
--resources GPU=1``; when workers advertise a ``GPU`` resource every task asks for one. With
``threads_per_worker: 0`` a worker computes with all the cores its process may use.

A task that stops on bad input (a :class:`PipelineError`: a missing checkpoint, an image that became unreadable)
returns the error instead of raising it (:func:`_reporting`), and the client raises it: dask would log every
failed task as a "Compute Failed" block with a traceback on the worker's stderr, before the one-paragraph
message the user needs. Other exceptions are bugs and keep dask's report. The LocalCluster's scheduler serves
its (unused) HTTP endpoints on a free port of 127.0.0.1, not on 8787, so a second cluster on a shared machine
neither warns that the port is taken nor listens on the network.

The ``if __name__ == "__main__"`` guard that process-based dask needs is in the console script
(``picosam-pipeline``); scripts that call the stage directly must have it too.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from picosam_pipeline.config import TeacherConfig
from picosam_pipeline.device import Runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.teacher.runner import (
    InstanceRows,
    TeacherSpec,
    images_per_batch,
    process_shards,
    run_shards,
    teacher_metadata,
)

ShardJob = tuple[int, InstanceRows]  # (shard number, its index rows)
# Instances per dask task on a GPU: ~280 COCO images, 17 batches of 16 (an image straddling two tasks is encoded
# by both: <= 1 extra encoder pass per task). On a CPU one shard per task (the progress bar hears of every image
# through events, not only of finished tasks).
TASK_INSTANCES = 2048

# Metadata that may differ between workers that built the same teacher.
_PER_PROCESS_METADATA = ("torch_threads",)


@dataclass(frozen=True)
class _Refused:
    """A task's bad-input error, returned instead of raised (see the module docstring).

    Only the message travels: an exception pickles with its chained ``__context__`` (dask's tblib support),
    which may be of a class that cannot be rebuilt from its args on the client.
    """

    message: str


def _reporting(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a dask task, a :class:`PipelineError` returned as :class:`_Refused` (not logged by dask)."""
    try:
        return fn(*args)
    except PipelineError as err:
        return _Refused(str(err))


def _result(value: Any) -> Any:
    """A task's value, or the :class:`PipelineError` it returned raised here, in the client."""
    if isinstance(value, _Refused):
        raise PipelineError(value.message)
    return value


def compute_threads() -> int:
    """The torch threads this process computes with: ``runtime.num_threads`` when set, else torch's one per core."""
    return torch.get_num_threads()


# --------------------------------------------------------------------------------------------------
# in this process


class InProcess:
    """Shard tasks one after another in this process: no dask, no second process (tests, debugging, small runs)."""

    name = "local"

    def __init__(self, cfg: TeacherConfig, runtime: Runtime) -> None:
        self.spec = TeacherSpec.of(cfg, runtime, threads=cfg.threads_per_worker or compute_threads())
        self.workers = 1
        self.images_per_batch = images_per_batch(cfg, runtime.device)

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def teacher_metadata(self) -> dict[str, Any]:
        return teacher_metadata(self.spec)

    def map_shards(
        self, store_path: str, jobs: list[ShardJob], on_progress: Callable[[int], None] | None = None
    ) -> Iterator[dict[str, Any]]:
        # one stream: every image encoded once
        yield from process_shards(store_path, jobs, self.spec, on_progress=on_progress)


# --------------------------------------------------------------------------------------------------
# on dask


@dataclass(frozen=True)
class WorkerPlan:
    """One LocalCluster worker process: its name, torch threads and extra environment."""

    name: str
    threads: int
    env: dict[str, str]


def plan_workers(
    n_workers: int,
    threads_per_worker: int,
    device: torch.device,
    gpu_count: int,
    visible_devices: str | None,
    cores: int,
) -> tuple[list[WorkerPlan], str]:
    """The LocalCluster for ``device``: worker plans and the device string the workers compute on.

    Args:
        n_workers: ``teacher.n_workers``; 0 = one per GPU (``device`` cuda without an index), else 1.
        threads_per_worker: ``teacher.threads_per_worker``; 0 = ``cores // workers`` (at least 1).
        device: the resolved runtime device; ``cuda:N`` pins every worker to GPU N.
        gpu_count, visible_devices: ``torch.cuda.device_count()`` and this process's ``CUDA_VISIBLE_DEVICES``
            (the ids workers are pinned to index into it, as CUDA numbers visible devices).
    """
    gpus: list[str | None]
    if device.type == "cuda":
        ids = [d.strip() for d in visible_devices.split(",") if d.strip()] if visible_devices else []
        ids = ids or [str(i) for i in range(gpu_count)]
        if device.index is not None:
            ids = [ids[device.index]]
        n = n_workers or len(ids)
        gpus, worker_device = [ids[i % len(ids)] for i in range(n)], "cuda"
    else:
        n = n_workers or 1
        gpus, worker_device = [None] * n, device.type
    threads = threads_per_worker or max(1, cores // n)
    plans = []
    for i, gpu in enumerate(gpus):
        # dask's nanny sets OMP_NUM_THREADS=1 in workers; torch.set_num_threads(threads) then runs in the task
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        plans.append(WorkerPlan(f"teacher-{i}" + (f"-gpu{gpu}" if gpu is not None else ""), threads, env))
    return plans, worker_device


class DaskExecutor:
    """Shard tasks on dask: a LocalCluster sized by :func:`plan_workers`, or ``teacher.scheduler_address``."""

    name = "dask"

    def __init__(self, cfg: TeacherConfig, runtime: Runtime) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.cluster = None
        self.client = None
        self.resources: dict[str, float] | None = None
        self.spec: TeacherSpec | None = None
        self.workers = 0
        self.images_per_batch = images_per_batch(cfg, runtime.device)  # as this machine resolves it
        self._environ: dict[str, str] | None = None

    def __enter__(self) -> DaskExecutor:
        # dask's Nanny writes its pre-spawn environment (OMP_NUM_THREADS=1, MKL_NUM_THREADS=1, ...) into THIS
        # process's os.environ and leaves it there; every process started from here afterwards (a CLI, a second
        # cluster, a test's subprocess) would compute with 1 thread, and stored bytes depend on the thread count.
        self._environ = dict(os.environ)
        try:
            if self.cfg.scheduler_address:
                self._connect(self.cfg.scheduler_address)
            else:
                self._start_local_cluster()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        self.client = self.cluster = None
        if self._environ is not None:
            for key in set(os.environ) - set(self._environ):
                del os.environ[key]
            os.environ.update({k: v for k, v in self._environ.items() if os.environ.get(k) != v})
            self._environ = None

    def _start_local_cluster(self) -> None:
        from distributed import Client, Nanny, Scheduler, SpecCluster

        plans, device = plan_workers(
            self.cfg.n_workers,
            self.cfg.threads_per_worker,
            self.runtime.device,
            torch.cuda.device_count() if self.runtime.device.type == "cuda" else 0,
            os.environ.get("CUDA_VISIBLE_DEVICES"),
            compute_threads(),
        )
        workers = {
            p.name: {
                "cls": Nanny,
                "options": {"nthreads": 1, "host": "127.0.0.1", "env": p.env, "silence_logs": logging.ERROR},
            }
            for p in plans
        }
        # No dashboard; its HTTP endpoints on any free local port (the default, 8787, is often taken on a shared
        # machine).
        scheduler = {
            "cls": Scheduler,
            "options": {"host": "127.0.0.1", "dashboard": False, "dashboard_address": "127.0.0.1:0"},
        }
        try:
            self.cluster = SpecCluster(
                workers=workers, scheduler=scheduler, silence_logs=logging.ERROR, name="picosam-teacher"
            )
        except (OSError, TimeoutError) as err:
            raise PipelineError(
                f"could not start a dask LocalCluster on 127.0.0.1 ({err}); check that loopback networking works, "
                "or run the teacher without dask: --set teacher.executor=local"
            ) from None
        self.client = Client(self.cluster)
        # All plans have the same thread count; the device is "cuda" for pinned GPU workers.
        runtime = Runtime(torch.device(device), self.runtime.autocast_dtype, self.runtime.seed)
        self.spec = TeacherSpec.of(self.cfg, runtime, threads=plans[0].threads)
        self.workers = len(plans)

    def _connect(self, address: str) -> None:
        from distributed import Client

        try:
            self.client = Client(address, timeout="20s")
            self.client.wait_for_workers(1, timeout=120)
        except (OSError, TimeoutError) as err:
            raise PipelineError(
                f"teacher.scheduler_address: no dask cluster with workers at {address!r} "
                f"({err or type(err).__name__}); "
                "start `dask scheduler` and its workers (see picosam_pipeline/teacher/executors.py), or set "
                "teacher.scheduler_address=null to use a LocalCluster on this machine"
            ) from None
        infos = self.client.scheduler_info(n_workers=-1)["workers"].values()
        if any(info.get("resources", {}).get("GPU") for info in infos):
            self.resources = {"GPU": 1}  # workers declared their GPUs: one task per GPU at a time
        self.spec = TeacherSpec.of(self.cfg, self.runtime, threads=self.cfg.threads_per_worker)
        self.workers = len(infos)

    def _task_workers(self) -> list[str]:
        infos = self.client.scheduler_info(n_workers=-1)["workers"]
        if self.resources:
            return [addr for addr, info in infos.items() if info.get("resources", {}).get("GPU")]
        return list(infos)

    def teacher_metadata(self) -> dict[str, Any]:
        """Build the teacher on every worker (in a task, off the worker's event loop) and check they all match."""
        futures = [
            self.client.submit(
                _reporting,
                teacher_metadata,
                self.spec,
                workers=[addr],
                allow_other_workers=False,
                pure=False,
                resources=self.resources,
                key=f"teacher-build-{uuid.uuid4().hex}",
            )
            for addr in self._task_workers()
        ]
        metas = [_result(m) for m in self.client.gather(futures)]
        shared = [{k: v for k, v in m.items() if k not in _PER_PROCESS_METADATA} for m in metas]
        for other in shared[1:]:
            if other != shared[0]:
                diff = sorted(k for k in set(other) | set(shared[0]) if other.get(k) != shared[0].get(k))
                raise PipelineError(
                    f"the dask workers built different teachers (differing: {diff}); give every worker the same "
                    "packages and the same checkpoint file"
                )
        return metas[0]

    def map_shards(
        self, store_path: str, jobs: list[ShardJob], on_progress: Callable[[int], None] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Submit one task per run of consecutive shards (:func:`task_runs`, in shard order, so a lone worker takes
        them in order) and yield the shards' summaries as tasks finish. The tasks log every teacher batch's instances
        to an event topic of this run, handed to ``on_progress`` on the client's event-loop thread."""
        from distributed import as_completed

        run = uuid.uuid4().hex[:8]
        topic = f"teacher-progress-{run}" if on_progress is not None else None
        if topic is not None:
            self.client.subscribe_topic(topic, lambda event: on_progress(event[1]))  # event: (time, instances)
        futures = [
            self.client.submit(
                _reporting,
                run_shards,
                store_path,
                part,
                self.spec,
                topic,
                pure=False,
                resources=self.resources,
                key=f"teacher-shards-{part[0][0]}-{run}",
            )
            for part in task_runs(jobs, self.workers, TASK_INSTANCES if self.runtime.device.type == "cuda" else 1)
        ]
        try:
            for future in as_completed(futures):
                yield from _result(future.result())
        finally:  # an error or an interrupt: drop the tasks not started yet
            self.client.cancel(futures)
            if topic is not None:
                self.client.unsubscribe_topic(topic)


def task_runs(jobs: list[ShardJob], workers: int, instances_per_task: int = TASK_INSTANCES) -> list[list[ShardJob]]:
    """``jobs`` cut into dask tasks: runs of consecutive shards of about ``instances_per_task`` instances (at least
    one shard); with several workers also at least 4 tasks per worker while there are shards enough (so that a
    slow worker does not hold the tail)."""
    if not jobs:
        return []
    size = max(1, instances_per_task // max(1, len(jobs[0][1])))
    if workers > 1:
        size = max(1, min(size, math.ceil(len(jobs) / (4 * workers))))
    runs: list[list[ShardJob]] = []
    for job in jobs:
        if runs and len(runs[-1]) < size and runs[-1][-1][0] + 1 == job[0]:
            runs[-1].append(job)
        else:
            runs.append([job])
    return runs


def make_executor(cfg: TeacherConfig, runtime: Runtime) -> InProcess | DaskExecutor:
    """The executor ``teacher.executor`` names (enter it with ``with``)."""
    return InProcess(cfg, runtime) if cfg.executor == "local" else DaskExecutor(cfg, runtime)
