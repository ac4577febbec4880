"""SAM2 / SAM2.1 teacher in ONNX Runtime: the image encoder and the prompt decoder as two ONNX files.

The split follows the predictor (``SAM2ImagePredictor``) exactly, so the two backends compute the same thing:

* **encoder.onnx**: ``forward_image`` + ``_prepare_backbone_features`` + ``no_mem_embed``, as ``set_image``
  does. Input ``image`` float32 ``(1, 3, 1024, 1024)``: the RGB image resized to 1024 x 1024 (stretched) and
  ImageNet-normalised on the host, with the predictor's own transforms. Outputs ``image_embed``
  ``(1, 256, 64, 64)``, ``high_res_0`` ``(1, 32, 256, 256)``, ``high_res_1`` ``(1, 64, 128, 128)``.
* **decoder.onnx**: prompt encoder + mask decoder for N prompts of one image (N dynamic), as ``predict`` does.
  Inputs the three feature maps, ``point_coords`` float32 ``(N, P, 2)`` in the 1024 x 1024 input frame and
  ``point_labels`` float32 ``(N, P)`` (1 = positive point; a box is two points labelled 2 and 3; the prompt
  encoder appends its padding point). Outputs ``low_res_logits`` float32 ``(N, M, 256, 256)`` clamped to +-32,
  as the predictor clamps them, and ``iou`` float32 ``(N, M)``; M = 3 with ``multimask_output``, else 1.

The files are exported once per (model, weights, exporter settings) into ``teacher.onnx_dir/<model>-<key>/``
with a manifest (``export.json``) that records their sha256; a later run checks the digests before it loads
them. ``picosam-pipeline export-teacher`` does the export explicitly; the teacher stage does it on first use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from picosam_pipeline.config import TeacherConfig
from picosam_pipeline.data.checksums import sha256_file
from picosam_pipeline.device import Runtime
from picosam_pipeline.errors import PipelineError, require_extra
from picosam_pipeline.teacher.base import OneImageAtATime, TeacherOutput, as_rows, check_rgb
from picosam_pipeline.teacher.sam2_predictor import build_sam2_model
from picosam_pipeline.teacher.weights import checkpoint_or_none, package_version
from picosam_pipeline.written_paths import check_stage_path

ENCODER_FILE, DECODER_FILE, MANIFEST_FILE = "encoder.onnx", "decoder.onnx", "export.json"
OPSET = 17  # the dynamo exporter needs onnxscript (not installed); the TorchScript exporter at opset 17 works
INPUT_SIZE = 1024  # SAM2's encoder input side
BB_FEAT_SIZES = ((256, 256), (128, 128), (64, 64))  # the predictor's _bb_feat_sizes for a 1024 input
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class _Encoder(torch.nn.Module):
    """``(1, 3, 1024, 1024)`` normalised image -> image_embed, high_res_0, high_res_1 (see module docstring)."""

    def __init__(self, sam2: torch.nn.Module):
        super().__init__()
        self.sam2 = sam2

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        backbone_out = self.sam2.forward_image(image)
        _, vision_feats, _, _ = self.sam2._prepare_backbone_features(backbone_out)
        if self.sam2.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.sam2.no_mem_embed
        feats = [feat.permute(1, 2, 0).reshape(1, -1, *size) for feat, size in zip(vision_feats, BB_FEAT_SIZES)]
        return feats[2], feats[0], feats[1]


class _Decoder(torch.nn.Module):
    """Features + ``(N, P, 2)`` points / ``(N, P)`` labels -> ``(N, M, 256, 256)`` clamped logits, ``(N, M)`` IoU."""

    def __init__(self, sam2: torch.nn.Module, multimask_output: bool):
        super().__init__()
        self.sam2 = sam2
        self.multimask_output = multimask_output

    def forward(self, image_embed, high_res_0, high_res_1, point_coords, point_labels):
        sparse, dense = self.sam2.sam_prompt_encoder(points=(point_coords, point_labels), boxes=None, masks=None)
        low_res, iou, _, _ = self.sam2.sam_mask_decoder(
            image_embeddings=image_embed,
            image_pe=self.sam2.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=self.multimask_output,
            repeat_image=True,  # one image, N prompts; for N = 1 repeating once is the identity
            high_res_features=[high_res_0, high_res_1],
        )
        return torch.clamp(low_res, -32.0, 32.0), iou


# --------------------------------------------------------------------------------------------------
# export and its cache


def export_settings(cfg: TeacherConfig, seed: int) -> dict[str, Any]:
    """What decides the ONNX files' contents: the model, its weights, the mask choice and the exporter."""
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else None
    weights = (
        f"checkpoint sha256 {sha256_file(checkpoint)}"
        if checkpoint is not None and checkpoint.is_file()
        else f"random weights, seed {seed}"
    )
    return {
        "model": cfg.model,
        "weights": weights,
        "multimask_output": cfg.multimask_output,
        "opset": OPSET,
        "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
        "torch": torch.__version__,
        "sam2": package_version("sam2"),
    }


