"""Checkpoint files that load without executing code: a flat dict of tensors plus a JSON string.

A checkpoint is written with ``torch.save`` as ``{"format": FORMAT, "meta": "<json>", "tensors": {name: Tensor}}``
and read with ``torch.load(weights_only=True)``, whose unpickler accepts only tensors and plain containers
(no arbitrary classes, so a shared checkpoint cannot run code). It is the layout of a safetensors file (flat
named tensors + a JSON header), which is not installed here. Two kinds, told apart by ``meta["kind"]``:

* ``student`` (``data/train/student.pt``): the trained weights, tensors named as the student's state dict
  (``encoder_stage1.0.weight`` ...), and meta ``{student, input_size, normalization, step, config, provenance,
  ...}``; :func:`load_student` rebuilds the module. ``provenance`` (``picosam_pipeline/provenance.py``): the
  teachers and their weights (random: a smoke test), the dataset, the recipe and its size.
* ``train_state`` (``data/train/checkpoint.pt``): everything a killed run needs to carry on bit-identically
  (weights, optimizer moments, RNG states, data position, loss log); written and read by ``trainer.py``.

Files appear atomically (written beside the target, then renamed), so a run killed while saving leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from picosam_pipeline.errors import PipelineError, is_weights_only_refusal, refused_checkpoint
from picosam_pipeline.provenance import Provenance, student_provenance
from picosam_pipeline.untrusted import load_json_bounded, require_regular_file, safe_text

FORMAT = "picosam-checkpoint/1"
# Bounds on a checkpoint's untrusted meta: a train_state's (loss log aside, kept in tensors) is a few KB.
MAX_META_CHARS = 1 << 20
MAX_INPUT_SIZE = 1024


def save_checkpoint(path: str | Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` (moved to CPU, made contiguous) and JSON-serialisable ``meta`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "meta": json.dumps(meta, sort_keys=True),
        "tensors": {name: t.detach().cpu().contiguous() for name, t in tensors.items()},
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(payload, tmp)
    except RuntimeError as err:  # torch's zip writer reports a full disk as "file write failed", not as an OSError
        tmp.unlink(missing_ok=True)
        size = sum(t.numel() * t.element_size() for t in payload["tensors"].values())
        if shutil.disk_usage(path.parent).free < size:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, kind: str | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(tensors on CPU, meta)``.

    Raises:
        PipelineError: missing file, not a checkpoint of this format (e.g. a pickled module or a SAM2
            checkpoint), or a checkpoint of another ``kind`` than the one asked for.
    """
    path = Path(path)
    if not path.exists():
        raise PipelineError(
            f"checkpoint {str(path)!r} does not exist; run the train stage (`picosam-pipeline run-stage train`) first"
        )
    require_regular_file(path, f"checkpoint {str(path)!r}")
    _check_archive(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or zip errors depending on the damage
        if is_weights_only_refusal(err):
            raise refused_checkpoint(
                path,
                err,
                "Pass a checkpoint written by the train stage (`picosam-pipeline "
                "run-stage train`, or `dvc pull` the team's), which holds tensors only",
            ) from None
        raise PipelineError(
            f"checkpoint {str(path)!r} cannot be read as a weights-only torch file ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}); pass a checkpoint written by the train stage"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise PipelineError(
            f"checkpoint {str(path)!r} is not a {FORMAT} file (found {found!r}); "
            "pass a checkpoint written by the train stage"
        )
    tensors, meta = _checked_payload(path, payload)
    if kind is not None and meta.get("kind") != kind:
        raise PipelineError(
            f"checkpoint {str(path)!r} holds a {_shown(meta.get('kind'))}, expected a {kind!r} checkpoint "
            f"({'data/train/student.pt' if kind == 'student' else 'data/train/checkpoint.pt'})"
        )
    return tensors, meta


def _shown(value: Any) -> str:
    """An untrusted value as it appears in a message (repr, printable, cut short)."""
    return safe_text(repr(value), 80)


def _check_archive(path: Path) -> None:
    """``path`` is a zip archive (what torch.save writes) whose records are stored uncompressed and fit in the file.

    Checked before torch reads it: torch's reader inflates deflated records and the legacy (non-zip) format
    allocates storages of the sizes the file declares, so either could claim far more memory than the file holds.
    """
    what = f"checkpoint {str(path)!r}"
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise PipelineError(
            f"{what} is not a torch.save zip archive ({safe_text(str(err))}); pass a checkpoint written by the "
            "train stage"
        ) from None
    bad = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED or r.file_size > size]
    if bad or sum(r.file_size for r in records) > size:
        raise PipelineError(
            f"{what} declares records larger than the file itself or compressed ({safe_text(bad[:3])}), which "
            "torch.save never writes; pass a checkpoint written by the train stage"
        )


def _checked_payload(path: Path, payload: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The checkpoint's tensors and meta after checking their types: a dict of tensors and a JSON object of
    bounded size and nesting (the meta is untrusted text, read like any other)."""
    what = f"checkpoint {str(path)!r}"
    tensors, text = payload.get("tensors"), payload.get("meta")
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in tensors.items()
    ):
        raise PipelineError(
            f"{what}: 'tensors' is not a dict of named tensors; pass a checkpoint written by the train stage"
        )
    if not isinstance(text, str) or len(text) > MAX_META_CHARS:
        found = f"{len(text):,} characters" if isinstance(text, str) else type(text).__name__
        raise PipelineError(
            f"{what}: 'meta' must be a JSON text of at most {MAX_META_CHARS:,} characters, found {found}; pass a "
            "checkpoint written by the train stage"
        )
    meta = load_json_bounded(text, f"the meta of {what}")
    if not isinstance(meta, dict):
        raise PipelineError(
            f"{what}: 'meta' is a JSON {type(meta).__name__}, not an object; pass a checkpoint written by the "
            "train stage"
        )
    return tensors, meta


def _check_student_meta(path: Path, meta: dict[str, Any]) -> None:
    """The meta fields a student's users read: its architecture and input size (and crop, when recorded)."""
    from picosam_pipeline.train.students import STUDENTS

    what = f"checkpoint {str(path)!r}"
    student, size = meta.get("student"), meta.get("input_size")
    if not isinstance(student, str) or student not in STUDENTS:
        raise PipelineError(f"{what}: meta 'student' is {_shown(student)}, expected one of {', '.join(STUDENTS)}")
    if type(size) is not int or not 1 <= size <= MAX_INPUT_SIZE:
        raise PipelineError(
            f"{what}: meta 'input_size' is {_shown(size)}, expected a whole number in [1, {MAX_INPUT_SIZE}]"
        )
    if meta.get("crop") is not None and not isinstance(meta["crop"], dict):
        raise PipelineError(f"{what}: meta 'crop' is {_shown(meta['crop'])}, expected an object")


def save_student(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write a student's state dict (parameters and BN running statistics) as a ``student`` checkpoint.

    ``meta`` must name the ``student`` (``picosam2`` | ``picosam3``) and its ``input_size``; ``kind`` is added, and
    ``provenance`` unless given (:func:`meta_provenance`).
    """
    missing = {"student", "input_size"} - set(meta)
    if missing:
        raise ValueError(f"student checkpoint meta needs {sorted(missing)}")
    if "provenance" not in meta:
        meta = {**meta, "provenance": meta_provenance(meta, Path(path).parent)}
    return save_checkpoint(path, dict(model.state_dict()), {**meta, "kind": "student"})


def meta_provenance(meta: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The provenance of a student trained with ``meta["config"]`` (the train section): the pack it names
    (``config.shards``) and the train stage's marker in ``out_dir`` (:func:`provenance.student_provenance`);
    not recorded without a config."""
    config = meta.get("config")
    shards = config.get("shards") if isinstance(config, dict) else None
    if not isinstance(shards, str):
        return Provenance().as_dict()
    return student_provenance(shards, out_dir)


def checkpoint_provenance(path: str | Path) -> dict[str, Any]:
    """The ``provenance`` a student checkpoint records (:meth:`Provenance.as_dict`; not recorded when missing)."""
    _, meta = load_checkpoint(path, kind="student")
    return Provenance.from_dict(meta.get("provenance")).as_dict()


def load_student(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained student from a ``student`` checkpoint: ``(module on CPU in eval mode, meta)``.

    The module maps ImageNet-normalised float32 (B, 3, S, S) to (B, 1, S, S) logits, ``S = meta["input_size"]``.
    A checkpoint with NaN / infinite weights (a diverged run) is refused.
    """
    from picosam_pipeline.train.students import build_student

    tensors, meta = load_checkpoint(path, kind="student")
    _check_student_meta(Path(path), meta)
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:  # a diverged run: such a student outputs NaN logits, i.e. empty masks everywhere, without a word
        raise PipelineError(
            f"checkpoint {str(path)!r} holds NaN or infinite weights in {len(bad)} of {len(tensors)} "
            f"tensors ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): the training run that "
            "wrote it diverged. Retrain (e.g. with a lower train.lr) and use the new student.pt"
        )
    model = build_student(meta["student"])
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise PipelineError(
            f"checkpoint {str(path)!r} does not match a {meta['student']} student ({str(err).splitlines()[0]}); "
            "it was written by another version of the model"
        ) from None
    return model.eval(), meta


# --------------------------------------------------------------------------------------------------
# optimizer state as flat tensors + JSON


def flatten_optimizer(
    state_dict: dict[str, Any], prefix: str = "optimizer."
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into flat tensors ``{prefix<param>.<name>: Tensor}`` and a JSON-able rest.

    The rest is ``{"param_groups": [...], "scalar_state": {param: {name: value}}}``; AdamW's per-parameter
    state is all tensors (``step``, ``exp_avg``, ``exp_avg_sq``), so its ``scalar_state`` is empty.
    """
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in state_dict["state"].items():
        for name, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalar_state": scalars}


def unflatten_optimizer(tensors: dict[str, Tensor], rest: dict[str, Any], prefix: str = "optimizer.") -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer`: a dict ``optimizer.load_state_dict`` accepts."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, name = key[len(prefix) :].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for index, values in rest["scalar_state"].items():
        state.setdefault(int(index), {}).update(values)
    # JSON turned tuples (AdamW's betas) into lists; give them back their type so the groups compare equal
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}
