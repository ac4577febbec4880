"""How every teacher gets its weights: a checked checkpoint, or seeded random weights for smoke tests.

Weights only ever come from ``torch.load(weights_only=True)`` (a checkpoint that needs arbitrary unpickling
is refused before any of its code runs), every parameter must be covered by the checkpoint, and the file's
sha256 goes into the teacher's metadata. Without a checkpoint the build refuses unless
``teacher.allow_random_weights``: then the real architecture runs with random weights drawn from
``runtime.seed`` on the CPU generator, so every worker process builds bit-identical weights (their digest is
``metadata["weights_sha256"]``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import pickle
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from picosam_pipeline.config import TeacherConfig
from picosam_pipeline.data.checksums import sha256_file
from picosam_pipeline.device import Runtime
from picosam_pipeline.errors import PipelineError, is_weights_only_refusal, refused_checkpoint
from picosam_pipeline.teacher.base import RandomWeightsWarning


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Hex sha256 over a model's state dict (names, dtypes, shapes and bytes): equal iff the weights are equal."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def load_state_dict_safely(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint with ``torch.load(weights_only=True)``: tensors and plain containers only, no code runs.

    Accepts a bare state dict or SAM2/SAM3's ``{"model": state_dict, ...}``.

    Raises:
        PipelineError: the file needs arbitrary unpickling (refused), is not a torch checkpoint, or holds no
            state dict.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not is_weights_only_refusal(err):  # damaged pickle data ("invalid load key"), not a refusal
            raise PipelineError(
                f"checkpoint {str(path)!r} is not a readable torch checkpoint ({str(err)[:200]}); fetch it again"
            ) from None
        raise refused_checkpoint(
            path,
            err,
            "Use the official file (`picosam-pipeline fetch MODEL` checks its sha256), "
            "or have its maker re-save only the tensors (torch.save(model.state_dict(), path))",
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise PipelineError(
            f"checkpoint {str(path)!r} is not a readable torch checkpoint ({err}); fetch it again"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise PipelineError(
            f"checkpoint {str(path)!r} holds no state dict (expected {{name: tensor}} or {{'model': {{name: tensor}}}})"
        )
    return obj


def checkpoint_or_none(cfg: TeacherConfig, seed: int) -> Path | None:
    """The checkpoint file to load, or None for random weights (only with ``allow_random_weights``, warned)."""
    path = Path(cfg.checkpoint) if cfg.checkpoint else None
    if path is not None and path.is_file():
        return path
    where = f"teacher.checkpoint {str(path)!r} does not exist" if path else "teacher.checkpoint is not set"
    if not cfg.allow_random_weights:
        raise PipelineError(
            f"{where}; download the weights with `picosam-pipeline fetch {cfg.model}` (or `dvc pull` them where the "
            "team tracks them, or point teacher.checkpoint at the file). Without them there is nothing to distil: "
            "teacher.allow_random_weights is off, as it must be outside smoke tests (random weights give noise logits)"
        )
    warnings.warn(
        f"{where}: teacher {cfg.model} runs with RANDOM weights (seed {seed}); its logits are noise",
        RandomWeightsWarning,
        stacklevel=4,
    )
    return None


def random_weights(model: torch.nn.Module, seed: int) -> dict[str, Any]:
    """Metadata for a model left with its seeded random init (the digest lets workers compare weights)."""
    return {
        "weights": "random weights",
        "seed": seed,
        "weights_sha256": state_dict_sha256(model),
        "checkpoint": None,
        "checkpoint_sha256": None,
    }


def load_checked(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], required_keys: set[str], path: Path, name: str
) -> dict[str, Any]:
    """Load ``state_dict`` into ``model`` after checking it covers ``required_keys`` and has nothing extra."""
    missing = sorted(required_keys - set(state_dict))
    unexpected = sorted(set(state_dict) - set(model.state_dict()))
    hint = f"is it the checkpoint for teacher.model={name}? Fetch it with `picosam-pipeline fetch {name}`"
    if missing or unexpected:
        raise PipelineError(
            f"checkpoint {str(path)!r} does not match {name}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}; {hint}"
        )
    try:
        model.load_state_dict(state_dict, strict=False)  # keys were checked above; this still checks shapes
    except RuntimeError as err:
        reason = str(err).splitlines()[-1].strip()  # e.g. "size mismatch for ...: copying a param with shape ..."
        raise PipelineError(f"checkpoint {str(path)!r} does not match {name}: {reason}; {hint}") from None
    return {"weights": "checkpoint", "checkpoint": str(path), "checkpoint_sha256": sha256_file(path)}


def seeded_build(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """Build a model on the CPU with its random init drawn from ``seed``, leaving the global RNG untouched.

    The init runs on the CPU generator whatever ``runtime.device`` is, so every process (any worker, any
    GPU) builds bit-identical random weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def package_version(package: str) -> str:
    """The installed version of ``package`` ("unknown" when it is not installed)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def autocast_name(runtime: Runtime) -> str:
    """The autocast dtype a teacher runs under, for its metadata ("fp32" without autocast)."""
    return "fp32" if runtime.autocast_dtype is None else str(runtime.autocast_dtype).removeprefix("torch.")