def export_dir(cfg: TeacherConfig, seed: int) -> Path:
    """``teacher.onnx_dir/<model>-<first 16 hex of the settings' sha256>``."""
    key = hashlib.sha256(json.dumps(export_settings(cfg, seed), sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.onnx_dir) / f"{cfg.model}-{key}"


def export_teacher(cfg: TeacherConfig, runtime: Runtime) -> Path:
    """The folder holding this teacher's checked ONNX files, exporting them first when they are not there.

    The export runs on the CPU in fp32 whatever ``runtime`` says, is written to a temporary folder and renamed
    into place, so a crash leaves nothing half-written and concurrent workers end with one complete copy.
    """
    if cfg.model == "sam3":
        raise PipelineError(
            "teacher.backend=onnxruntime exports SAM2 / SAM2.1 models only; use teacher.backend=torch for sam3"
        )
    # The cache may not be the project, its files or inside a stage's output (written_paths.py); an export never
    # replaces a folder: it is renamed into place only where none is.
    check_stage_path(
        None, "export-teacher", "teacher.onnx_dir", cfg.onnx_dir, "set teacher.onnx_dir to a folder of its own"
    )
    target = export_dir(cfg, runtime.seed)
    if (target / MANIFEST_FILE).is_file():
        check_export(target)
        return target
    start = time.perf_counter()
    cpu = Runtime(device=torch.device("cpu"), autocast_dtype=None, seed=runtime.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings (window padding frozen for the fixed 1024 input)
        model, metadata = build_sam2_model(cfg, cpu)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        image = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoder = _Encoder(model).eval()
            torch.onnx.export(
                encoder,
                (image,),
                str(tmp / ENCODER_FILE),
                dynamo=False,
                opset_version=OPSET,
                input_names=["image"],
                output_names=["image_embed", "high_res_0", "high_res_1"],
            )
            feats = encoder(image)
            coords, labels = torch.rand(2, 3, 2) * INPUT_SIZE, torch.tensor([[2.0, 3.0, 1.0], [1.0, 1.0, 1.0]])
            torch.onnx.export(
                _Decoder(model, cfg.multimask_output).eval(),
                (*feats, coords, labels),
                str(tmp / DECODER_FILE),
                dynamo=False,
                opset_version=OPSET,
                input_names=["image_embed", "high_res_0", "high_res_1", "point_coords", "point_labels"],
                output_names=["low_res_logits", "iou"],
                dynamic_axes={
                    "point_coords": {0: "prompts", 1: "points"},
                    "point_labels": {0: "prompts", 1: "points"},
                    "low_res_logits": {0: "prompts"},
                    "iou": {0: "prompts"},
                },
            )
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PipelineError(
            f"exporting teacher {cfg.model} to ONNX failed ({type(err).__name__}: {str(err)[:300]}); "
            "run it with teacher.backend=torch, or report the error with your torch and sam2 versions"
        ) from None
    manifest = {
        "settings": export_settings(cfg, runtime.seed),
        "teacher_metadata": {k: v for k, v in metadata.items() if k != "autocast"},
        "files": {
            name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
            for name in (ENCODER_FILE, DECODER_FILE)
        },
        "seconds": round(time.perf_counter() - start, 1),
    }
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; teammates on a shared machine read the cache too
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished the same export first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    check_export(target)
    return target


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest (``export.json``) of an export folder, as written; :func:`check_export` also checks the files.

    Callers right after :func:`export_teacher` use this: it has checked the files already.
    """
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        manifest["files"].items()
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise PipelineError(
            f"{folder / MANIFEST_FILE} is missing or unreadable ({err!r}); delete {folder} and rerun "
            "`picosam-pipeline export-teacher` (or the teacher stage) to export again"
        ) from None
    return manifest


def check_export(folder: str | Path) -> dict[str, Any]:
    """The manifest of an export folder, after checking each ONNX file against the sha256 it records."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, entry in manifest["files"].items():
        path = folder / name
        digest = sha256_file(path) if path.is_file() else None
        if digest != entry["sha256"]:
            found = "missing" if digest is None else f"sha256 {digest[:16]}..."
            raise PipelineError(
                f"ONNX teacher file {path} does not match its recorded digest ({found}, recorded "
                f"{entry['sha256'][:16]}...): it was changed or damaged; delete {folder} and rerun "
                "`picosam-pipeline export-teacher` to export it again"
            )
    return manifest


# --------------------------------------------------------------------------------------------------
# the teacher


def session_providers(choice: str, runtime: Runtime) -> list[Any]:
    """onnxruntime providers for ``teacher.ort_provider``: ``auto`` takes CUDA when the stage runs on a GPU and
    the installed onnxruntime offers it, else the CPU; ``cpu`` / ``cuda`` / ``tensorrt`` ask for one explicitly."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    # "cuda" is the worker's first visible GPU (dask pins one per worker); "cuda:N" is GPU N
    device_id = (runtime.device.index or 0) if runtime.device.type == "cuda" else 0
    if choice == "auto":
        choice = "cuda" if runtime.device.type == "cuda" and PROVIDERS["cuda"] in available else "cpu"
    name = PROVIDERS[choice]
    if name not in available:
        raise PipelineError(
            f"teacher.ort_provider={choice} needs onnxruntime's {name}, but the installed onnxruntime "
            f"offers {available}; install the onnxruntime build with it (e.g. onnxruntime-gpu) or "
            "set teacher.ort_provider=auto"
        )
    if name == "CPUExecutionProvider":
        return [name]
    return [(name, {"device_id": device_id}), "CPUExecutionProvider"]


class OrtSam2Teacher(OneImageAtATime):
    """SAM2 / SAM2.1 through its two exported ONNX files (same :class:`Teacher` interface as the PyTorch one).

    One encoder run per image; the image's prompts in one decoder run of up to ``decode_batch`` prompts (the
    decoder repeats the image features per prompt, ~16 MB of activations each, so an LVIS image with hundreds of
    instances is split into runs, as the PyTorch teacher splits its predictor calls).
    """

    decode_batch = 32

    def __init__(self, folder: Path, providers: list[Any], threads: int, metadata: dict[str, Any]):
        import onnxruntime as ort
        from sam2.utils.transforms import SAM2Transforms

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # the encoder's harmless shape-merge warning on load
        self.encoder = ort.InferenceSession(str(folder / ENCODER_FILE), options, providers=providers)
        self.decoder = ort.InferenceSession(str(folder / DECODER_FILE), options, providers=providers)
        self.transforms = SAM2Transforms(resolution=INPUT_SIZE, mask_threshold=0.0)
        self.metadata = metadata
        self._features: dict[str, np.ndarray] | None = None
        self._size = (0, 0)  # (W, H)

    @classmethod
    def build(cls, cfg: TeacherConfig, runtime: Runtime) -> OrtSam2Teacher:
        require_extra("teacher", f"teacher.model={cfg.model}")  # the host transforms and the export use sam2
        checkpoint_or_none(cfg, runtime.seed)  # the missing-checkpoint error / random-weights warning, as in torch
        folder = export_teacher(cfg, runtime)  # refuses sam3; the files' digests are checked there
        manifest = read_manifest(folder)
        providers = session_providers(cfg.ort_provider, runtime)
        metadata = {
            **manifest["teacher_metadata"],
            "backend": "onnxruntime",
            "onnx": {"opset": OPSET, **{name: entry["sha256"] for name, entry in manifest["files"].items()}},
            "onnx_folder": str(folder),
            "ort_provider": providers[0] if isinstance(providers[0], str) else providers[0][0],
            "package": f"sam2 {package_version('sam2')}, onnxruntime {package_version('onnxruntime')}",
            "autocast": "fp32",
        }
        return cls(folder, providers, torch.get_num_threads(), metadata)

    def set_image(self, rgb: np.ndarray) -> None:
        check_rgb(rgb)
        image = self.transforms(rgb)[None].numpy()  # (1, 3, 1024, 1024) float32, normalised
        names = ("image_embed", "high_res_0", "high_res_1")
        self._features = dict(zip(names, self.encoder.run(list(names), {"image": image})))
        self._size = (rgb.shape[1], rgb.shape[0])

    def predict_boxes(self, boxes_xyxy: np.ndarray) -> TeacherOutput:
        boxes = as_rows(boxes_xyxy, 4, "boxes_xyxy")
        coords = boxes.reshape(-1, 2, 2)
        labels = np.tile(np.array([[2.0, 3.0]], dtype=np.float32), (len(boxes), 1))
        return self._decode(coords, labels)

    def predict_points(self, points_xy: np.ndarray) -> TeacherOutput:
        points = as_rows(points_xy, 2, "points_xy")
        return self._decode(points[:, None, :], np.ones((len(points), 1), dtype=np.float32))

    def _decode(self, coords_xy: np.ndarray, labels: np.ndarray) -> TeacherOutput:
        """``(N, P, 2)`` image-pixel points + ``(N, P)`` labels -> best-of-M logits and their predicted IoU."""
        if self._features is None:
            raise RuntimeError("set_image() must be called before predicting")
        if not len(coords_xy):
            return TeacherOutput(torch.zeros(0, 256, 256), torch.zeros(0))
        width, height = self._size
        scale = np.array([INPUT_SIZE / width, INPUT_SIZE / height], dtype=np.float32)  # the predictor's transform
        coords = (coords_xy * scale).astype(np.float32)
        runs = [
            self.decoder.run(
                None,
                {
                    **self._features,
                    "point_coords": coords[i : i + self.decode_batch],
                    "point_labels": labels[i : i + self.decode_batch].astype(np.float32),
                },
            )
            for i in range(0, len(coords), self.decode_batch)
        ]
        logits, iou = (np.concatenate(parts) for parts in zip(*runs))  # (N, M, 256, 256), (N, M)
        best = iou.argmax(axis=1)
        rows = np.arange(len(iou))
        return TeacherOutput(
            torch.from_numpy(np.ascontiguousarray(logits[rows, best])),
            torch.from_numpy(np.ascontiguousarray(iou[rows, best])),
        )
