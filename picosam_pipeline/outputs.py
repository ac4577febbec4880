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

1. **Only its own files** (:func:`check_target` and :func:`picosam_pipeline.written_paths.check_stage_path`, before
   any work). The output folder ``out`` and every folder the stage fills (``writes``) are refused when they are
   part of the project (the working directory or above it, a file system root, the project's own files and code
   folders, a folder holding ``.git``, ``dvc.yaml`` or ``params.yaml``), when ``out`` equals, contains or lies
   inside one of the stage's inputs, when it is a file or a link, when it is or overlaps a path the config gives
   another stage (``evaluate.int8_out_dir`` = ``evaluate.out_dir``, ``teacher.stores_dir`` inside
   ``prepare.out_dir``) or lies inside another stage's output found on disk, and when it holds anything this stage
   did not write. A stage recognises its own folder by the marker every stage leaves there,
   ``config.resolved.json``: its sections are the params sections the stage reads and its ``_output`` record names
   the stage, the param and the path (written first into the unfinished folder, so a killed run's leftovers are
   recognised too); the entries it may hold are the stage's ``names`` (glob patterns; ``*/`` = any folder).
2. **One run at a time** (:mod:`picosam_pipeline.output_lock`): an exclusive lock ``<out>.stage-lock`` beside the
   output while the stage runs; a second run waits or stops naming the holder.
3. **Whole or nothing** (:func:`publish`). The stage writes into ``<out>.partial``; at the end the previous output
   is renamed aside (``<out>.replaced``), the new one renamed into place, the old one removed. A kill at any moment
   leaves the previous complete output or none at ``out`` (between the two renames the next run puts the previous
   one back), never a mix. Leftovers (``.partial``, ``.replaced``) are removed or put back by the next run only when
   their marker shows they are this stage's output; anything else in their place is refused. An interrupted or
   failed run removes its own.
