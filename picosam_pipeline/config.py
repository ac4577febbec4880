"""Typed pipeline configuration, loaded once from ``params.yaml``.

One dataclass per ``params.yaml`` section; :class:`Config` holds them all. Loading checks every key
against the dataclass fields (unknown keys, wrong types and impossible values are rejected with a
message naming the key and the expected form) before any stage does work. Stages receive the
resolved :class:`Config` and write it beside their outputs with :func:`save_resolved`.

Paths are strings relative to the working directory (the repository root when run by DVC).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from picosam_pipeline.errors import PipelineError
from picosam_pipeline.recipes import RecipeError, apply_recipe, check_pairing


class ConfigError(PipelineError, ValueError):
    """A params file or override that cannot be used; the message names the key and the fix."""


# --------------------------------------------------------------------------------------------------
# sections


@dataclass
class RuntimeConfig:
    """Where and how tensors are computed; resolved once at the entry point (see ``device.py``)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    seed: int = 0
    metrics_dir: str = "metrics"  # DVC metrics JSON files (metrics/<stage>.json)
    num_threads: int = 0  # torch intra-op CPU threads; 0 = torch's default (one per core)

    def validate(self, key: str) -> None:
        _non_negative(key, "num_threads", self.num_threads)
        check_device(self.device, f"{key}.device")


def check_device(device: str, key: str) -> None:
    """Raise :class:`ConfigError` unless ``device`` is auto, cpu, cuda or cuda:N (N a GPU number)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(
            f"{key}: expected auto, cpu, cuda or cuda:N (N = the GPU number, e.g. cuda:0), got {device!r}"
        )


@dataclass
class RecipeConfig:
    """Which paper the run follows (``picosam_pipeline/recipes.py``): the keys params.yaml sets to ``auto``
    (``teacher.prompt``, ``train.student``, the loss and the training settings) take the recipe's values."""

    # custom (also a params file without this section): no recipe values, any student on any crops; the defaults
    # of the other sections are PicoSAM3's sample run
    name: Literal["picosam3", "picosam2", "custom"] = "custom"
    size: Literal["auto", "sample", "full"] = "auto"  # auto: sample for dataset.name sample, else the papers' full run


