"""One run at a time per stage output: the exclusive lock ``<out>.stage-lock`` beside it.

Taken with filelock's :class:`~filelock.SoftFileLock`: an exclusively created file recording the holder's pid, host
and process start time (exclusive creation works on local disks and NFS), which a peer on the same host takes over
once that process is gone (a killed run) and never while it runs (the start time guards against a recycled pid).
Beside it, ``<out>.stage-lock.holder`` (created exclusively) says which run holds it, for the message a second run
prints. A file in either place that is not such a record (a user's file of that name) is refused, never taken for a
stale lock and deleted (:func:`check_lock_files`).

A second run waits (the default) or stops at once naming the holder: ``run-stage --on-locked fail`` or
``PICOSAM_ON_LOCKED=fail`` (for ``dvc repro``). A holder on another host cannot be proven dead from here: the
message says which file to remove when that machine is gone.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from picosam_pipeline.errors import PipelineError
from picosam_pipeline.untrusted import json_file_or_none
from picosam_pipeline.written_paths import sibling

LOCK = ".stage-lock"  # <out>.stage-lock beside the output
HOLDER = ".holder"  # <lock>.holder: JSON naming the run that holds the lock (pid, host, start time, stage)
ON_LOCKED_ENV = "PICOSAM_ON_LOCKED"
ON_LOCKED = ("wait", "fail")
MAX_LOCK_BYTES = 4096  # filelock's record: pid, host, start time; a bigger file is not a lock of ours
MAX_HOLDER_BYTES = 64 << 10
HOLDER_KEYS = {"pid", "host", "started", "stage", "command"}

_policy: dict[str, str | None] = {"on_locked": None}


def set_on_locked(value: str | None) -> None:
    """What a run does when another run holds its outputs' lock: ``wait`` or ``fail`` (None: $PICOSAM_ON_LOCKED or
    wait)."""
    if value is not None and value not in ON_LOCKED:
        raise PipelineError(f"on-locked: {value!r} is not one of {', '.join(ON_LOCKED)}")
    _policy["on_locked"] = value


def on_locked() -> str:
    """The policy set by :func:`set_on_locked`, else ``$PICOSAM_ON_LOCKED``, else ``wait``."""
    value = _policy["on_locked"] or os.environ.get(ON_LOCKED_ENV) or "wait"
    if value not in ON_LOCKED:
        raise PipelineError(
            f"{ON_LOCKED_ENV}={value!r} is not one of {', '.join(ON_LOCKED)}; unset it or set wait or fail"
        )
    return value


def lock_holder(lock: Path) -> dict[str, Any] | None:
    """The holder recorded beside ``lock`` (pid, host, started, stage, command), or None."""
    data = json_file_or_none(sibling(lock, HOLDER), MAX_HOLDER_BYTES)
    return data if isinstance(data, dict) else None


def _describe(holder: dict[str, Any] | None, lock: Path, pid: int | None) -> str:
    if holder is None or (pid is not None and holder.get("pid") != pid):
        return f"pid {pid} (the run is starting; no details recorded yet)" if pid else "a run that recorded no details"
    return (
        f"stage {holder.get('stage')}, pid {holder.get('pid')} on host {holder.get('host')}, started "
        f"{holder.get('started')}"
    )


@contextmanager
def output_lock(out: str | Path, stage: str, *, policy: str | None = None, say=None) -> Iterator[Path]:
    """Hold the exclusive lock ``<out>.stage-lock`` for the duration of the block (see module docstring, point 2)."""
    from filelock import SoftFileLock, Timeout

    say = say or _say
    lock_path = sibling(out, LOCK)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    policy = policy or on_locked()
    check_lock_files(lock_path, out)
    lock = SoftFileLock(str(lock_path), timeout=0, thread_local=False)
    before = lock_holder(lock_path) if lock_path.exists() else None  # a lock file left there: its holder is gone
    try:
        lock.acquire()
    except Timeout:
        holder = lock_holder(lock_path)
        who = _describe(holder, lock_path, lock.pid)
        remote = holder is not None and holder.get("host") != socket.gethostname()
        gone = (
            (
                f" If that machine or run is gone, remove {lock_path} by hand (a lock held from another host "
                "cannot be proven stale from here)."
            )
            if remote
            else ""
        )
        if policy == "fail":
            raise PipelineError(
                f"{out} is being written by another run ({who}; lock {lock_path}). Wait for it to finish or stop it, "
                f"or rerun with --on-locked wait (or {ON_LOCKED_ENV}=wait) to wait for it.{gone}"
            ) from None
        say(f"waiting for {out}: another run holds it ({who}; lock {lock_path}); --on-locked fail stops instead.{gone}")
        lock.acquire(timeout=-1, poll_interval=0.2)
        before = None  # released normally while we waited
    try:
        if before is not None and before.get("pid") != os.getpid():
            say(f"took over the lock of {out} left by a run that is gone ({_describe(before, lock_path, None)})")
        _write_holder(lock_path, stage)
        yield lock_path
    finally:
        try:
            sibling(lock_path, HOLDER).unlink(missing_ok=True)
        finally:
            lock.release()


LOCK_RECORD = re.compile(r"[0-9]{1,10}\n[^\n]{1,255}\n([0-9]{1,80}\n)?")  # filelock's: pid, host, start time
FRESH_LOCK_S = 10.0  # a run creates its lock file empty and writes its record at once; an older empty one is not ours


def check_lock_files(lock_path: Path, out: str | Path) -> None:
    """Refuse a ``<out>.stage-lock`` or ``<out>.stage-lock.holder`` that this pipeline did not write: a lock file
    is a regular file holding filelock's record (or empty for a moment), a holder file our JSON record. filelock
    takes a malformed lock for a stale one and deletes it, so a user's file of that name is refused here first."""
    holder = sibling(lock_path, HOLDER)
    fix = "move it away (or set the output param to another folder) and rerun; nothing was computed"
    for path, ours in ((lock_path, _is_lock_record), (holder, _is_holder_record)):
        if not (path.exists() or path.is_symlink()):
            continue
        if path.is_symlink() or not path.is_file():
            raise PipelineError(f"{path} (the lock beside the output {out}) is not a regular file; {fix}")
        if not ours(path):
            raise PipelineError(
                f"{path} is in the place of the lock beside the output {out} but was not written by this pipeline "
                f"(its content is not a lock record); it is not removed; {fix}"
            )


def _is_lock_record(path: Path) -> bool:
    try:
        if path.stat().st_size > MAX_LOCK_BYTES:
            return False
        content = path.read_bytes()
        if not content:  # a run between creating its lock and writing its record
            return time.time() - path.stat().st_mtime < FRESH_LOCK_S
        return LOCK_RECORD.fullmatch(content.decode("ascii")) is not None
    except (OSError, UnicodeDecodeError):
        return False


def _is_holder_record(path: Path) -> bool:
    data = json_file_or_none(path, MAX_HOLDER_BYTES)
    return isinstance(data, dict) and set(data) == HOLDER_KEYS and isinstance(data.get("pid"), int)


def _write_holder(lock_path: Path, stage: str) -> None:
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": started,
        "stage": stage,
        "command": " ".join(sys.argv)[:500],
    }
    path = sibling(lock_path, HOLDER)
    path.unlink(missing_ok=True)  # a killed run's record (checked to be one by check_lock_files): we hold the lock
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # exclusive: never over a file of another
    with os.fdopen(fd, "wb") as f:
        f.write((json.dumps(holder, sort_keys=True) + "\n").encode())


def _say(message: str) -> None:
    print(f"[outputs] {message}", file=sys.stderr, flush=True)
