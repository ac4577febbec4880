"""The one rule for every path a run writes: it may replace only what this stage or command wrote.

A stage writes its output folder (``<section>.out_dir``, a teacher pass's ``<teacher.stores_dir>/NAME.zarr``), the
folders it fills (``runtime.metrics_dir``, ``train.state_dir``) and the siblings of its output (``.partial``,
``.replaced``, ``.stage-lock``); a command writes the files its options name (``predict --out``,
``score-predictions --json-out``, ``params-schema -o``). None of them may land on:

* the project (the working directory or a folder above it), a file system root, the project's own files
  (:data:`PROJECT_FILES` at the project root, anything inside ``.git`` or ``.dvc``) or its code folders;
* an input of the run;
* another stage's output: any path the config gives another stage (:func:`stage_paths`, so a clash is refused
  before either stage has run), and any folder that carries another stage's marker (a stage's output found on
  disk, whatever the params say now);
* an existing file or folder this stage or command did not write. A stage recognises its folder by its marker,
  ``config.resolved.json``, whose ``_output`` record names the stage, the param and the path
  (:class:`Owner`): the folder of ``evaluate`` is not the folder of ``evaluate-int8`` although both read the
  ``evaluate`` section. A command recognises its file by what it writes into it (a PNG text chunk, a JSON key).

:mod:`picosam_pipeline.outputs` applies this to the stages' folders and their siblings; the commands call
:func:`check_output_file`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from picosam_pipeline.errors import PipelineError
from picosam_pipeline.untrusted import json_file_or_none

if TYPE_CHECKING:
    from picosam_pipeline.config import Config

MARKER = "config.resolved.json"  # every stage's resolved config; its _output record names the stage that wrote it
OWNER_KEY = "_output"  # the marker's record of who wrote the folder: {"stage", "key", "path"}
MAX_MARKER_BYTES = 1 << 20  # a resolved config is a few KB: a bigger "marker" is not ours and is not parsed
# Files and folders of the project itself, at its root: never an output, never replaced.
PROJECT_FILES = (
    ".git",
    ".dvc",
    ".dvcignore",
    ".gitignore",
    "dvc.yaml",
    "dvc.lock",
    "params.yaml",
    "params.schema.json",
    "pyproject.toml",
    "Makefile",
    "README.md",
    "LICENSE",
)
CODE_FOLDERS = ("picosam_pipeline", "stages", "tests", "scripts", "bench", "docs", "requirements", ".ci")


@dataclass(frozen=True)
class Owner:
    """Who writes a folder: the stage, the param naming the folder, and the folder as the param gives it."""

    stage: str
    key: str
    path: str

    def record(self) -> dict[str, str]:
        """The marker's ``_output`` record."""
        return {"stage": self.stage, "key": self.key, "path": self.path}

    def wrote(self, marker: dict[str, Any] | None) -> bool:
        """Whether a marker (a folder's resolved config) was written by this stage for this param and path: its
        ``_output`` record names them; a marker of an earlier version, without the record, when the param it
        records is this path (so evaluate-int8's folder is not evaluate's: there the param is ``int8_out_dir``)."""
        if marker is None:
            return False
        record = marker.get(OWNER_KEY)
        if record is None:
            section, _, name = self.key.partition(".")
            value = marker.get(section, {}).get(name) if isinstance(marker.get(section), dict) else None
            return isinstance(value, str) and absolute(value) == absolute(self.path)
        if not isinstance(record, dict) or record.get("stage") != self.stage or record.get("key") != self.key:
            return False
        return isinstance(record.get("path"), str) and absolute(record["path"]) == absolute(self.path)


def sibling(out: str | Path, suffix: str) -> Path:
    """``<out><suffix>`` beside ``out`` (``data/shards`` -> ``data/shards.partial``)."""
    out = Path(out)
    if out.name in ("", ".", ".."):  # "." or "..": name the folder itself
        out = Path(os.path.abspath(out))
    return out.with_name(out.name + suffix)


def read_marker(folder: Path) -> dict[str, Any] | None:
    """``folder/config.resolved.json`` as a dict, or None when missing, not a regular file, too big or not JSON."""
    path = folder / MARKER
    data = None if path.is_symlink() else json_file_or_none(path, MAX_MARKER_BYTES)
    return data if isinstance(data, dict) else None


def marker_owner(folder: Path) -> dict[str, Any] | None:
    """The ``_output`` record of ``folder``'s marker (who wrote it), or None."""
    marker = read_marker(folder)
    record = marker.get(OWNER_KEY) if marker else None
    return record if isinstance(record, dict) else None


def absolute(path: str | Path) -> Path:
    """Absolute, with symlinks resolved as far as the path exists."""
    return Path(os.path.abspath(path)).resolve()