@dataclass
class DatasetConfig:
    """The dataset the pipeline runs on: the folder ``<dir>/<name>`` (``picosam_pipeline/datasets.py``)."""

    name: str = "sample"  # sample | coco2017 | lvis_v1 | any folder name under dir with the standard layout
    dir: str = "data/datasets"

    @property
    def folder(self) -> str:
        return str(Path(self.dir) / self.name)

    def validate(self, key: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", self.name):
            raise ConfigError(
                f"{key}.name: expected a folder name such as sample, coco2017 or lvis_v1, got {self.name!r}"
            )


@dataclass
class SampleConfig:
    """The built-in synthetic COCO-format dataset (``stages/sample.py``)."""

    out_dir: str = "data/datasets/sample"
    train_images: int = 12
    val_images: int = 6
    seed: int = 0
    plant_bad_inputs: bool = True  # put the bad files / annotations listed in out_dir/BAD_INPUTS.md into train

    def validate(self, key: str) -> None:
        _positive(key, "train_images", self.train_images)
        _positive(key, "val_images", self.val_images)
        for name in ("train_images", "val_images"):
            if getattr(self, name) > 99_999:  # image ids are 100000 + i (train) and 200000 + i (val)
                raise ConfigError(f"{key}.{name}: expected at most 99999 images, got {getattr(self, name)}")
        if self.plant_bad_inputs and self.train_images < 9:
            raise ConfigError(
                f"{key}.train_images: the planted bad inputs need at least 9 train images (7 bad files, a clean "
                f"one, one for the bad annotations), got {self.train_images}; raise it or set "
                f"{key}.plant_bad_inputs=false"
            )


@dataclass
class SplitSource:
    """One annotation file and the folder its images live in."""

    name: str
    annotations: str
    images: str

    def validate(self, key: str) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ConfigError(f"{key}.name: expected a short identifier such as 'train' or 'val', got {self.name!r}")


@dataclass
class PrepareConfig:
    """Instance index built from COCO / LVIS annotations (``stages/prepare.py``)."""

    # auto: the splits of the dataset's layout (``dataset.name``, picosam_pipeline/datasets.py); or an explicit list
    splits: list[SplitSource] | Literal["auto"] = field(
        default_factory=lambda: [
            SplitSource("train", "data/datasets/sample/annotations/instances_train.json", "data/datasets/sample/train"),
            SplitSource("val", "data/datasets/sample/annotations/instances_val.json", "data/datasets/sample/val"),
        ]
    )
    dataset_format: Literal["auto", "coco", "lvis"] = "auto"
    min_area: float = 0.0  # in pixels, COCO ``area`` (mask area)
    min_roi_side: float = 4.0  # px; PicoSAM3 skips ROIs with a side < 4 px
    roi_padding: float = 0.1  # fraction of w/h added per side before squaring (PicoSAM3)
    point_crop_size: int = 96  # px; PicoSAM2 fixed native-resolution window
    check_images: bool = True  # decode every image once to catch missing / corrupt files
    on_bad_input: Literal["skip", "strict"] = "skip"
    # Read images named by an absolute file_name or one with .. that leaves the split's images folder (off: such an
    # image record is a bad input, so an annotation file cannot make the pipeline read files elsewhere).
    allow_outside_images: bool = False
    out_dir: str = "data/prepared"

    def validate(self, key: str) -> None:
        if not self.splits:
            raise ConfigError(f"{key}.splits: expected auto or at least one {{name, annotations, images}} entry")
        names = [s.name for s in self.splits] if self.splits != "auto" else []  # auto: Config.validate resolves it
        if len(set(names)) != len(names):
            raise ConfigError(f"{key}.splits: split names must be unique, got {names}")
        _non_negative(key, "min_area", self.min_area)
        _non_negative(key, "min_roi_side", self.min_roi_side)
        _positive(key, "point_crop_size", self.point_crop_size)
        if not 0.0 <= self.roi_padding < 1.0:
            raise ConfigError(f"{key}.roi_padding: expected a fraction in [0, 1), got {self.roi_padding}")

    def input_paths(self, key: str) -> dict[str, str]:
        paths = {}
        for i, s in enumerate(self.splits):
            paths[f"{key}.splits[{i}].annotations"] = s.annotations
            paths[f"{key}.splits[{i}].images"] = s.images
        return paths


# A teacher pass's name: it becomes part of file names (store, metrics) and of shard member names.
TEACHER_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
# train.target values that combine the shards' teachers instead of naming one (see train/targets.py).
TARGET_RULES = ("auto", "mean", "confident", "weighted")
SAM2_MODELS = (
    "sam2.1_hiera_tiny",
    "sam2.1_hiera_small",
    "sam2.1_hiera_base_plus",
    "sam2.1_hiera_large",
    "sam2_hiera_tiny",
    "sam2_hiera_small",
    "sam2_hiera_base_plus",
    "sam2_hiera_large",
)


@dataclass
class TeacherConfig:
    """The teacher pass: SAM2/SAM3 run once per image, soft logits into a Zarr v3 store
    (``stages/teacher_logits.py``)."""

    index: str = "data/prepared/index.parquet"
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    model: str = "sam2.1_hiera_tiny"  # one of SAM2_MODELS, or "sam3" (needs the optional sam3 extra)
    checkpoint: str | None = "data/checkpoints/sam2.1_hiera_tiny.pt"
    # Where `picosam-pipeline fetch` puts checkpoints (teacher.checkpoint lives here): a DVC dependency of every
    # teacher pass, so a changed or pulled checkpoint is seen; it always exists (README.md in git).
    checkpoints_dir: str = "data/checkpoints"
    allow_random_weights: bool = False  # run with random weights when the checkpoint is missing (tests, sample)
    prompt: Literal["roi", "point"] = "roi"  # roi: PicoSAM3 box prompt + ROI crop; point: PicoSAM2 point + 96-px window
    multimask_output: bool = True  # ask for 3 masks and keep the one with the highest predicted IoU
    # SAM3's prompt path: geometric = PicoSAM3's (add_geometric_prompt: one box exemplar per query, DETR-style
    # grounding, full-resolution probabilities); instance = the SAM-style interactive head (predict_inst: all
    # boxes, or points, of an image in one call, 288x288 low-res logits). Ignored by SAM2 teachers.
    sam3_path: Literal["geometric", "instance"] = "geometric"
    backend: Literal["torch", "onnxruntime"] = "torch"  # onnxruntime: SAM2 exported once to ONNX (teacher/sam2_onnx.py)
    onnx_dir: str = "data/teacher/onnx"  # cache of exported teachers, one folder per model + weights + settings
    ort_provider: Literal["auto", "cpu", "cuda", "tensorrt"] = "auto"  # auto: CUDA on a GPU when offered, else CPU
    store_size: int = 96  # logits stored at store_size x store_size in the crop frame
    context_margin: float = 0.0  # extra fraction of the crop side stored on each side (for train-time jitter)
    codec: Literal["sigmoid_uint8", "float16", "linear_uint8"] = "sigmoid_uint8"
    compression_level: int = 5  # Blosc-zstd level, 1..9
    # instances per store shard (3 files: logits, confidence, digest) and per writer task; auto: ~1/256 of the
    # pass's instances within [64, 8192] (store.shard_size): a COCO-size store stays under 1,000 files
    instances_per_shard: int | Literal["auto"] = "auto"
    images_per_batch: int | Literal["auto"] = (
        "auto"  # images per encoder forward; auto: 1 on CPU, 16 on a GPU (4 under 24 GiB)
    )
    executor: Literal["dask", "local"] = "dask"  # dask: a cluster runs the shard tasks; local: this process, no dask
    scheduler_address: str | None = None  # existing dask scheduler (tcp://host:8786); None = LocalCluster
    n_workers: int = 0  # LocalCluster workers; 0 = one per GPU, else 1
    threads_per_worker: int = 0  # 0 = all cores / workers
    stores_dir: str = "data/teacher/stores"  # the pass named NAME (``teachers``) writes <stores_dir>/<NAME>.zarr
    out: str = "data/teacher/logits.zarr"  # the store of a run outside the named passes (no ``teachers``, the API)
    name: str = ""  # the pass's name, set from ``teachers`` (names its metrics file and its shard member)

    def validate(self, key: str) -> None:
        if self.name and not TEACHER_NAME.fullmatch(self.name):
            raise ConfigError(
                f"{key}.name: expected a short lower-case name such as sam2 (letters, digits, _), got {self.name!r}"
            )
        if self.model not in SAM2_MODELS + ("sam3",):
            raise ConfigError(f"{key}.model: expected one of {list(SAM2_MODELS) + ['sam3']}, got {self.model!r}")
        if self.backend == "onnxruntime" and self.model == "sam3":
            raise ConfigError(
                f"{key}.backend: onnxruntime runs SAM2 / SAM2.1 teachers only, not sam3; use backend torch"
            )
        if self.model == "sam3" and self.prompt == "point" and self.sam3_path == "geometric":
            raise ConfigError(
                f"{key}.prompt: point prompts need {key}.sam3_path=instance with model sam3 (the geometric "
                f"path, PicoSAM3's, takes boxes only); set {key}.sam3_path=instance or {key}.prompt=roi"
            )
        if not self.splits:
            raise ConfigError(f"{key}.splits: expected at least one split name, e.g. [train, val]")
        _positive(key, "store_size", self.store_size)
        if self.instances_per_shard != "auto":
            _positive(key, "instances_per_shard", self.instances_per_shard)
        if self.images_per_batch != "auto":
            _positive(key, "images_per_batch", self.images_per_batch)
        _non_negative(key, "n_workers", self.n_workers)
        _non_negative(key, "threads_per_worker", self.threads_per_worker)
        if not 0.0 <= self.context_margin <= 1.0:
            raise ConfigError(f"{key}.context_margin: expected a fraction in [0, 1], got {self.context_margin}")
        if not 1 <= self.compression_level <= 9:
            raise ConfigError(f"{key}.compression_level: expected an integer 1..9, got {self.compression_level}")


@dataclass
class LvisEvalConfig:
    """An extra evaluation straight from LVIS v1 annotations + COCO images (no shards, no teacher)."""

    annotations: str  # e.g. data/datasets/lvis_v1/annotations/lvis_v1_val.json
    images: str  # the COCO val2017 folder; annotations whose image is not there are counted, not scored
    max_annotations: int = 0  # score the first N usable annotations in file order; 0 = all

    def validate(self, key: str) -> None:
        _non_negative(key, "max_annotations", self.max_annotations)


@dataclass
class EvaluateConfig:
    """Crop-space scores of the float student and the teacher on the val shards (``stages/evaluate.py``)."""

    shards: str = "data/shards/val"  # WebDataset shards of the split to score (directory or shard index)
    checkpoint: str = "data/train/student_best.pt"  # the best val IoU; data/train/student.pt = the last step
    index: str = "data/prepared/index.parquet"  # full-image GT masks (rle_counts) and category names
    split: str = "val"  # the index split the shards were cut from
    batch_size: int = 64
    grid_samples: int = 8  # rows of the qualitative grid (data/evaluate/grid.png); 0 = no grid
    int8_model: str | None = None  # fake-quant / INT8 ONNX from the quantize stage: scored and shown when set
    int8_onnx: str = (
        "data/export/picosam_int8_fakequant.onnx"  # what stage evaluate-int8 scores beside the float student
    )
    int8_out_dir: str = "data/evaluate-int8"  # stage evaluate-int8's output (report, grid with the INT8 column)
    write_predictions: str | None = None  # image-frame COCO results here, crop-frame file beside it (NAME.crop.json)
    lvis: LvisEvalConfig | None = None
    out_dir: str = "data/evaluate"

    def validate(self, key: str) -> None:
        _positive(key, "batch_size", self.batch_size)
        _non_negative(key, "grid_samples", self.grid_samples)


@dataclass
class PackConfig:
    """WebDataset shards joining the index, the images and the teacher store (``stages/pack.py``)."""

    index: str = "data/prepared/index.parquet"
    stores_dir: str = "data/teacher/stores"  # teacher.stores_dir: the teacher passes' stores, <NAME>.zarr
    teachers: list[str] = field(default_factory=lambda: ["sam2"])  # the passes whose logits go into every sample
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    out_dir: str = "data/shards"  # one folder per split: shard-NNNNNN.tar + shards.json
    samples_per_shard: int = 4096  # ~35 MB per 96x96 shard; loader parallelism is per shard
    seed: int = 0  # order of the samples across each split's shards
    jpeg_quality: int = 90  # image crops; 90 is ~3.2 KB per 96x96 COCO crop

    def validate(self, key: str) -> None:
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ConfigError(
                f"{key}.splits: expected a list of distinct split names, e.g. [train, val], got {self.splits}"
            )
        if not self.teachers or len(set(self.teachers)) != len(self.teachers):
            raise ConfigError(
                f"{key}.teachers: expected a list of distinct teacher pass names, e.g. [sam2], got {self.teachers}"
            )
        for name in self.teachers:
            if not TEACHER_NAME.fullmatch(name) or name in TARGET_RULES:
                raise ConfigError(
                    f"{key}.teachers: {name!r} is not a teacher pass name (lower-case letters, digits, _; "
                    f"not one of {list(TARGET_RULES)})"
                )
        _positive(key, "samples_per_shard", self.samples_per_shard)
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"{key}.jpeg_quality: expected an integer 1..100 (JPEG quality), got {self.jpeg_quality}")

    def store_paths(self) -> dict[str, str]:
        """``{teacher pass name: its store}`` in ``teachers`` order: ``<stores_dir>/<name>.zarr``."""
        return {name: str(Path(self.stores_dir) / f"{name}.zarr") for name in self.teachers}


