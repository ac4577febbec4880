"""Teacher adapters: SAM2 / SAM2.1 (``sam2`` package) and SAM3 (optional ``sam3`` package) behind one interface.

A :class:`Teacher` encodes an image once (:meth:`~Teacher.set_image`) and then decodes every instance prompt
of that image -- boxes for the PicoSAM3 ROI convention, positive points for PicoSAM2 -- returning one
:class:`TeacherOutput`: soft logits over the WHOLE image plus a confidence per instance. Mapping those logits
into each instance's crop frame is :mod:`geometry`'s job, so a teacher knows nothing about crops.

Weights only ever come from ``torch.load(weights_only=True)`` (a checkpoint that needs arbitrary unpickling
is refused before any of its code runs), every parameter must be covered by the checkpoint, and the file's
sha256 goes into :attr:`Teacher.metadata`. Without a checkpoint the build refuses unless
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from picosam_pipeline.config import SAM2_MODELS, TeacherConfig
from picosam_pipeline.data.checksums import sha256_file as file_sha256  # teacher metadata and verify-logits use this name
from picosam_pipeline.device import Runtime
from picosam_pipeline.errors import PipelineError, is_weights_only_refusal, refused_checkpoint, require_extra

SAM3_PROB_EPS = 1e-7  # PicoSAM3's clamp before probability -> logit: |logit| <= 16.12


class RandomWeightsWarning(UserWarning):
    """The teacher runs with random weights: its logits are noise, fine for smoke tests only."""


@dataclass
class TeacherOutput:
    """Teacher predictions for the N prompts of one image.

    Attributes:
        image_logits: ``(N, h, w)`` float32 mask logits covering the whole image ``[0, W] x [0, H]``,
            stretched (cell ``(r, c)`` centred at ``((c + .5) W/w, (r + .5) H/h)``). SAM2: ``h = w = 256``
            low-resolution logits clamped to +-32; SAM3's geometric path: ``h, w = H, W``, within +-16.12; SAM3's
            instance path: ``h = w = 288``, clamped to +-32.
        confidence: ``(N,)`` float32 in [0, 1]: the predicted IoU of the kept mask (SAM2, SAM3 instance path), or
            the kept query's score (SAM3 geometric path).
    """

    image_logits: torch.Tensor
    confidence: torch.Tensor


class Teacher(Protocol):
    """What the teacher stage needs from a segmentation teacher."""

    metadata: dict[str, Any]  # model, config, checkpoint + sha256 or "random weights", prompt settings

    def set_image(self, rgb: np.ndarray) -> None:
        """Encode one ``(H, W, 3)`` uint8 RGB image; every later prediction refers to it."""

    def predict_boxes(self, boxes_xyxy: np.ndarray) -> TeacherOutput:
        """Decode ``(N, 4)`` float ``(x1, y1, x2, y2)`` image-pixel boxes, one instance each."""

    def predict_points(self, points_xy: np.ndarray) -> TeacherOutput:
        """Decode ``(N, 2)`` float ``(x, y)`` image-pixel positive points, one instance each."""

    def predict_images(self, images: list[torch.Tensor], prompts: list[np.ndarray], prompt: str,
                       segments: list[list[int]] | None = None) -> list[TeacherOutput]:
        """The teacher pass's call: ``images`` (``(H_i, W_i, 3)`` uint8 RGB tensors, on any device) with their
        prompts (``(N_i, 4)`` boxes for ``prompt="roi"``, ``(N_i, 2)`` points for ``"point"``) -> one output per
        image, its tensors on the teacher's device. Batched teachers encode several images per forward.
        ``segments[i]``: lengths of runs of image ``i``'s prompts (one per store shard) decoded in calls of their
        own where the results must not depend on how the pass groups shards (see ``Sam2Teacher``)."""


class OneImageAtATime:
    """:meth:`Teacher.predict_images` for teachers that hold one encoded image at a time (ONNX Runtime, the SAM2
    predictor): ``set_image``, then one prompt call per segment of the image."""

    def predict_images(self, images: list[torch.Tensor], prompts: list[np.ndarray], prompt: str,
                       segments: list[list[int]] | None = None) -> list[TeacherOutput]:
        outputs = []
        for i, (image, image_prompts) in enumerate(zip(images, prompts)):
            self.set_image(image.cpu().numpy())
            parts = []
            for start, stop in _runs(segments[i] if segments else [len(image_prompts)]):
                chunk = image_prompts[start:stop]
                parts.append(self.predict_boxes(chunk) if prompt == "roi" else self.predict_points(chunk))
            outputs.append(parts[0] if len(parts) == 1 else
                           TeacherOutput(torch.cat([p.image_logits for p in parts]), torch.cat([p.confidence for p in parts])))
        return outputs


def _runs(lengths: list[int]) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive runs of the given lengths."""
    ends = np.cumsum(lengths).tolist()
    return list(zip([0] + ends[:-1], ends))