def related(a: Path, b: Path) -> str | None:
    """How absolute path ``a`` stands to ``b``: "is", "contains", "lies inside", or None."""
    if a == b:
        return "is"
    if a in b.parents:
        return "contains"
    if b in a.parents:
        return "lies inside"
    return None


# --------------------------------------------------------------------------------------------------
# the project


def project_refusal(path: str | Path, root: Path | None = None) -> str | None:
    """Why ``path`` (to be written) is part of the project or a file system root, or None when it is not.

    ``root``: the project folder (default: the working directory).
    """
    root = absolute(root or Path.cwd())
    where = absolute(path)
    if where == Path(where.anchor):
        return "is a file system root"
    if where == root or where in root.parents:
        return f"is the project folder{' or above it' if where != root else ''} ({root})"
    if where.parent == root and where.name in PROJECT_FILES + CODE_FOLDERS:
        return f"is the project's own {where.name}"
    for name in (".git", ".dvc", *CODE_FOLDERS):
        if root / name in where.parents:
            return f"lies inside the project's {name}/"
    if where.is_dir():
        found = [name for name in (".git", "dvc.yaml", "params.yaml") if (where / name).exists()]
        if found:
            return f"holds {', '.join(found)}, so it is a project, not an output"
    return None


def marked_ancestor(path: str | Path, owner: Owner | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The nearest folder above ``path`` that carries a stage's marker written by another stage than ``owner``
    (a stage's output found on disk), with that marker's record; None when there is none."""
    for folder in absolute(path).parents:
        record = marker_owner(folder)
        if record is not None and not (owner and record.get("stage") == owner.stage):
            return folder, record
    return None


# --------------------------------------------------------------------------------------------------
# the stages' paths, from the whole config


@dataclass(frozen=True)
class WrittenPath:
    """A path a stage writes: the param naming it, the stage, and the path."""

    key: str
    stage: str
    path: str


def stage_paths(cfg: Config) -> list[WrittenPath]:
    """Every path the config's stages write: outputs, prediction files, filled folders (metrics, train's state,
    the teacher's stores and exported teachers)."""
    e, t = cfg.evaluate, cfg.teacher
    paths = [
        WrittenPath("sample.out_dir", "sample", cfg.sample.out_dir),
        WrittenPath("prepare.out_dir", "prepare", cfg.prepare.out_dir),
        WrittenPath("teacher.stores_dir", "teacher-logits", t.stores_dir),
        WrittenPath("teacher.onnx_dir", "export-teacher", t.onnx_dir),
        WrittenPath("pack.out_dir", "pack", cfg.pack.out_dir),
        WrittenPath("train.out_dir", "train", cfg.train.out_dir),
        WrittenPath("train.state_dir", "train", cfg.train.resume_dir()),
        WrittenPath("evaluate.out_dir", "evaluate", e.out_dir),
        WrittenPath("evaluate.int8_out_dir", "evaluate-int8", e.int8_out_dir),
        WrittenPath("quantize.out_dir", "quantize", cfg.quantize.out_dir),
        WrittenPath("export.out_dir", "export", cfg.export.out_dir),
        WrittenPath("package.out_dir", "package", cfg.package.out_dir),
        WrittenPath("runtime.metrics_dir", "every stage", cfg.runtime.metrics_dir),
    ]
    if e.write_predictions:
        paths.append(WrittenPath("evaluate.write_predictions", "evaluate", e.write_predictions))
    for name in cfg.teachers:
        paths.append(
            WrittenPath(f"teachers.{name}", f"teacher-logits@{name}", str(Path(t.stores_dir) / f"{name}.zarr"))
        )
    return paths


def _writer(stage: str) -> str:
    return stage if stage == "every stage" else f"stage {stage}"


def _family(stage: str) -> str:
    return stage.split("@")[0]  # teacher-logits@sam2 writes inside teacher-logits' stores_dir


def check_stage_path(cfg: Config | None, stage: str, key: str, path: str | Path, fix: str) -> None:
    """Refuse ``path`` (param ``key`` of ``stage``) when it is part of the project, another stage's path in
    ``cfg`` (None: no config to compare with), or lies inside another stage's output found on disk. ``fix`` ends
    the message."""
    reason = project_refusal(path)
    if reason:
        raise PipelineError(f"{key}: {str(path)!r} {reason}; stage {stage} never writes there; {fix}")
    where = absolute(path)
    for other in stage_paths(cfg) if cfg is not None else []:
        relation = related(where, absolute(other.path))
        if relation is None or other.key == key or _family(other.stage) == _family(stage):
            continue  # the stage's own paths may nest: a pass's store in the stores folder, predictions in its folder
        raise PipelineError(
            f"{key}: {str(path)!r} {relation} {other.key} ({other.path!r}), which {_writer(other.stage)} writes; "
            f"two stages never write the same place; {fix}"
        )
    found = marked_ancestor(path, Owner(stage, key, str(path)))
    if found:
        folder, record = found
        raise PipelineError(
            f"{key}: {str(path)!r} lies inside {folder}, the output of stage {record.get('stage')} "
            f"({record.get('key')}); stage {stage} never writes into another stage's output; {fix}"
        )


def check_predictions_file(write_predictions: str | None, out_dir: str) -> None:
    """Refuse ``evaluate.write_predictions`` outside ``evaluate.out_dir``: the evaluate stage writes only into its
    own folder, so the prediction files are part of its output (never params.yaml, an index, a user's file)."""
    if write_predictions and Path(out_dir) not in Path(write_predictions).parents:
        raise PipelineError(
            f"evaluate.write_predictions: {write_predictions!r} is not inside evaluate.out_dir ({out_dir!r}); the "
            "evaluate stage writes only into its own folder, so the prediction files are part of its output; set it "
            f"to a file name there, e.g. {str(Path(out_dir) / 'predictions.json')!r}"
        )


def check_config_paths(cfg: Config) -> None:
    """Every path the config's stages write, checked against the project and against each other (what each stage
    checks of its own paths when it starts, for all of them at once: ``picosam-pipeline check-params``)."""
    check_predictions_file(cfg.evaluate.write_predictions, cfg.evaluate.out_dir)
    for written in stage_paths(cfg):
        check_stage_path(cfg, written.stage, written.key, written.path, f"set {written.key} to a path of its own")


# --------------------------------------------------------------------------------------------------
# the commands' files


def check_output_file(
    command: str,
    option: str,
    path: str | Path,
    *,
    inputs: Mapping[str, str | Path | None] = {},  # noqa: B006 (read only)
    recognise: Callable[[Path], bool],
    what: str,
    project_file: str | None = None,
) -> None:
    """Refuse a file a command is about to write at ``path`` (its option ``option``) when it is part of the
    project, equals an input (same path or same file through a link), lies inside a stage's output, is not a
    plain file, or exists and ``recognise`` does not call it a ``what`` this command wrote.

    ``project_file``: the one project file the command owns (params-schema's ``params.schema.json``).
    """
    fix = f"give {option} a new file name"
    own = project_file is not None and absolute(path) == absolute(Path.cwd() / project_file)
    reason = None if own else project_refusal(path)
    if reason:
        raise PipelineError(f"{option}: {str(path)!r} {reason}; {command} never writes there; {fix}")
    target = Path(path)
    for name, source in inputs.items():
        if source is not None and _same_file(target, Path(source)):
            raise PipelineError(f"{option}: {str(path)!r} is the input {name}; {command} would overwrite it; {fix}")
    found = marked_ancestor(target)
    if found:
        folder, record = found
        raise PipelineError(
            f"{option}: {str(path)!r} lies inside {folder}, the output of stage {record.get('stage')}; {command} "
            f"never writes into a stage's output; {fix}"
        )
    if target.is_symlink() or (target.exists() and not target.is_file()):
        kind = "a link" if target.is_symlink() else "a folder" if target.is_dir() else "not a regular file"
        raise PipelineError(f"{option}: {str(path)!r} is {kind}; {command} writes a plain file only; {fix}")
    if target.exists() and not recognise(target):
        raise PipelineError(
            f"{option}: {str(path)!r} exists and is not a {what} written by {command}, so it is not replaced; "
            f"move it away or {fix}"
        )


def _same_file(a: Path, b: Path) -> bool:
    if absolute(a) == absolute(b):
        return True
    try:
        return os.path.samefile(a, b)  # a hard link or another spelling of the same file
    except OSError:
        return False


def json_written_by(path: Path, command: str, max_bytes: int = 64 << 20) -> bool:
    """Whether ``path`` is a JSON object this project's ``command`` wrote (its ``written_by`` key)."""
    data = json_file_or_none(path, max_bytes)
    return isinstance(data, dict) and data.get("written_by") == f"picosam-pipeline {command}"


def is_params_schema(path: Path) -> bool:
    """Whether ``path`` is a params JSON Schema that params-schema wrote (a draft 2020-12 schema of the sections)."""
    data = json_file_or_none(path, 16 << 20)
    return (
        isinstance(data, dict)
        and data.get("$schema") == "https://json-schema.org/draft/2020-12/schema"
        and isinstance(data.get("$defs"), dict)
        and "TeacherConfig" in data["$defs"]
    )
