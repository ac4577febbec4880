"""Stage outputs: a stage touches only its own files, one run at a time, and its output appears whole or not at all.

Every stage's ``run`` writes its output folder through a :class:`StageOutput`: entering it gives the folder to
write (``<out>.partial``), leaving it publishes that folder as ``<out>``::

    def output(cfg):
        return StageOutput(cfg, "export", "export.out_dir", cfg.export.out_dir, sections=["export"], names=NAMES,
                           inputs={"export.quantized_dir": cfg.export.quantized_dir})

    def run(cfg, runtime):
        with output(cfg) as work:  # <out_dir>.partial: write everything here
            ...

The teacher's store, which a rerun resumes, uses the same class in its resumable mode (``resumable=``): the
unfinished folder is kept on failure, left for the stage to open or resume, and recognised as the stage's own by
a test of its layout (``recognise=``) instead of the marker.

``metrics/<stage>.json`` is written by the body, so just before the folder is published: a kill between the two
leaves the new metrics beside the previous output until the rerun writes both again.

What it guarantees, in order:

1. **Only its own files** (:func:`check_target`, before any work). The output folder ``out`` is refused when it is
   the project (the working directory, a folder above it, or one holding ``.git``, ``dvc.yaml`` or
   ``params.yaml``), when it equals, contains or lies inside one of the stage's inputs, when it is a file, and when
   it holds anything this stage did not write. A stage recognises its own folder by the marker every stage leaves
   there, ``config.resolved.json`` whose top-level keys are exactly the params sections the stage reads (written
   first into the unfinished folder, so a killed run's leftovers are recognised too), and the entries it may hold
   by the stage's ``names`` (glob patterns; ``*/`` = any folder).
2. **One run at a time** (:func:`output_lock`). An exclusive lock ``<out>.stage-lock`` beside the output, taken
   with filelock's :class:`~filelock.SoftFileLock`: an exclusively created marker file recording the holder's pid,
   host and process start time (exclusive creation works on local disks and NFS), which a peer on the same host
   takes over once that process is gone (a killed run) and never while it runs (the start time guards against a
   recycled pid). A second run waits for it (the default) or stops at once naming the holder:
   ``run-stage --on-locked fail`` or ``PICOSAM_ON_LOCKED=fail`` (for ``dvc repro``). A holder on another host
   cannot be proven dead from here: the message says which file to remove when that machine is gone.
3. **Whole or nothing** (:func:`publish`). The stage writes into ``<out>.partial``; at the end the previous output
   is renamed aside (``<out>.replaced``), the new one renamed into place, the old one removed. A kill at any moment
   leaves the previous complete output or none at ``out`` (between the two renames the next run puts the previous
   one back), never a mix. Leftovers are removed by the next run; an interrupted or failed run removes its own.
4. **Clear OS errors** (:func:`os_error_message`): a full disk, a permission error or a read-only file system
   anywhere in the run becomes one paragraph naming the path, what was being written, for a full disk the space
   needed and free, and what happened to the partial work (removed, or kept for the rerun to resume). The folders
   a stage writes besides its output (``runtime.metrics_dir``, train's state) are checked for writability up front.

Files written outside such a folder (``metrics/<stage>.json``, checkpoints) go through :func:`atomic_write_bytes`
or their own write-then-rename.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fnmatch
import json
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from picosam_pipeline.errors import PipelineError

if TYPE_CHECKING:
    from picosam_pipeline.config import Config

MARKER = "config.resolved.json"  # every stage's save_resolved file; its sections name the stage that wrote it
REPORT_FILE = "report.json"  # a stage's details, beside its outputs (reports.write_report; a DVC output, not a metric)
OWN_FILES = (MARKER, REPORT_FILE)  # in every stage's folder: the marker and the stage's details
PARTIAL, REPLACED, LOCK = ".partial", ".replaced", ".stage-lock"
HOLDER = ".holder"  # <lock>.holder: JSON naming the run that holds the lock (pid, host, start time, stage)
ON_LOCKED_ENV = "PICOSAM_ON_LOCKED"
ON_LOCKED = ("wait", "fail")
PROJECT_FILES = (".git", "dvc.yaml", "params.yaml")  # a folder holding one of these is a project, never an output

_policy: dict[str, str | None] = {"on_locked": None}


def set_on_locked(value: str | None) -> None:
    """What a run does when another run holds its outputs' lock: ``wait`` or ``fail`` (None: $PICOSAM_ON_LOCKED or
    wait)."""
    if value is not None and value not in ON_LOCKED:
        raise PipelineError(f"on-locked: {value!r} is not one of {', '.join(ON_LOCKED)}")
    _policy["on_locked"] = value


def on_locked() -> str:
    value = _policy["on_locked"] or os.environ.get(ON_LOCKED_ENV) or "wait"
    if value not in ON_LOCKED:
        raise PipelineError(
            f"{ON_LOCKED_ENV}={value!r} is not one of {', '.join(ON_LOCKED)}; unset it or set wait or fail"
        )
    return value


def sibling(out: str | Path, suffix: str) -> Path:
    """``<out><suffix>`` beside ``out`` (``data/shards`` -> ``data/shards.partial``)."""
    out = Path(out)
    if out.name in ("", ".", ".."):  # "." or "..": name the folder itself
        out = Path(os.path.abspath(out))
    return out.with_name(out.name + suffix)


# --------------------------------------------------------------------------------------------------
# 1. only its own files


def marker_sections(folder: Path) -> set[str] | None:
    """The params sections named by ``folder/config.resolved.json``, or None when there is no readable marker."""
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return set(data) if isinstance(data, dict) else None


def foreign_entries(folder: Path, sections: Sequence[str], names: Sequence[str]) -> list[str]:
    """Entries of ``folder`` that the stage reading ``sections`` did not write ([] for a folder of its own)."""
    entries = sorted(folder.iterdir())
    if not entries:
        return []
    if marker_sections(folder) != set(sections):
        return [p.name for p in entries]  # no marker of this stage: nothing in it is ours
    return [p.name for p in entries if p.name not in OWN_FILES and not any(_matches(p, pattern) for pattern in names)]


def _matches(path: Path, pattern: str) -> bool:
    if pattern.endswith("/"):
        return path.is_dir() and fnmatch.fnmatchcase(path.name, pattern[:-1])
    return fnmatch.fnmatchcase(path.name, pattern)


def check_target(
    stage: str,
    key: str,
    out: str | Path,
    inputs: Mapping[str, str | Path],
    *,
    sections: Sequence[str] | None,
    names: Sequence[str] = (),
) -> None:
    """Refuse an output folder the stage must not replace (see the module docstring, point 1).

    ``sections=None`` leaves the contents check to the caller (the teacher's store recognises its own layout).
    """
    out = Path(out)
    where = _abs(out)
    fix = f"choose a folder of its own with --set {key}=PATH"
    cwd = Path.cwd().resolve()
    if where == cwd or where in cwd.parents:
        raise PipelineError(
            f"{key}: {str(out)!r} is the project folder{' or above it' if where != cwd else ''} "
            f"({cwd}); stage {stage} replaces its output folder as a whole, so it refuses; {fix}"
        )
    found = [name for name in PROJECT_FILES if (where / name).exists()]
    if found:
        raise PipelineError(
            f"{key}: {str(out)!r} holds {', '.join(found)}, so it is a project, not an output folder; "
            f"stage {stage} refuses to replace it; {fix}"
        )
    for input_key, path in inputs.items():
        if path is None:
            continue
        source = _abs(Path(path))
        relation = (
            "is"
            if source == where
            else "contains"
            if where in source.parents
            else "lies inside"
            if source in where.parents
            else None
        )
        if relation:
            raise PipelineError(
                f"{key}: {str(out)!r} {relation} the stage's input {input_key} ({str(path)!r}); "
                f"stage {stage} would replace what it reads; {fix}"
            )
    if out.exists() and not out.is_dir():
        raise PipelineError(f"{key}: {str(out)!r} is a file, not a folder; {fix}")
    if sections is not None and out.is_dir():
        foreign = foreign_entries(out, sections, names)
        if foreign:
            raise PipelineError(
                f"{key}: {str(out)!r} holds {foreign[:5]}{' ...' if len(foreign) > 5 else ''}, which stage {stage} "
                f"did not write (its folders carry {MARKER} with the sections {sorted(sections)}); it replaces only "
                f"its own output, so it refuses: move those files away or {fix}"
            )


def _abs(path: Path) -> Path:
    """Absolute and with symlinks resolved as far as the path exists (``strict=False``)."""
    return Path(os.path.abspath(path)).resolve()


# --------------------------------------------------------------------------------------------------
# 2. one run at a time


def lock_holder(lock: Path) -> dict[str, Any] | None:
    """The holder recorded beside ``lock`` (pid, host, started, stage, command), or None."""
    try:
        return json.loads(sibling(lock, HOLDER).read_text())
    except (OSError, ValueError):
        return None


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


def _write_holder(lock_path: Path, stage: str) -> None:
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": started,
        "stage": stage,
        "command": " ".join(sys.argv)[:500],
    }
    atomic_write_bytes(sibling(lock_path, HOLDER), (json.dumps(holder, sort_keys=True) + "\n").encode())


# --------------------------------------------------------------------------------------------------
# 3. whole or nothing


def save_resolved(cfg: Config, out_dir: str | Path, sections: list[str]) -> Path:
    """Write the sections a stage read (resolved, defaults filled in) to ``out_dir/config.resolved.json``: the
    stage's marker (:data:`MARKER`), by which a later run recognises the folder as this stage's."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full = cfg.to_dict()
    text = json.dumps({s: full[s] for s in sections}, indent=2, sort_keys=True) + "\n"
    return atomic_write_bytes(out / MARKER, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and a rename: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def recover(out: Path) -> None:
    """Undo a publish killed between its two renames: put the previous output back, or drop the replaced one."""
    replaced = sibling(out, REPLACED)
    if replaced.exists():
        if out.exists():
            _remove(replaced)
        else:
            replaced.rename(out)


def publish(work: Path, out: Path) -> None:
    """Move the finished ``work`` folder to ``out``, replacing the previous output (two renames, then a removal)."""
    replaced = sibling(out, REPLACED)
    _remove(replaced)
    if out.exists():
        out.rename(replaced)
    work.rename(out)
    _remove(replaced)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when missing)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


# --------------------------------------------------------------------------------------------------
# 4. clear OS errors

_OS_ERRORS = {
    errno.ENOSPC: "the file system is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted",
    errno.EROFS: "the file system is read-only",
}


def is_write_error(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in _OS_ERRORS


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent)."""
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def os_error_message(
    err: OSError,
    stage: str,
    key: str,
    what: str,
    out: Path,
    *,
    partial: str,
    needed_bytes: int | None = None,
    written_bytes: int | None = None,
    where: Path | None = None,
) -> str:
    """One paragraph for a full disk / permission / read-only error while ``stage`` wrote ``what`` (to the file the
    error names, else to ``where``, else to ``out``)."""
    path = Path(err.filename) if getattr(err, "filename", None) else (where or out)
    reason = _OS_ERRORS[err.errno]
    text = f"stage {stage} could not write {path} ({what}): {reason} ({err.strerror or os.strerror(err.errno)})."
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(path)
        previous = tree_bytes(out) if out.exists() else 0
        need = (
            f"about {_mb(needed_bytes)}"
            if needed_bytes
            else f"more than the {_mb(written_bytes)} it had written when the disk filled"
            if written_bytes
            else "more space than is free"
        )
        if previous:
            need += f" (the previous output {out}, kept until the new one is complete, holds {_mb(previous)})"
        text += f" The output needs {need}; {_mb(free) if free is not None else 'an unknown amount'} free there."
        fix = f"free some space there, or set {key} to a folder on a disk with room, and rerun"
    else:
        fix = (
            f"make {path.parent if path not in (out, where) else path} writable for this user "
            "(or remount it read-write), "
            f"or set {key} to a writable folder, and rerun"
        )
    return f"{text} {partial} Nothing else was changed; {fix}."


def probe_writable(folder: str | Path, key: str, stage: str) -> None:
    """Create ``folder`` and a file in it, so a read-only or unwritable folder stops the stage before any work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        if not is_write_error(err):
            raise
        raise PipelineError(
            os_error_message(
                err, stage, key, "a test file, checked before any work", folder, partial="Nothing was computed."
            )
        ) from None


def check_space(folder: Path, needed_bytes: int, key: str, stage: str, what: str) -> None:
    """Stop before any work when the file system of ``folder`` has less than ``needed_bytes`` free."""
    free = free_bytes(folder)
    if free is not None and free < needed_bytes:
        raise PipelineError(
            f"stage {stage} needs about {_mb(needed_bytes)} for {what} in {folder}, but only {_mb(free)} are free "
            f"there; nothing was computed. Free some space, or set {key} to a folder on a disk with room, and rerun."
        )


# --------------------------------------------------------------------------------------------------
# the whole protocol


class StageOutput:
    """``with StageOutput(...) as work:`` write the stage's output folder into ``work``; see the module docstring.

    Args:
        cfg: the stage's config (the marker is its ``sections``, what ``save_resolved`` writes).
        stage, key: the stage's name and the param naming its output folder (for messages).
        out: the output folder.
        sections: the params sections the stage reads (the marker's keys).
        inputs: ``{param: path}`` the stage reads; the output may not equal, contain or lie inside one.
        names: glob patterns of the entries the stage writes into its folder (``*/``: any folder).
        writes: ``{param: folder}`` written besides the output (metrics, resumable state): checked writable up front.
        needed_bytes: estimated size of the output, checked against the free space up front when given.
        what: what the output is, for messages.
        keep_failed: on a PipelineError, keep the unfinished folder for inspection (the package stage: the
            converter's log); the next run removes it.
        resumes: what the stage keeps elsewhere for a rerun to resume from (train's checkpoint), for messages.
        resumable: the resumable mode (the teacher's store), with the sentence saying what a failed run keeps: the
            unfinished folder is neither removed nor created here (the stage opens, resumes or discards it), no marker
            is written first, and a failed run keeps it for the rerun; on success it is published when it exists
            (the stage may have finished ``out`` in place instead).
        recognise: ``recognise(path)`` tells whether an existing ``out`` or unfinished folder is the stage's own
            (instead of the marker: ``sections=None``); any other is refused, never replaced or deleted.
    """

    def __init__(
        self,
        cfg,
        stage: str,
        key: str,
        out: str | Path,
        *,
        sections: Sequence[str] | None,
        inputs: Mapping[str, str | Path | None],
        names: Sequence[str] = (),
        writes: Mapping[str, str | Path] | None = None,
        needed_bytes: int | None = None,
        what: str = "its output",
        keep_failed: bool = False,
        resumes: str | None = None,
        resumable: str | None = None,
        recognise: Callable[[Path], bool] | None = None,
    ) -> None:
        self.cfg, self.stage, self.key, self.out = cfg, stage, key, Path(out)
        self.sections = None if sections is None else list(sections)
        self.inputs, self.names = dict(inputs), list(names)
        self.resumable, self.recognise = resumable, recognise
        self.writes = dict(writes or {})
        self.needed_bytes, self.what, self.keep_failed, self.resumes = needed_bytes, what, keep_failed, resumes
        self.work = sibling(self.out, PARTIAL)
        self._lock = None

    def __enter__(self) -> Path:
        check_target(self.stage, self.key, self.out, self.inputs, sections=self.sections, names=self.names)
        self.check_own(self.out)
        self.check_own(self.work)
        for key, folder in self.writes.items():
            probe_writable(folder, key, self.stage)
        try:
            self._lock = output_lock(self.out, self.stage)
            self._lock.__enter__()
        except OSError as err:
            if not is_write_error(err):
                raise
            raise PipelineError(
                os_error_message(
                    err, self.stage, self.key, "the lock file of its output", self.out, partial="Nothing was computed."
                )
            ) from None
        try:
            self._prepare()
        except BaseException as err:
            self._release()
            if is_write_error(err):
                raise PipelineError(
                    os_error_message(
                        err,
                        self.stage,
                        self.key,
                        f"the unfinished {self.what}",
                        self.out,
                        partial="Nothing was computed.",
                    )
                ) from None
            raise
        return self.work

    def check_own(self, path: Path) -> None:
        """Refuse an existing ``path`` (the output or its unfinished folder) that ``recognise`` does not call the
        stage's own (no-op without ``recognise``): the stage never replaces or deletes what it did not write."""
        if self.recognise is not None and (path.exists() or path.is_symlink()) and not self.recognise(path):
            raise PipelineError(
                f"{self.key}: {path} exists and is not a {self.what}, so stage {self.stage} does not replace it; move "
                f"it away or set {self.key} to a new path"
            )

    def _prepare(self) -> None:
        # Under the lock: what another run left is looked at again, and a killed publish is undone.
        recover(self.out)
        check_target(self.stage, self.key, self.out, {}, sections=self.sections, names=self.names)
        if self.resumable:
            self.check_own(self.out)
            self.check_own(self.work)
            return  # the stage opens, resumes or discards the unfinished folder itself
        if self.work.exists() or self.work.is_symlink():
            if not self.work.is_dir() or self._foreign_in_work():
                raise PipelineError(
                    f"{self.key}: {self.work} exists and was not started by stage {self.stage}; move "
                    "it away: the stage builds its output there"
                )
            _remove(self.work)  # an earlier run's unfinished output: this stage does not resume it
        if self.needed_bytes:
            check_space(self.out.parent, self.needed_bytes, self.key, self.stage, self.what)
        self.work.mkdir(parents=True)
        save_resolved(self.cfg, self.work, self.sections)  # the marker first: a killed run's leftover is recognised

    def _foreign_in_work(self) -> bool:
        """Whether the unfinished folder holds what this stage would not write (its marker may not be there yet)."""
        found = marker_sections(self.work)
        if found is not None and found != set(self.sections):
            return True
        return any(p.name not in OWN_FILES and not any(_matches(p, n) for n in self.names) for p in self.work.iterdir())

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc is None:
                try:
                    if not self.resumable or self.work.exists():
                        publish(self.work, self.out)
                    return False
                except OSError as err:
                    exc = err
                    with contextlib.suppress(OSError):
                        recover(self.out)  # failed between its renames: the previous output goes back in place
                    if not is_write_error(err):
                        raise
            if self.resumable:  # the unfinished folder stays for the rerun to resume
                if is_write_error(exc):
                    raise self._write_error(exc, self.resumable) from None
                return False
            written = tree_bytes(self.work) if self.work.exists() else None
            if self.keep_failed and isinstance(exc, PipelineError) and self.work.exists():
                raise PipelineError(
                    f"{exc} (the unfinished output is kept in {self.work} to look at; {self.out} is as "
                    "it was, and the next run removes it)"
                ) from None
            try:
                _remove(self.work)  # this stage does not resume: an unfinished output is never left behind
            except OSError:
                pass
            if is_write_error(exc):
                partial = f"The unfinished output {self.work} was removed and {self.out} is as it was before this run; "
                partial += self.resumes or f"{self.stage} does not resume, the rerun starts over."
                raise self._write_error(exc, partial, written_bytes=written, where=self.work) from None
            return False
        finally:
            self._release()

    def _write_error(self, err: OSError, partial: str, **where) -> PipelineError:
        """A full disk / permission / read-only error while writing the output, as one paragraph (``partial``: what
        became of the unfinished work)."""
        message = os_error_message(
            err,
            self.stage,
            self.key,
            f"its {self.what}",
            self.out,
            needed_bytes=self.needed_bytes,
            partial=partial,
            **where,
        )
        return PipelineError(message)

    def _release(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.__exit__(None, None, None)


def _say(message: str) -> None:
    print(f"[outputs] {message}", file=sys.stderr, flush=True)