4. **Clear OS errors** (:func:`os_error_message`): a full disk, a permission error or a read-only file system
   anywhere in the run becomes one paragraph naming the path, what was being written, for a full disk the space
   needed and free, and what happened to the partial work (removed, or kept for the rerun to resume). The folders
   a stage writes besides its output (``runtime.metrics_dir``, train's state) are checked for writability up front.

Files written outside such a folder (``metrics/<stage>.json``, checkpoints) go through :func:`atomic_write_bytes`
or their own write-then-rename.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from picosam_pipeline.errors import PipelineError
from picosam_pipeline.output_lock import output_lock
from picosam_pipeline.written_paths import (
    MARKER,
    OWNER_KEY,
    Owner,
    absolute,
    check_stage_path,
    project_refusal,
    read_marker,
    related,
    sibling,
)

if TYPE_CHECKING:
    from picosam_pipeline.config import Config

REPORT_FILE = "report.json"  # a stage's details, beside its outputs (reports.write_report; a DVC output, not a metric)
OWN_FILES = (MARKER, REPORT_FILE)  # in every stage's folder: the marker and the stage's details
PARTIAL, REPLACED = ".partial", ".replaced"


# --------------------------------------------------------------------------------------------------
# 1. only its own files


def is_own_folder(folder: Path, owner: Owner, sections: Sequence[str]) -> bool:
    """Whether ``folder``'s marker names ``owner`` (stage, param, path) and the sections the stage reads."""
    marker = read_marker(folder)
    return marker is not None and set(marker) - {OWNER_KEY} == set(sections) and owner.wrote(marker)


def foreign_entries(folder: Path, owner: Owner, sections: Sequence[str], names: Sequence[str]) -> list[str]:
    """Entries of ``folder`` that ``owner``'s stage (reading ``sections``) did not write ([] for a folder of its
    own)."""
    entries = sorted(folder.iterdir())
    if not entries:
        return []
    if not is_own_folder(folder, owner, sections):
        return [p.name for p in entries]  # no marker of this stage and path: nothing in it is ours
    return [p.name for p in entries if p.name not in OWN_FILES and not any(_matches(p, pattern) for pattern in names)]


def _matches(path: Path, pattern: str) -> bool:
    if pattern.endswith("/"):
        return path.is_dir() and fnmatch.fnmatchcase(path.name, pattern[:-1])
    return fnmatch.fnmatchcase(path.name, pattern)


def check_target(
    owner: Owner,
    out: str | Path,
    inputs: Mapping[str, str | Path],
    *,
    sections: Sequence[str] | None,
    names: Sequence[str] = (),
) -> None:
    """Refuse an output folder the stage must not replace (see the module docstring, point 1).

    ``sections=None`` leaves the contents check to the caller (the teacher's store recognises its own layout).
    """
    stage, key, out = owner.stage, owner.key, Path(out)
    where = absolute(out)
    fix = f"choose a folder of its own with --set {key}=PATH"
    reason = project_refusal(out)
    if reason:
        raise PipelineError(
            f"{key}: {str(out)!r} {reason}; stage {stage} replaces its output folder as a whole, so it refuses; {fix}"
        )
    for input_key, path in inputs.items():
        relation = None if path is None else related(where, absolute(Path(path)))
        if relation:
            raise PipelineError(
                f"{key}: {str(out)!r} {relation} the stage's input {input_key} ({str(path)!r}); "
                f"stage {stage} would replace what it reads; {fix}"
            )
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise PipelineError(f"{key}: {str(out)!r} is {'a link' if out.is_symlink() else 'a file'}, not a folder; {fix}")
    if sections is not None and out.is_dir():
        foreign = foreign_entries(out, owner, sections, names)
        if foreign:
            raise PipelineError(
                f"{key}: {str(out)!r} holds {foreign[:5]}{' ...' if len(foreign) > 5 else ''}, which stage {stage} "
                f"did not write there (its folders carry {MARKER} naming the stage, {key} and the path); it "
                f"replaces only its own output, so it refuses: move those files away or {fix}"
            )


# --------------------------------------------------------------------------------------------------
# 3. whole or nothing


def save_resolved(cfg: Config, out_dir: str | Path, sections: list[str], owner: Owner | None = None) -> Path:
    """Write the sections a stage read (resolved, defaults filled in) to ``out_dir/config.resolved.json``: the
    stage's marker (:data:`MARKER`), by which a later run recognises the folder as this stage's.

    ``owner``: who writes the folder, recorded as the marker's ``_output`` (:class:`StageOutput` adds it when the
    block ends, so a stage's own ``save_resolved`` calls need not pass it).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full = cfg.to_dict()
    marker = {s: full[s] for s in sections} | ({OWNER_KEY: owner.record()} if owner else {})
    text = json.dumps(marker, indent=2, sort_keys=True) + "\n"
    return atomic_write_bytes(out / MARKER, text.encode())


def stamp_owner(folder: Path, owner: Owner) -> None:
    """Add ``owner``'s ``_output`` record to ``folder``'s marker (the stage may have rewritten it since)."""
    marker = read_marker(folder)
    if marker is None:
        raise RuntimeError(f"{folder / MARKER} is missing or unreadable at the end of the stage")  # a bug, not input
    if marker.get(OWNER_KEY) != owner.record():
        text = json.dumps(marker | {OWNER_KEY: owner.record()}, indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(folder / MARKER, text.encode())


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


def recover(out: Path, ours: Callable[[Path], bool]) -> None:
    """Undo a publish killed between its two renames: put the previous output back, or drop the replaced one.
    ``<out>.replaced`` is touched only when ``ours`` recognises it as the stage's own output."""
    replaced = sibling(out, REPLACED)
    if replaced.exists() or replaced.is_symlink():
        _require_ours(replaced, ours, out)
        if out.exists():
            _remove(replaced)
        else:
            replaced.rename(out)


def publish(work: Path, out: Path, ours: Callable[[Path], bool]) -> None:
    """Move the finished ``work`` folder to ``out``, replacing the previous output (two renames, then a removal).
    A ``<out>.replaced`` left there is removed only when ``ours`` recognises it."""
    replaced = sibling(out, REPLACED)
    if replaced.exists() or replaced.is_symlink():
        _require_ours(replaced, ours, out)
        _remove(replaced)
    if out.exists():
        out.rename(replaced)
    work.rename(out)
    _remove(replaced)


def _require_ours(sibling_path: Path, ours: Callable[[Path], bool], out: Path) -> None:
    if sibling_path.is_symlink() or not sibling_path.is_dir() or not ours(sibling_path):
        raise PipelineError(
            f"{sibling_path} is in the place where {out}'s previous output is set aside, but it is not an output "
            f"this stage wrote, so it is neither removed nor renamed; move it away and rerun"
        )


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
        resolved: the config whose ``sections`` the marker records, when it is not ``cfg`` (evaluate-int8's: the
            evaluate section pointed at the INT8 model); ``cfg`` is the whole config every written path is checked
            against (:func:`picosam_pipeline.written_paths.check_stage_path`).
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
        resolved=None,
    ) -> None:
        self.cfg, self.stage, self.key, self.out = cfg, stage, key, Path(out)
        self.resolved = resolved or cfg
        self.owner = Owner(stage, key, str(out))
        self.sections = None if sections is None else list(sections)
        self.inputs, self.names = dict(inputs), list(names)
        self.resumable, self.recognise = resumable, recognise
        self.writes = dict(writes or {})
        self.needed_bytes, self.what, self.keep_failed, self.resumes = needed_bytes, what, keep_failed, resumes
        self.work = sibling(self.out, PARTIAL)
        self._lock = None

    def __enter__(self) -> Path:
        check_target(self.owner, self.out, self.inputs, sections=self.sections, names=self.names)
        for key, folder in self.writes.items():
            if key != self.key:  # (the output's own parent, probed for its siblings, is checked with the output)
                check_stage_path(self.cfg, self.stage, key, folder, f"set {key} to a folder of its own")
        check_stage_path(self.cfg, self.stage, self.key, self.out, f"set {self.key} to a folder of its own")
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

    def ours(self, path: Path) -> bool:
        """Whether the folder ``path`` (the output or one of its siblings) is this stage's own output."""
        if self.recognise is not None:
            return self.recognise(path)
        return is_own_folder(path, self.owner, self.sections) and not self._foreign_names(path)

    def _prepare(self) -> None:
        # Under the lock: what another run left is looked at again, and a killed publish is undone.
        recover(self.out, self.ours)
        check_target(self.owner, self.out, {}, sections=self.sections, names=self.names)
        if self.resumable:
            self.check_own(self.out)
            self.check_own(self.work)
            return  # the stage opens, resumes or discards the unfinished folder itself
        if self.work.exists() or self.work.is_symlink():
            empty = self.work.is_dir() and not self.work.is_symlink() and not any(self.work.iterdir())
            if not empty and (self.work.is_symlink() or not self.work.is_dir() or not self.ours(self.work)):
                raise PipelineError(
                    f"{self.key}: {self.work} exists and was not started by stage {self.stage} for {self.out} (no "
                    f"{MARKER} of its own there); it is not removed: move it away, the stage builds its output there"
                )
            _remove(self.work)  # an earlier run's unfinished output (or an empty folder): this stage does not resume
        if self.needed_bytes:
            check_space(self.out.parent, self.needed_bytes, self.key, self.stage, self.what)
        self.work.mkdir(parents=True)
        # The marker first: a killed run's leftover is recognised as this stage's.
        save_resolved(self.resolved, self.work, self.sections, owner=self.owner)

    def _foreign_names(self, folder: Path) -> list[str]:
        """Entries of ``folder`` whose names this stage does not write."""
        return [
            p.name for p in folder.iterdir() if p.name not in OWN_FILES and not any(_matches(p, n) for n in self.names)
        ]

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc is None:
                try:
                    if not self.resumable:
                        stamp_owner(self.work, self.owner)
                    if not self.resumable or self.work.exists():
                        publish(self.work, self.out, self.ours)
                    return False
                except OSError as err:
                    exc = err
                    with contextlib.suppress(OSError):
                        recover(
                            self.out, self.ours
                        )  # failed between its renames: the previous output goes back in place
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