@dataclass
class TrainConfig:
    """Distillation training of a student on the packed shards (``stages/train.py``, ``train/trainer.py``).

    The loss fields map 1:1 onto :class:`picosam_pipeline.train.losses.DistillationLoss`. The papers' recipe:
    AdamW lr 3e-4 (weight decay 0.01), 1000 warm-up steps then constant, batch 8 (PicoSAM2) / 64 (PicoSAM3),
    one epoch of COCO train2017 instances, no augmentation, no clipping.
    """

    shards: str = "data/shards"  # pack.out_dir: train/ and val/ inside, each shard-NNNNNN.tar + shards.json
    student: Literal["picosam2", "picosam3"] = "picosam3"
    steps: int | Literal["epoch"] = 300  # optimizer steps (batches per rank); epoch = one pass over the train shards
    batch_size: int = 8  # per rank
    lr: float = 3e-4  # peak learning rate (after warm-up)
    weight_decay: float = 0.01
    warmup_steps: int = 30  # linear warm-up from lr / warmup_steps to lr
    schedule: Literal["constant", "cosine"] = "constant"  # after warm-up; cosine decays to min_lr at `steps`
    min_lr: float = 3e-5
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    lambda_mode: Literal["confidence_batch_mean", "confidence_per_sample", "fixed"] = "confidence_batch_mean"
    fixed_lambda: float = 0.5  # teacher weight when lambda_mode is fixed (0 = supervised baseline)
    temperature: float = 0.2  # sigmoid(x / T): 0.2 = PicoSAM3's sigmoid(5x), 1 = PicoSAM2
    area_weight: float = 0.4  # PicoSAM3's area term weight; 0 = off (PicoSAM2)
    area_min_ratio: float = 0.4
    checkpoint_every: int = 100  # steps between resumable checkpoints (state_dir/checkpoint.pt)
    eval_every: int = 100  # steps between val-IoU evaluations (also at step 0 and at the end)
    log_every: int = 10  # steps between host syncs for the loss log and the progress bar
    num_workers: int | Literal["auto"] = (
        "auto"  # loader worker processes per rank; auto: 0 on CPU, min(8, cores - 2) on a GPU
    )
    compile: bool | Literal["auto"] = "auto"  # torch.compile the student's full batches; auto: on CUDA only
    shuffle_buffer: int = 1000  # samples in the loader's shuffle buffer
    hflip: bool = False  # random horizontal flips (image, mask and teacher logits together)
    jitter: float = 0.0  # random crop-box jitter, as a fraction of the crop side (needs teacher.context_margin)
    on_corrupt_shard: Literal["stop", "skip"] = "stop"
    # The distillation target (train/targets.py): auto = the shards' only teacher; a teacher pass name; or a
    # combination of every teacher in the shards: mean (of probabilities), confident (per pixel, the teacher
    # farther from 0.5), weighted (target_weights, normalised to sum 1).
    target: str = "auto"
    target_weights: dict[str, float] = field(default_factory=dict)  # with target weighted: {pass name: weight >= 0}
    out_dir: str = "data/train"  # student.pt (final weights), config.resolved.json: the stage's DVC output
    state_dir: str | None = None  # checkpoint.pt, the resumable state; None = "<out_dir>.state" (not a DVC output)

    def resume_dir(self) -> str:
        """Where the resumable checkpoint lives: ``state_dir``, or ``<out_dir>.state`` beside the output."""
        return self.state_dir or f"{self.out_dir.rstrip('/')}.state"

    def validate(self, key: str) -> None:
        if self.steps != "epoch":
            _positive(key, "steps", self.steps)
        for name in ("batch_size", "lr", "checkpoint_every", "eval_every", "log_every", "shuffle_buffer"):
            _positive(key, name, getattr(self, name))
        for name in ("weight_decay", "warmup_steps", "min_lr", "grad_clip", "area_weight", "area_min_ratio"):
            _non_negative(key, name, getattr(self, name))
        if self.num_workers != "auto":
            _non_negative(key, "num_workers", self.num_workers)
        if not 0.0 <= self.jitter < 0.5:
            raise ConfigError(f"{key}.jitter: expected a fraction of the crop side in [0, 0.5), got {self.jitter}")
        if self.temperature <= 0:
            raise ConfigError(
                f"{key}.temperature: expected a positive number (1 = PicoSAM2, 0.2 = PicoSAM3), got {self.temperature}"
            )
        if not 0.0 <= self.fixed_lambda <= 1.0:
            raise ConfigError(f"{key}.fixed_lambda: expected a weight in [0, 1], got {self.fixed_lambda}")
        if self.min_lr > self.lr:
            raise ConfigError(f"{key}.min_lr: expected at most lr ({self.lr}), got {self.min_lr}")
        if self.target not in TARGET_RULES and not TEACHER_NAME.fullmatch(self.target):
            raise ConfigError(
                f"{key}.target: expected auto, a teacher pass name (e.g. sam2), mean, confident or weighted, "
                f"got {self.target!r}"
            )
        if (self.target == "weighted") != bool(self.target_weights):
            raise ConfigError(
                f"{key}.target_weights: set it (e.g. {{sam2: 0.5, sam3: 0.5}}) exactly when {key}.target is "
                f"weighted; target is {self.target!r}, target_weights {self.target_weights}"
            )
        if any(w < 0 for w in self.target_weights.values()) or (
            self.target_weights and sum(self.target_weights.values()) <= 0
        ):
            raise ConfigError(
                f"{key}.target_weights: expected weights >= 0 with a positive sum, got {self.target_weights}"
            )

    def loader_workers(self, device_type: str, cores: int) -> int:
        """``num_workers`` resolved: ``auto`` is 0 on a CPU (the step uses every core) and ``min(8, cores - 2)`` on a
        GPU, where one process cannot decode 64-sample batches as fast as the step consumes them."""
        if self.num_workers != "auto":
            return self.num_workers
        return 0 if device_type != "cuda" else max(1, min(8, cores - 2))

    def compiles(self, device_type: str) -> bool:
        """``compile`` resolved: ``auto`` compiles on CUDA (the bare step 1.28x on an H200) and not on a CPU, where
        it does not pay (measured on this project's 2-core machine, PicoSAM3 at batch 8: 49 s of compiling, then
        25.2 samples/s against 24.1 eager)."""
        return self.compile if isinstance(self.compile, bool) else device_type == "cuda"

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~picosam_pipeline.train.losses.DistillationLoss`."""
        names = ("lambda_mode", "fixed_lambda", "temperature", "area_weight", "area_min_ratio")
        return {name: getattr(self, name) for name in names}


@dataclass
class QuantizeConfig:
    """MCT INT8 post-training quantisation for the IMX500, scored on the val shards (``stages/quantize.py``)."""

    checkpoint: str = "data/train/student_best.pt"  # float student from the train stage (best; student.pt = last)
    train_shards: str = "data/shards/train"  # representative data for MCT's statistics
    val_shards: str = "data/shards/val"  # float and INT8 are scored on the same crops
    index: str = "data/prepared/index.parquet"  # full-image GT masks and categories (as evaluate)
    split: str = "val"  # the index split the val shards were cut from
    tpc_version: str | float = "4.0"  # edgemdt_tpc IMX500 target platform version (1.0, 4.0, 4.1, 5.0)
    representative_batches: int = 10  # PicoSAM2 calibrated on 10 batches x 8 crops
    batch_size: int = 8  # representative batch size
    shuffle_buffer: int = 1000  # draws the representative crops at random from the train shards
    gptq_epochs: int = 0  # 0 = PTQ; N > 0 = gradient-based PTQ (GPTQ) for N epochs over the representative data
    eval_batch_size: int = 64
    max_miou_drop: float = 0.01  # target: INT8 crop mIoU within this of float (reported, not enforced)
    probe_samples: int = 16  # val crops kept with the INT8 torch model's logits, for the export stage's checks
    out_dir: str = "data/quantize"

    def validate(self, key: str) -> None:
        # YAML reads an unquoted 4.0 as a number; MCT wants the string "4.0".
        self.tpc_version = str(self.tpc_version)
        if not re.fullmatch(r"\d+\.\d+(_\w+)?", self.tpc_version):
            raise ConfigError(f'{key}.tpc_version: expected a version such as "4.0", got {self.tpc_version!r}')
        for name in ("representative_batches", "batch_size", "eval_batch_size", "probe_samples"):
            _positive(key, name, getattr(self, name))
        for name in ("shuffle_buffer", "gptq_epochs", "max_miou_drop"):
            _non_negative(key, name, getattr(self, name))


@dataclass
class ExportConfig:
    """The deliverable ONNX files (MCTQ for the converter, fake-quant for evaluation), checked in onnxruntime."""

    quantized_dir: str = "data/quantize"  # the quantize stage's out_dir
    mctq_check_samples: int = 2  # MCTQ runs ~300x slower than float in onnxruntime: a few probe crops only
    # Bounds of the onnxruntime checks. Two correct INT8 implementations still differ: float accumulation order
    # flips a rounding now and then and ~40 quantisers carry it on (trained PicoSAM3: up to 9 steps, mean 0.8);
    # a wrong graph is off by tens of steps on most pixels.
    max_diff_steps: float = 16.0  # bound on max |onnx - torch| logits, in output quantisation steps
    min_mask_agreement: float = 0.98  # bound on the share of mask pixels where onnx and torch agree
    out_dir: str = "data/export"

    def validate(self, key: str) -> None:
        _positive(key, "mctq_check_samples", self.mctq_check_samples)
        _non_negative(key, "max_diff_steps", self.max_diff_steps)
        if not 0.0 <= self.min_mask_agreement <= 1.0:
            raise ConfigError(f"{key}.min_mask_agreement: expected a share in [0, 1], got {self.min_mask_agreement}")


@dataclass
class PackageConfig:
    """``imxconv-pt`` on the MCTQ export: packerOut.zip, memory report, Raspberry Pi deploy folder
    (``stages/package.py``)."""

    export_dir: str = "data/export"  # the export stage's out_dir
    input_persistency: bool = True  # false = --no-input-persistency: more memory, no input-tensor debug stream
    timeout_s: int = 1800  # the converter takes 15-70 s on two idle cores
    out_dir: str = "data/package"  # packerOut.zip, memory report, dnnParams.xml, converter.log, deploy/

    def validate(self, key: str) -> None:
        _positive(key, "timeout_s", self.timeout_s)


@dataclass
class Config:
    """The whole pipeline configuration (one attribute per ``params.yaml`` section)."""

    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # The teacher passes DVC runs (stage teacher-logits@NAME, one store each): NAME -> the keys of ``teacher`` that
    # differ for that pass (model, checkpoint, ...). Empty: `run-stage teacher-logits` runs ``teacher`` alone.
    teachers: dict[str, dict[str, Any]] = field(default_factory=dict)
    pack: PackConfig = field(default_factory=PackConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    package: PackageConfig = field(default_factory=PackageConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, key: str) -> None:
        if self.prepare.splits == "auto":  # the one dataset switch: the splits follow dataset.name
            from picosam_pipeline.datasets import dataset_splits

            self.prepare.splits = [
                SplitSource(*split) for split in dataset_splits(self.dataset.name, self.dataset.folder)
            ]
            if self.dataset.name == "sample" and Path(self.sample.out_dir) != Path(self.dataset.folder):
                raise ConfigError(
                    f"sample.out_dir: with dataset.name sample the sample stage must write the dataset's "
                    f"folder {self.dataset.folder}, got {self.sample.out_dir!r}; set one to the other"
                )
        for name in self.teachers:
            self.teacher_pass(name)  # every pass must build a valid teacher section

    def teacher_pass(self, name: str) -> Config:
        """This config with ``teacher`` resolved for pass ``name``: ``teachers[name]`` over ``teacher``, the store at
        ``<teacher.stores_dir>/<name>.zarr``. Raises ConfigError for an unknown pass or an invalid override."""
        if name not in self.teachers:
            known = ", ".join(self.teachers) or "none: params.yaml has no teachers section"
            raise ConfigError(f"teachers.{name}: no such teacher pass; the passes are {known}")
        if not TEACHER_NAME.fullmatch(name) or name in TARGET_RULES:
            raise ConfigError(
                f"teachers.{name}: a pass name is lower-case letters, digits and _ (at most 32), not one "
                f"of {list(TARGET_RULES)}; rename it"
            )
        override = self.teachers[name] or {}
        if not isinstance(override, dict):
            raise ConfigError(
                f"teachers.{name}: expected a mapping of teacher keys (e.g. {{model: sam3}}), got {override!r}"
            )
        fixed = sorted(set(override) & {"name", "out", "stores_dir"})
        if fixed:
            raise ConfigError(
                f"teachers.{name}.{fixed[0]}: set per pipeline, not per pass (the store of pass {name} is "
                f"<teacher.stores_dir>/{name}.zarr); remove it"
            )
        merged = {
            **dataclasses.asdict(self.teacher),
            **override,
            "name": name,
            "out": str(Path(self.teacher.stores_dir) / f"{name}.zarr"),
        }
        return dataclasses.replace(self, teacher=build(TeacherConfig, merged, f"teachers.{name}"))


# --------------------------------------------------------------------------------------------------
# loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``params.yaml`` (or defaults when ``path`` is None), apply ``key.path=value`` overrides, validate.

    Raises:
        ConfigError: unreadable YAML, unknown key, wrong type or impossible value.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(
                f"params file {str(path)!r} is a folder; pass the params.yaml file inside it with --params"
            )
        if not path.is_file():
            raise ConfigError(
                f"params file {str(path)!r} does not exist; pass --params FILE or run from the repository root"
            )
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"params file {str(path)!r} is not valid YAML: {err}") from None
        except UnicodeDecodeError:
            raise ConfigError(
                f"params file {str(path)!r} is not UTF-8 text (a binary file?); pass the pipeline's "
                "params.yaml with --params"
            ) from None
        except OSError as err:
            raise ConfigError(f"params file {str(path)!r} cannot be read ({err.strerror or err})") from None
        except RecursionError:
            raise ConfigError(
                f"params file {str(path)!r} is nested deeper than the YAML parser allows; it is not a params file"
            ) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"params file {str(path)!r}: expected a mapping of sections at the top level")
    for item in overrides:
        apply_override(raw, item)
    try:
        sources = apply_recipe(raw)  # keys left out or `auto` take the recipe's values
    except RecipeError as err:
        raise ConfigError(str(err)) from None
    cfg = build(Config, raw, "")
    check_recipe(cfg, sources)
    return cfg


def check_recipe(cfg: Config, sources: dict[str, str] | None = None) -> None:
    """Refuse a student and a crop convention its recipe does not pair, before any stage runs.

    The conventions checked are those of the teacher passes the shards take (``pack.teachers``), each named by
    the key that set it (``teachers.NAME.prompt`` or ``teacher.prompt``).
    """
    prompts = {}
    for name in cfg.pack.teachers:
        if name in cfg.teachers:
            key = f"teachers.{name}.prompt" if "prompt" in (cfg.teachers[name] or {}) else "teacher.prompt"
            prompts[key] = cfg.teacher_pass(name).teacher.prompt
    if not prompts:
        prompts["teacher.prompt"] = cfg.teacher.prompt
    try:
        check_pairing(cfg.recipe.name, cfg.train.student, prompts, sources or {})
    except RecipeError as err:
        raise ConfigError(str(err)) from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override in place; ``value`` is parsed as YAML (``1``, ``true``, ``[a, b]``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE, e.g. train.steps=200")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = value


def build(cls: type, data: Any, key: str) -> Any:
    """Build dataclass ``cls`` from ``data``, recursively, rejecting unknown keys and wrong types."""
    where = key or "params"
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: expected a mapping with keys {sorted(f.name for f in dataclasses.fields(cls))}, got {data!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{_join(key, unknown[0])}: unknown key; {where} accepts {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], _join(key, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(key, name)}: required key is missing")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(key or cls.__name__)
    return obj


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if tp is Any:  # checked by the owner's validate (``teachers`` entries: built as a TeacherConfig)
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append((arg, str(err)))
        # A list given for `list[X] | Literal[...]`: the list branch's error names the bad element.
        same_kind = [e for arg, e in errors if (typing.get_origin(arg) is list) == isinstance(value, list)]
        if len(errors) == 1 or len(same_kind) == 1:
            raise ConfigError(errors[0][1] if len(errors) == 1 else same_kind[0])
        words = [word for arg in args if arg is not type(None) for word in _describe(arg)]
        raise ConfigError(f"{key}: expected {', '.join(words[:-1])} or {words[-1]}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {k: _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if not -(2**63) <= value < 2**63:  # torch, numpy and the stores take 64-bit integers
            raise ConfigError(f"{key}: expected an integer that fits 64 bits, got {value}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        # YAML reads .nan / .inf as floats, and every bound in validate() lets NaN through; a huge int overflows
        if isinstance(value, int) and not -_FLOAT_MAX <= value <= _FLOAT_MAX or not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r} (YAML reads .nan and .inf as numbers)")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has unsupported type {tp!r}")  # programming error


_FLOAT_MAX = int(sys.float_info.max)


def _describe(tp: Any) -> list[str]:
    """A field type as the alternatives the error messages above name, e.g. ``["true", "false"]`` for bool."""
    if typing.get_origin(tp) is Literal:
        return [str(a) for a in typing.get_args(tp)]
    words = {bool: ["true", "false"], int: ["an integer"], float: ["a number"], str: ["a string"]}
    if tp in words:
        return words[tp]
    return [{list: "a list", dict: "a mapping"}.get(typing.get_origin(tp), getattr(tp, "__name__", str(tp)))]


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _positive(section: str, name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{section}.{name}: expected a positive number, got {value}")


def _non_negative(section: str, name: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{section}.{name}: expected a number >= 0, got {value}")


# --------------------------------------------------------------------------------------------------
# inputs


def require_inputs(paths: dict[str, str]) -> None:
    """Raise :class:`ConfigError` for the first ``{key: path}`` whose path does not exist."""
    for key, p in paths.items():
        if not Path(p).exists():
            raise ConfigError(
                f"{key}: path {p!r} does not exist; fix the path in params.yaml or with --set {key}=PATH "
                "(an earlier stage's output: run that stage, or `dvc pull` it from the team's remote)"
            )