def build_teacher(cfg: TeacherConfig, runtime: Runtime) -> Teacher:
    """Build the teacher named by ``cfg.model`` on ``runtime.device``.

    Raises:
        PipelineError: checkpoint missing (and random weights not allowed), unsafe or not matching the
            model; ``sam3`` asked for without the optional ``sam3`` package.
    """
    if cfg.model == "sam3":
        from picosam_pipeline.teacher.sam3_teacher import build_sam3_teacher

        return build_sam3_teacher(cfg, runtime)
    if cfg.backend == "onnxruntime":
        from picosam_pipeline.teacher.sam2_onnx import OrtSam2Teacher

        return OrtSam2Teacher.build(cfg, runtime)
    from picosam_pipeline.teacher.sam2_batched import Sam2Teacher

    return Sam2Teacher.build(cfg, runtime)


# --------------------------------------------------------------------------------------------------
# SAM2 / SAM2.1


_SAM2_SIZES = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}


def sam2_config_name(model: str) -> str:
    """The ``sam2`` package's Hydra config for a model name: ``sam2.1_hiera_tiny`` -> ``configs/sam2.1/sam2.1_hiera_t.yaml``."""
    if model not in SAM2_MODELS:
        raise ValueError(f"not a SAM2 model name: {model!r}; expected one of {SAM2_MODELS}")
    family, _, size = model.partition("_hiera_")
    return f"configs/{family}/{family}_hiera_{_SAM2_SIZES[size]}.yaml"


def build_sam2_model(cfg: TeacherConfig, runtime: Runtime) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The SAM2 / SAM2.1 model of ``cfg.model`` on ``runtime.device`` in eval mode, plus its metadata.

    Raises:
        PipelineError: the teacher extra is missing, or the checkpoint is missing (and random weights are not
            allowed), unsafe or not matching the model.
    """
    require_extra("teacher", f"teacher.model={cfg.model}")
    from sam2.build_sam import build_sam2

    config_name = sam2_config_name(cfg.model)
    checkpoint = _checkpoint_or_none(cfg, runtime.seed)  # fail fast, before the model is built
    state_dict = load_state_dict_safely(checkpoint) if checkpoint else None
    # build_sam2 loads nothing when ckpt_path is None; the checked state dict is loaded below.
    # apply_postprocessing=True (its default, as PicoSAM used it): with multimask_output=False SAM2 falls
    # back to the best of its 3 masks when the single mask is unstable.
    model = _seeded_build(lambda: build_sam2(config_name, ckpt_path=None, device="cpu", mode="eval"), runtime.seed)
    if checkpoint is None:
        weights = _random_weights(model, runtime.seed)
    else:
        weights = _load_checked(model, state_dict, set(model.state_dict()), checkpoint, cfg.model)
    model.to(runtime.device)
    metadata = {
        "teacher": "sam2",
        "backend": "torch",
        "model": cfg.model,
        "config": config_name,
        "package": f"sam2 {_version('sam2')}",
        **weights,
        "prompt": cfg.prompt,
        "multimask_output": cfg.multimask_output,
        "mask_selection": "highest predicted IoU" if cfg.multimask_output else "single mask (stability fallback on)",
        "logits": "256x256 low-res mask logits over the whole image (stretched), clamped to +-32",
        "autocast": _autocast_name(runtime),
    }
    return model, metadata


class Sam2PredictorTeacher(OneImageAtATime):
    """SAM2 / SAM2.1 through ``sam2.SAM2ImagePredictor``: the reference the stage's own path is checked against.

    The stage runs :class:`picosam_pipeline.teacher.sam2_batched.Sam2Teacher` (several images per encoder
    forward, everything on the device); this class is the predictor API, one image at a time, kept as the
    independent implementation that the parity tests and ``bench/teacher_gpu.py`` compare it with.

    One image-encoder pass per image; the N prompts of the image go through the prompt encoder and mask
    decoder in batched predictor calls of up to ``decode_batch`` prompts (the predictor batches ``(N, 4)``
    boxes and ``(N, 1, 2)`` points by repeating the image embedding per prompt: ~17 MB of fp32 activations per
    prompt, measured, so an LVIS image with hundreds of instances is split rather than decoded in one call).
    With ``multimask_output`` the decoder proposes 3 masks per prompt and the one with the highest predicted
    IoU is kept (as PicoSAM2 and SAM2's own zero-shot evaluation do); its predicted IoU is the confidence.
    The logits are the decoder's 256x256 low-resolution masks, not the masks upsampled to image size.

    On CPUs without bf16 hardware (AVX2 only, as on the CI machine) bf16 autocast is ~30x slower than
    fp32; ``runtime.precision=auto`` already keeps fp32 on CPU.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        runtime: Runtime,
        multimask_output: bool,
        metadata: dict[str, Any],
        decode_batch: int = 32,
    ):
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.model = model
        self.predictor = SAM2ImagePredictor(model)
        self.runtime = runtime
        self.multimask_output = multimask_output
        self.metadata = metadata
        self.decode_batch = decode_batch

    @classmethod
    def build(cls, cfg: TeacherConfig, runtime: Runtime) -> "Sam2PredictorTeacher":
        model, metadata = build_sam2_model(cfg, runtime)
        return cls(model, runtime, cfg.multimask_output, {**metadata, "path": "SAM2ImagePredictor, one image at a time"})

    def set_image(self, rgb: np.ndarray) -> None:
        _check_rgb(rgb)
        with torch.inference_mode(), self.runtime.autocast():
            self.predictor.set_image(rgb)

    def predict_boxes(self, boxes_xyxy: np.ndarray) -> TeacherOutput:
        boxes = _as_rows(boxes_xyxy, 4, "boxes_xyxy")
        return self._decode(len(boxes), box=boxes)

    def predict_points(self, points_xy: np.ndarray) -> TeacherOutput:
        points = _as_rows(points_xy, 2, "points_xy")
        # One single-point prompt per instance: coords (N, 1, 2), label 1 = foreground.
        return self._decode(len(points), point_coords=points[:, None, :], point_labels=np.ones((len(points), 1)))

    def _decode(self, n: int, **prompts: np.ndarray) -> TeacherOutput:
        """Decode ``n`` prompts (arrays with a leading prompt axis) in chunks; keep the best mask of each."""
        logits, confidence = [torch.zeros(0, 256, 256)], [torch.zeros(0)]
        for start in range(0, n, self.decode_batch):
            chunk = {k: v[start : start + self.decode_batch] for k, v in prompts.items()}
            m = len(next(iter(chunk.values())))
            with torch.inference_mode(), self.runtime.autocast():
                # The first output (masks upsampled to image size) is unused; it costs ~1 ms per prompt.
                _, iou, low_res = self.predictor.predict(**chunk, multimask_output=self.multimask_output, return_logits=True)
            # predict() squeezes the prompt axis away for a single prompt: restore (m, masks, ...) shapes.
            iou = torch.from_numpy(iou).float().reshape(m, -1)
            low_res = torch.from_numpy(low_res).float().reshape(m, iou.shape[1], *low_res.shape[-2:])
            best = iou.argmax(dim=1)
            rows = torch.arange(m)
            logits.append(low_res[rows, best])
            confidence.append(iou[rows, best])
        return TeacherOutput(torch.cat(logits), torch.cat(confidence))


