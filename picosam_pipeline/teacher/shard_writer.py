"""Store writes behind compute: finished shards go to a background thread, so the teacher never waits for disk.

:class:`ShardAssembler` collects the stored codes of a pass's instances as the teacher produces them, in any
order of images, and hands out each shard the moment its last row arrives. :class:`ShardWriter` writes those
shards in one background thread (:meth:`LogitStore.write_shard`, which marks a shard done only after all its
files are written, so a crash loses at most the shards in flight and a rerun redoes exactly them). The queue is
bounded (``max_pending`` shards), so a slow disk slows the teacher rather than filling memory; a write error
is raised in the teacher's thread at the next :meth:`~ShardWriter.submit` or at :meth:`~ShardWriter.close`.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from picosam_pipeline.teacher.store import LogitStore


@dataclass
class PendingShard:
    """One shard to fill: its number and the index rows it holds (an ``InstanceRows``, in store row order)."""

    shard: int
    rows: Any


class ShardAssembler:
    """Buffers of the shards of ``jobs``; :meth:`add` returns the shards its rows completed.

    Rows are numbered across ``jobs`` in order (job 0's rows first): row ``r`` is row ``r - offset[j]`` of job ``j``.
    """

    def __init__(self, jobs: list[PendingShard], side: int, dtype: np.dtype) -> None:
        self.jobs = jobs
        self.offsets = np.cumsum([0] + [len(j.rows) for j in jobs])
        self.codes = [np.empty((len(j.rows), side, side), dtype) for j in jobs]
        self.confidence = [np.empty(len(j.rows), np.float32) for j in jobs]
        self.missing = [len(j.rows) for j in jobs]

    def job_of(self, rows: np.ndarray) -> np.ndarray:
        """The job number of each pass row in ``rows`` (``(n,)`` int)."""
        return np.searchsorted(self.offsets, rows, side="right") - 1

    def add(self, rows: np.ndarray, codes: np.ndarray, confidence: np.ndarray) -> list[int]:
        """Store the ``(n, S, S)`` codes and ``(n,)`` confidences of pass rows ``rows`` (``(n,)`` int, ascending);
        return the job numbers completed by them."""
        completed = []
        owner = self.job_of(rows)
        for j in np.unique(owner).tolist():
            mine = owner == j
            local = rows[mine] - self.offsets[j]
            self.codes[j][local] = codes[mine]
            self.confidence[j][local] = confidence[mine]
            self.missing[j] -= int(mine.sum())
            if self.missing[j] == 0:
                completed.append(j)
        return completed

    def pop(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Job ``j``'s codes and confidences, releasing the buffers."""
        codes, confidence = self.codes[j], self.confidence[j]
        self.codes[j] = self.confidence[j] = None
        return codes, confidence


class ShardWriter:
    """Writes shards of ``store`` in one background thread, ``max_pending`` at most in its queue."""

    def __init__(self, store: LogitStore, max_pending: int = 4) -> None:
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.written: queue.Queue = queue.Queue()  # shard numbers, as their writes complete
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="teacher-store-writer", daemon=True)
        self.thread.start()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # the teacher failed: finish the complete shards already queued, keep the teacher's error
            self.queue.put(None)
            self.thread.join()

    def submit(self, job: PendingShard, codes: np.ndarray, confidence: np.ndarray) -> None:
        """Queue shard ``job.shard`` (``codes``: the codec's values, ``(n, S, S)``); blocks while the queue is full."""
        self._raise()
        self.queue.put((job, codes, confidence))

    def done(self) -> list[int]:
        """Shards written since the last call."""
        out = []
        while not self.written.empty():
            out.append(self.written.get_nowait())
        return out

    def close(self) -> None:
        """Wait for every queued shard to be written; raise the writer's error, if any."""
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain: the teacher's thread raises at its next submit
            job, codes, confidence = item
            try:
                self.store.write_shard(job.shard, codes, encoded=True, confidence=confidence)
            except BaseException as err:  # noqa: BLE001 -- handed to the teacher's thread
                self.error = err
                continue
            self.written.put(job.shard)
