"""Ordered, bounded map of per-image CPU work over worker processes: prepare, pack and the GT-mask teacher.

Their per-image work (image decode, mask decode and resampling, JPEG/PNG encoding) is CPU-bound and holds the
GIL for a good part of it (pycocotools, numpy indexing, PIL's Python side): on threads a 2-core machine ran them
at 104-135 % CPU. Worker processes take the work off the main process, which keeps only what must be serial
(the index, tar and zarr writes) and the progress bar.

:func:`ordered_map` is ``map(fn, jobs)``: results come back in job order (the outputs are byte-identical
whatever the worker count), jobs are pulled lazily so at most ``in_flight`` of them (and their arrays) exist at a
time, and ``workers=0`` runs everything in the calling process (small inputs, where starting workers would cost
more than it saves). Workers are started by a forkserver, not forked from the caller, whose zarr, dask or torch
threads could hold locks a forked child would inherit; they ignore SIGINT, so Ctrl-C reaches the main process
alone, which stops the pool and reports the interrupt once instead of a traceback per worker. As with any
non-fork worker processes, each worker imports the caller's ``__main__`` script: a script that runs stages needs an
``if __name__ == "__main__":`` guard (the CLI, ``python -m`` and pytest are fine).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from picosam_pipeline.errors import PipelineError

# Jobs (images) a worker must get to pay for its start (it imports numpy, PIL and torch: about 2 s); the tests
# lower it to run the worker path on the built-in sample.
MIN_JOBS_PER_WORKER = 64


def default_workers(jobs: int) -> int:
    """Worker processes for ``jobs`` jobs: one per core (at most 8), none when there are too few jobs to pay for
    starting two."""
    if jobs < 2 * MIN_JOBS_PER_WORKER:
        return 0
    return max(1, min(8, os.cpu_count() or 1, jobs // MIN_JOBS_PER_WORKER))


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_pool(workers: int) -> Executor:
    """A process pool of ``workers`` forkserver workers that leave Ctrl-C to the main process."""
    context = multiprocessing.get_context("forkserver")
    if threading.current_thread() is threading.main_thread():
        # The forkserver inherits an ignored SIGINT (Python keeps a disposition it was started with) and hands it to
        # every worker it forks, so none has a moment between its start and the initializer in which a Ctrl-C kills
        # it; a server someone else started already is covered by the initializer alone.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGINT, previous)
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_ignore_sigint)


def ordered_map(
    fn: Callable, jobs: Iterable, *, workers: int, in_flight: int | None = None, pool: Executor | None = None
) -> Iterator:
    """``map(fn, jobs)`` on ``workers`` processes (0: in this process), in order, at most ``in_flight`` jobs queued.

    ``fn`` and the jobs must pickle (a module-level function, plain data and numpy arrays). Unlike
    ``Executor.map`` it pulls ``jobs`` lazily, so the arrays the jobs carry never pile up. An exception in a job
    is raised here, at that job's turn, after the pool has been shut down. ``pool``: a :func:`worker_pool` of
    ``workers`` to use (and leave running) instead of starting one, for a stage that maps twice.
    """
    if workers <= 0:
        yield from map(fn, jobs)
        return
    in_flight = in_flight or 4 * workers
    own_pool = pool is None
    pool = worker_pool(workers) if own_pool else pool
    pending: deque = deque()
    try:
        for job in jobs:
            pending.append(pool.submit(fn, job))
            if len(pending) >= in_flight:
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())
    finally:
        if own_pool:
            pool.shutdown(wait=True, cancel_futures=True)
        else:  # the jobs this map queued and no longer wants (a stop part way): the pool's next user must not wait
            for future in pending:
                future.cancel()


def _result(future: Future) -> Any:
    try:
        return future.result()
    except BrokenProcessPool:
        raise PipelineError(
            "a worker process of this stage died: killed, out of memory (the kernel log, `dmesg`, "
            "names an out-of-memory kill), or crashed in a C extension; rerun the stage. A Python "
            'script that runs stages itself needs an `if __name__ == "__main__":` guard, as for any '
            "worker processes: each worker imports the script"
        ) from None