# --------------------------------------------------------------------------------------------------
# SAM3 (optional extra; the teachers are in sam3_teacher.py)


def probabilities_to_logits(prob: torch.Tensor, eps: float = SAM3_PROB_EPS) -> torch.Tensor:
    """Mask probabilities in [0, 1] -> float32 logits ``log(p / (1 - p))``, ``p`` clamped to ``[eps, 1 - eps]``.

    SAM3's processor returns sigmoid probabilities (named ``masks_logits``); PicoSAM3 stores them as logits
    after this clamp, so saturated pixels map to +-16.12 instead of +-inf. Computed in float64: in float32
    ``1 - 1e-7`` rounds to ``1 - 1.19e-7`` and the positive bound would come out as 15.94, not 16.12.
    """
    p = prob.double().clamp(eps, 1.0 - eps)
    return (torch.log(p) - torch.log1p(-p)).float()


# --------------------------------------------------------------------------------------------------
# weights


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
            raise PipelineError(f"checkpoint {str(path)!r} is not a readable torch checkpoint ({str(err)[:200]}); "
                                "fetch it again") from None
        raise refused_checkpoint(path, err, "Use the official file (`picosam-pipeline fetch MODEL` checks its sha256), "
                                 "or have its maker re-save only the tensors (torch.save(model.state_dict(), path))") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise PipelineError(f"checkpoint {str(path)!r} is not a readable torch checkpoint ({err}); fetch it again") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise PipelineError(
            f"checkpoint {str(path)!r} holds no state dict (expected {{name: tensor}} or {{'model': {{name: tensor}}}})"
        )
    return obj


def _checkpoint_or_none(cfg: TeacherConfig, seed: int) -> Path | None:
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
    warnings.warn(f"{where}: teacher {cfg.model} runs with RANDOM weights (seed {seed}); its logits are noise",
                  RandomWeightsWarning, stacklevel=4)
    return None


def _random_weights(model: torch.nn.Module, seed: int) -> dict[str, Any]:
    """Metadata for a model left with its seeded random init (the digest lets workers compare weights)."""
    return {"weights": "random weights", "seed": seed, "weights_sha256": state_dict_sha256(model),
            "checkpoint": None, "checkpoint_sha256": None}


def _load_checked(
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
    return {"weights": "checkpoint", "checkpoint": str(path), "checkpoint_sha256": file_sha256(path)}


def _seeded_build(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """Build a model on the CPU with its random init drawn from ``seed``, leaving the global RNG untouched.

    The init runs on the CPU generator whatever ``runtime.device`` is, so every process (any worker, any
    GPU) builds bit-identical random weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# --------------------------------------------------------------------------------------------------
# helpers


def _check_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        got = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {got}")


def _as_rows(values: np.ndarray, width: int, name: str) -> np.ndarray:
    rows = np.asarray(values, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != width:
        raise ValueError(f"{name} must have shape (N, {width}), got {rows.shape}")
    return rows


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _autocast_name(runtime: Runtime) -> str:
    return "fp32" if runtime.autocast_dtype is None else str(runtime.autocast_dtype).removeprefix("torch.")
