"""The sections of ``params.yaml``: one dataclass each (``config.Config`` holds them all).

A field is a key: its type, its default and the docstring under it, which ``picosam-pipeline params-schema`` writes
into ``params.schema.json`` as the key's description (what an editor shows). pydantic checks the types when
``config.load_config`` builds the sections (strictly: YAML's ``1`` is not ``true``, ``1.5`` not an integer, ``5``
not a string; a number may be written as an integer), the bounds the types below carry (:data:`PositiveInt` ...)
and unknown keys; each section's ``validate(key)`` then checks what a type cannot say (a value against another, a
name pattern), with a message that names the key and the fix.

Every size and count has an upper bound as well (:func:`PositiveIntUpTo` ...): a sane maximum, far above any
real run, so that a typo (``batch_size: 64000``) stops with the key and its range instead of exhausting memory or
disk in the middle of a stage. params.schema.json carries the ranges as ``minimum`` / ``maximum``.

Paths are strings relative to the working directory (the repository root when run by DVC).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, GetCoreSchemaHandler, GetJsonSchemaHandler, Strict
from pydantic_core import PydanticCustomError, core_schema

from picosam_pipeline.errors import PipelineError


class ConfigError(PipelineError, ValueError):
    """A params file or override that cannot be used; the message names the key and the fix."""


def _fits_64_bits(value: int) -> int:
    if not -(2**63) <= value < 2**63:  # torch, numpy and the stores take 64-bit integers
        raise PydanticCustomError("int_64_bits", "expected an integer that fits 64 bits")
    return value


# The field types: strict (no YAML 1 for true, 1.5 for an integer, 5 for a string), floats finite (the sections'
# allow_inf_nan=False: YAML reads .nan / .inf as numbers), integers within 64 bits.
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
PositiveInt = Annotated[int, Strict(), Field(gt=0), AfterValidator(_fits_64_bits)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0), AfterValidator(_fits_64_bits)]
Float = Annotated[float, Strict()]
PositiveFloat = Annotated[float, Strict(), Field(gt=0)]
NonNegativeFloat = Annotated[float, Strict(), Field(ge=0)]
Seed = NonNegativeInt  # numpy's SeedSequence refuses negative seeds


@dataclass(frozen=True)
class Within:
    """Type metadata: the value lies in ``[low, high]``; pydantic checks it after the type (and its lower bound,
    whose message stays that of :data:`PositiveInt` ...), the JSON Schema shows it as ``minimum`` / ``maximum``."""

    low: float
    high: float

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> Any:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: GetJsonSchemaHandler) -> dict[str, Any]:
        json_schema = handler(schema)
        json_schema.pop("exclusiveMinimum", None)  # an integer > 0 is one >= 1: the range says it once
        return {**json_schema, "minimum": self.low, "maximum": self.high}

    def _check(self, value: float) -> float:
        if not self.low <= value <= self.high:
            # config._explain makes it `key: expected an integer 1..4096, got 5000`
            allowed = (
                f"an integer {self.low}..{self.high}"
                if isinstance(value, int)
                else f"a number in [{self.low:g}, {self.high:g}]"
            )
            raise PydanticCustomError("out_of_range", f"expected {allowed}")
        return value


# The bounded field types, one call per key's range (functions, named like the types they return).


def PositiveIntUpTo(high: int) -> Any:
    """An integer in ``1..high`` (below 1: :data:`PositiveInt`'s message)."""
    return Annotated[int, Strict(), Field(gt=0), Within(1, high)]


def NonNegativeIntUpTo(high: int) -> Any:
    """An integer in ``0..high`` (below 0: :data:`NonNegativeInt`'s message)."""
    return Annotated[int, Strict(), Field(ge=0), Within(0, high)]


def IntBetween(low: int, high: int) -> Any:
    """An integer in ``low..high``; one message for either side."""
    return Annotated[int, Strict(), Within(low, high)]


def NonNegativeFloatUpTo(high: float) -> Any:
    """A finite number in ``[0, high]`` (below 0: :data:`NonNegativeFloat`'s message)."""
    return Annotated[float, Strict(), Field(ge=0), Within(0, high)]


# The sane maxima shared by several keys.
MAX_BATCH = 4096  # samples per batch: 64x the papers' largest
MAX_STEPS = 100_000_000  # optimizer steps: an epoch of COCO at batch 8 is ~110k
MAX_SHUFFLE = 1_000_000  # decoded samples a loader holds to shuffle (tens of GB of 96-px crops at the maximum)
MAX_PROCESSES = 1024  # worker processes or threads on one machine


class Section:
    """What every section shares: pydantic's settings (unknown keys refused, finite floats, docstrings of the
    fields as the keys' descriptions)."""

    __pydantic_config__ = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)

    def validate(self, key: str) -> None:
        """Check what the field types cannot say; raise :class:`ConfigError` naming the key (``key.field``)."""


@dataclass
class RuntimeConfig(Section):
    """Where and how tensors are computed; resolved once at the entry point (see ``device.py``)."""

    device: Str = "auto"
    """auto | cpu | cuda | cuda:N (auto: CUDA when present)"""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 autocast on CUDA, fp32 on CPU"""
    seed: Seed = 0
    metrics_dir: Str = "metrics"
    """DVC metrics JSON files (metrics/<stage>.json)"""
    num_threads: NonNegativeIntUpTo(MAX_PROCESSES) = 0
    """torch intra-op CPU threads; 0 = torch's default (one per core)"""

    def validate(self, key: str) -> None:
        check_device(self.device, f"{key}.device")


def check_device(device: str, key: str) -> None:
    """Raise :class:`ConfigError` unless ``device`` is auto, cpu, cuda or cuda:N (N a GPU number)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(
            f"{key}: expected auto, cpu, cuda or cuda:N (N = the GPU number, e.g. cuda:0), got {device!r}"
        )


@dataclass
class RecipeConfig(Section):
    """Which paper the run follows (``picosam_pipeline/recipes.py``): the keys params.yaml sets to ``auto``
    (``teacher.prompt``, ``train.student``, the loss and the training settings) take the recipe's values."""

    name: Literal["picosam3", "picosam2", "custom"] = "custom"
    """custom (also a params file without this section): no recipe values, any student on any crops; the defaults
    of the other sections are PicoSAM3's sample run"""
    size: Literal["auto", "sample", "full"] = "auto"
    """auto: by the train split's size (the train stage reads it from the shards): the papers' full run when one
    epoch is at least twice its warm-up (128,000 train instances for picosam3, 16,000 for picosam2), else sample"""


@dataclass
class DatasetConfig(Section):
    """The dataset the pipeline runs on: the folder ``<dir>/<name>`` (``picosam_pipeline/datasets.py``)."""

    name: Str = "sample"
    """sample | coco2017 | lvis_v1 | any folder name under dir with the standard layout"""
    dir: Str = "data/datasets"

    @property
    def folder(self) -> str:
        return str(Path(self.dir) / self.name)

    def validate(self, key: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", self.name):
            raise ConfigError(
                f"{key}.name: expected a folder name such as sample, coco2017 or lvis_v1, got {self.name!r}"
            )


@dataclass
class SampleConfig(Section):
    """The built-in synthetic COCO-format dataset (``stages/sample.py``)."""

    out_dir: Str = "data/datasets/sample"
    train_images: PositiveIntUpTo(99_999) = 12
    """image ids are 100000 + i: at most 99999"""
    val_images: PositiveIntUpTo(99_999) = 6
    """image ids are 200000 + i: at most 99999"""
    seed: Seed = 0
    plant_bad_inputs: Bool = True
    """put the bad files / annotations listed in out_dir/BAD_INPUTS.md into train"""

    def validate(self, key: str) -> None:
        if self.plant_bad_inputs and self.train_images < 9:
            raise ConfigError(
                f"{key}.train_images: the planted bad inputs need at least 9 train images (7 bad files, a clean "
                f"one, one for the bad annotations), got {self.train_images}; raise it or set "
                f"{key}.plant_bad_inputs=false"
            )


@dataclass
class SplitSource(Section):
    """One annotation file and the folder its images live in."""

    name: Str
    annotations: Str
    images: Str

    def validate(self, key: str) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ConfigError(f"{key}.name: expected a short identifier such as 'train' or 'val', got {self.name!r}")


@dataclass
class PrepareConfig(Section):
    """Instance index built from COCO / LVIS annotations (``stages/prepare.py``)."""

    splits: list[SplitSource] | Literal["auto"] = field(
        default_factory=lambda: [
            SplitSource("train", "data/datasets/sample/annotations/instances_train.json", "data/datasets/sample/train"),
            SplitSource("val", "data/datasets/sample/annotations/instances_val.json", "data/datasets/sample/val"),
        ]
    )
    """auto: the splits of the dataset's layout (dataset.name, picosam_pipeline/datasets.py); or an explicit list"""
    dataset_format: Literal["auto", "coco", "lvis"] = "auto"
    min_area: NonNegativeFloatUpTo(1e10) = 0.0
    """in pixels, COCO area (mask area)"""
    min_roi_side: NonNegativeFloatUpTo(100_000) = 4.0
    """px; PicoSAM3 skips ROIs with a side < 4 px"""
    roi_padding: Float = 0.1
    """fraction of w/h added per side before squaring (PicoSAM3)"""
    point_crop_size: PositiveIntUpTo(4096) = 96
    """px; PicoSAM2 fixed native-resolution window"""
    check_images: Bool = True
    """decode every image once to catch missing / corrupt files"""
    on_bad_input: Literal["skip", "strict"] = "skip"
    allow_outside_images: Bool = False
    """Read images named by an absolute file_name or one with .. that leaves the split's images folder (off: such an
    image record is a bad input, so an annotation file cannot make the pipeline read files elsewhere)."""
    out_dir: Str = "data/prepared"

    def validate(self, key: str) -> None:
        if not self.splits:
            raise ConfigError(f"{key}.splits: expected auto or at least one {{name, annotations, images}} entry")
        names = [s.name for s in self.splits] if self.splits != "auto" else []  # auto: Config.validate resolves it
        if len(set(names)) != len(names):
            raise ConfigError(f"{key}.splits: split names must be unique, got {names}")
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
class TeacherConfig(Section):
    """The teacher pass: SAM2/SAM3 run once per image, soft logits into a Zarr v3 store
    (``stages/teacher_logits.py``)."""

    index: Str = "data/prepared/index.parquet"
    splits: list[Str] = field(default_factory=lambda: ["train", "val"])
    model: Literal[SAM2_MODELS + ("sam3",)] = "sam2.1_hiera_tiny"
    """a SAM2 / SAM2.1 model, or sam3 (needs the optional sam3 extra)"""
    checkpoint: Str | None = "data/checkpoints/sam2.1_hiera_tiny.pt"
    checkpoints_dir: Str = "data/checkpoints"
    """Where `picosam-pipeline fetch` puts checkpoints (teacher.checkpoint lives here): a DVC dependency of every
    teacher pass, so a changed or pulled checkpoint is seen; it always exists (README.md in git)."""
    allow_random_weights: Bool = False
    """run with random weights when the checkpoint is missing (tests, sample)"""
    prompt: Literal["roi", "point"] = "roi"
    """roi: PicoSAM3 box prompt + ROI crop; point: PicoSAM2 point + 96-px window"""
    multimask_output: Bool = True
    """ask for 3 masks and keep the one with the highest predicted IoU"""
    sam3_path: Literal["geometric", "instance"] = "geometric"
    """SAM3's prompt path: geometric = PicoSAM3's (add_geometric_prompt: one box exemplar per query, DETR-style
    grounding, full-resolution probabilities); instance = the SAM-style interactive head (predict_inst: all
    boxes, or points, of an image in one call, 288x288 low-res logits). Ignored by SAM2 teachers."""
    backend: Literal["torch", "onnxruntime"] = "torch"
    """onnxruntime: SAM2 exported once to ONNX (teacher/sam2_onnx.py)"""
    onnx_dir: Str = "data/teacher/onnx"
    """cache of exported teachers, one folder per model + weights + settings"""
    ort_provider: Literal["auto", "cpu", "cuda", "tensorrt"] = "auto"
    """auto: CUDA on a GPU when offered, else CPU"""
    store_size: PositiveIntUpTo(1024) = 96
    """logits stored at store_size x store_size in the crop frame"""
    context_margin: Float = 0.0
    """extra fraction of the crop side stored on each side (for train-time jitter)"""
    codec: Literal["sigmoid_uint8", "float16", "linear_uint8"] = "sigmoid_uint8"
    compression_level: IntBetween(1, 9) = 5
    """Blosc-zstd level, 1..9"""
    instances_per_shard: PositiveIntUpTo(65_536) | Literal["auto"] = "auto"
    """instances per store shard (3 files: logits, confidence, digest) and per writer task, 1..65536 (a writer holds
    a shard's logits); auto: ~1/256 of the pass's instances within [64, 8192] (store.shard_size): a COCO-size store
    stays under 1,000 files"""
    images_per_batch: PositiveIntUpTo(256) | Literal["auto"] = "auto"
    """images per encoder forward; auto: 1 on CPU, 16 on a GPU (4 under 24 GiB)"""
    executor: Literal["dask", "local"] = "dask"
    """dask: a cluster runs the shard tasks; local: this process, no dask"""
    scheduler_address: Str | None = None
    """existing dask scheduler (tcp://host:8786); None = LocalCluster"""
    n_workers: NonNegativeIntUpTo(MAX_PROCESSES) = 0
    """LocalCluster workers; 0 = one per GPU, else 1"""
    threads_per_worker: NonNegativeIntUpTo(MAX_PROCESSES) = 0
    """0 = all cores / workers"""
    stores_dir: Str = "data/teacher/stores"
    """the pass named NAME (teachers) writes <stores_dir>/<NAME>.zarr"""
    out: Str = "data/teacher/logits.zarr"
    """the store of a run outside the named passes (no teachers, the API)"""
    name: Str = ""
    """the pass's name, set from teachers (names its metrics file and its shard member)"""

    def validate(self, key: str) -> None:
        if self.name and not TEACHER_NAME.fullmatch(self.name):
            raise ConfigError(
                f"{key}.name: expected a short lower-case name such as sam2 (letters, digits, _), got {self.name!r}"
            )
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
        if not 0.0 <= self.context_margin <= 1.0:
            raise ConfigError(f"{key}.context_margin: expected a fraction in [0, 1], got {self.context_margin}")


@dataclass
class LvisEvalConfig(Section):
    """An extra evaluation straight from LVIS v1 annotations + COCO images (no shards, no teacher)."""

    annotations: Str
    """e.g. data/datasets/lvis_v1/annotations/lvis_v1_val.json"""
    images: Str
    """the COCO val2017 folder; annotations whose image is not there are counted, not scored"""
    max_annotations: NonNegativeIntUpTo(100_000_000) = 0
    """score the first N usable annotations in file order; 0 = all"""


@dataclass
class EvaluateConfig(Section):
    """Crop-space scores of the float student and the teacher on the val shards (``stages/evaluate.py``)."""

    shards: Str = "data/shards/val"
    """WebDataset shards of the split to score (directory or shard index)"""
    checkpoint: Str = "data/train/student_best.pt"
    """the best val IoU; data/train/student.pt = the last step"""
    index: Str = "data/prepared/index.parquet"
    """full-image GT masks (rle_counts) and category names"""
    split: Str = "val"
    """the index split the shards were cut from"""
    batch_size: PositiveIntUpTo(MAX_BATCH) = 64
    grid_samples: NonNegativeIntUpTo(1024) = 8
    """rows of the qualitative grid (data/evaluate/grid.png); 0 = no grid"""
    int8_model: Str | None = None
    """fake-quant / INT8 ONNX from the quantize stage: scored and shown when set"""
    int8_onnx: Str = "data/export/picosam_int8_fakequant.onnx"
    """what stage evaluate-int8 scores beside the float student"""
    int8_out_dir: Str = "data/evaluate-int8"
    """stage evaluate-int8's output (report, grid with the INT8 column)"""
    write_predictions: Str | None = None
    """image-frame COCO results here, crop-frame file beside it (NAME.crop.json)"""
    lvis: LvisEvalConfig | None = None
    out_dir: Str = "data/evaluate"


@dataclass
class PackConfig(Section):
    """WebDataset shards joining the index, the images and the teacher store (``stages/pack.py``)."""

    index: Str = "data/prepared/index.parquet"
    stores_dir: Str = "data/teacher/stores"
    """teacher.stores_dir: the teacher passes' stores, <NAME>.zarr"""
    teachers: list[Str] = field(default_factory=lambda: ["sam2"])
    """the passes whose logits go into every sample"""
    splits: list[Str] = field(default_factory=lambda: ["train", "val"])
    out_dir: Str = "data/shards"
    """one folder per split: shard-NNNNNN.tar + shards.json"""
    samples_per_shard: PositiveIntUpTo(100_000) = 4096
    """~35 MB per 96x96 shard; loader parallelism is per shard"""
    seed: Seed = 0
    """order of the samples across each split's shards"""
    jpeg_quality: IntBetween(1, 100) = 90
    """image crops, 1..100; 90 is ~3.2 KB per 96x96 COCO crop"""

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

    def store_paths(self) -> dict[str, str]:
        """``{teacher pass name: its store}`` in ``teachers`` order: ``<stores_dir>/<name>.zarr``."""
        return {name: str(Path(self.stores_dir) / f"{name}.zarr") for name in self.teachers}


@dataclass
class TrainConfig(Section):
    """Distillation training of a student on the packed shards (``stages/train.py``, ``train/trainer.py``).

    The loss fields map 1:1 onto :class:`picosam_pipeline.train.losses.DistillationLoss`. The papers' recipe:
    AdamW lr 3e-4 (weight decay 0.01), 1000 warm-up steps then constant, batch 8 (PicoSAM2) / 64 (PicoSAM3),
    one epoch of COCO train2017 instances, no augmentation, no clipping.
    """

    shards: Str = "data/shards"
    """pack.out_dir: train/ and val/ inside, each shard-NNNNNN.tar + shards.json"""
    student: Literal["picosam2", "picosam3"] = "picosam3"
    steps: PositiveIntUpTo(MAX_STEPS) | Literal["epoch"] = 300
    """optimizer steps (batches per rank); epoch = one pass over the train shards"""
    batch_size: PositiveIntUpTo(MAX_BATCH) = 8
    """per rank"""
    lr: PositiveFloat = 3e-4
    """peak learning rate (after warm-up)"""
    weight_decay: NonNegativeFloat = 0.01
    warmup_steps: NonNegativeIntUpTo(MAX_STEPS) = 30
    """linear warm-up from lr / warmup_steps to lr"""
    schedule: Literal["constant", "cosine"] = "constant"
    """after warm-up; cosine decays to min_lr at steps"""
    min_lr: NonNegativeFloat = 3e-5
    grad_clip: NonNegativeFloat = 1.0
    """max global gradient norm; 0 = off"""
    lambda_mode: Literal["confidence_batch_mean", "confidence_per_sample", "fixed"] = "confidence_batch_mean"
    fixed_lambda: Float = 0.5
    """teacher weight in [0, 1] when lambda_mode is fixed (0 = supervised baseline)"""
    temperature: PositiveFloat = 0.2
    """sigmoid(x / T): 0.2 = PicoSAM3's sigmoid(5x), 1 = PicoSAM2"""
    area_weight: NonNegativeFloat = 0.4
    """PicoSAM3's area term weight; 0 = off (PicoSAM2)"""
    area_min_ratio: NonNegativeFloat = 0.4
    checkpoint_every: PositiveIntUpTo(MAX_STEPS) = 100
    """steps between resumable checkpoints (state_dir/checkpoint.pt)"""
    eval_every: PositiveIntUpTo(MAX_STEPS) = 100
    """steps between val-IoU evaluations (also at step 0 and at the end)"""
    log_every: PositiveIntUpTo(MAX_STEPS) = 10
    """steps between host syncs for the loss log and the progress bar"""
    num_workers: NonNegativeIntUpTo(256) | Literal["auto"] = "auto"
    """loader worker processes per rank; auto: 0 on CPU, min(8, cores - 2) on a GPU"""
    compile: Bool | Literal["auto"] = "auto"
    """torch.compile the student's full batches; auto: on CUDA only"""
    shuffle_buffer: PositiveIntUpTo(MAX_SHUFFLE) = 1000
    """samples in the loader's shuffle buffer"""
    hflip: Bool = False
    """random horizontal flips (image, mask and teacher logits together)"""
    jitter: Float = 0.0
    """random crop-box jitter, as a fraction of the crop side (needs teacher.context_margin)"""
    on_corrupt_shard: Literal["stop", "skip"] = "stop"
    target: Str = "auto"
    """The distillation target (train/targets.py): auto = the shards' only teacher; a teacher pass name; or a
    combination of every teacher in the shards: mean (of probabilities), confident (per pixel, the teacher
    farther from 0.5), weighted (target_weights, normalised to sum 1)."""
    target_weights: dict[Str, NonNegativeFloat] = field(default_factory=dict)
    """with target weighted: {pass name: weight >= 0}"""
    out_dir: Str = "data/train"
    """student.pt (final weights), config.resolved.json: the stage's DVC output"""
    state_dir: Str | None = None
    """checkpoint.pt, the resumable state; None = "<out_dir>.state" (not a DVC output)"""

    def resume_dir(self) -> str:
        """Where the resumable checkpoint lives: ``state_dir``, or ``<out_dir>.state`` beside the output."""
        return self.state_dir or f"{self.out_dir.rstrip('/')}.state"

    def validate(self, key: str) -> None:
        if not 0.0 <= self.jitter < 0.5:
            raise ConfigError(f"{key}.jitter: expected a fraction of the crop side in [0, 0.5), got {self.jitter}")
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
        if self.target_weights and sum(self.target_weights.values()) <= 0:
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
class QuantizeConfig(Section):
    """MCT INT8 post-training quantisation for the IMX500, scored on the val shards (``stages/quantize.py``)."""

    checkpoint: Str = "data/train/student_best.pt"
    """float student from the train stage (best; student.pt = last)"""
    train_shards: Str = "data/shards/train"
    """representative data for MCT's statistics"""
    val_shards: Str = "data/shards/val"
    """float and INT8 are scored on the same crops"""
    index: Str = "data/prepared/index.parquet"
    """full-image GT masks and categories (as evaluate)"""
    split: Str = "val"
    """the index split the val shards were cut from"""
    tpc_version: Str | Float = "4.0"
    """edgemdt_tpc IMX500 target platform version (1.0, 4.0, 4.1, 5.0)"""
    representative_batches: PositiveIntUpTo(10_000) = 10
    """PicoSAM2 calibrated on 10 batches x 8 crops"""
    batch_size: PositiveIntUpTo(MAX_BATCH) = 8
    """representative batch size"""
    shuffle_buffer: NonNegativeIntUpTo(MAX_SHUFFLE) = 1000
    """draws the representative crops at random from the train shards"""
    gptq_epochs: NonNegativeIntUpTo(10_000) = 0
    """0 = PTQ; N > 0 = gradient-based PTQ (GPTQ) for N epochs over the representative data"""
    eval_batch_size: PositiveIntUpTo(MAX_BATCH) = 64
    max_miou_drop: NonNegativeFloatUpTo(1) = 0.01
    """target: INT8 crop mIoU within this of float (reported, not enforced)"""
    probe_samples: PositiveIntUpTo(MAX_BATCH) = 16
    """val crops kept with the INT8 torch model's logits, for the export stage's checks"""
    out_dir: Str = "data/quantize"

    def validate(self, key: str) -> None:
        # YAML reads an unquoted 4.0 as a number; MCT wants the string "4.0".
        self.tpc_version = str(self.tpc_version)
        if not re.fullmatch(r"\d+\.\d+(_\w+)?", self.tpc_version):
            raise ConfigError(f'{key}.tpc_version: expected a version such as "4.0", got {self.tpc_version!r}')


@dataclass
class ExportConfig(Section):
    """The deliverable ONNX files (MCTQ for the converter, fake-quant for evaluation), checked in onnxruntime."""

    quantized_dir: Str = "data/quantize"
    """the quantize stage's out_dir"""
    mctq_check_samples: PositiveIntUpTo(MAX_BATCH) = 2
    """MCTQ runs ~300x slower than float in onnxruntime: a few probe crops only"""
    max_diff_steps: NonNegativeFloatUpTo(255) = 16.0
    """bound on max |onnx - torch| logits, in output quantisation steps. Two correct INT8 implementations still
    differ: float accumulation order flips a rounding now and then and ~40 quantisers carry it on (trained
    PicoSAM3: up to 9 steps, mean 0.8); a wrong graph is off by tens of steps on most pixels."""
    min_mask_agreement: Float = 0.98
    """bound on the share of mask pixels where onnx and torch agree, in [0, 1]"""
    out_dir: Str = "data/export"

    def validate(self, key: str) -> None:
        if not 0.0 <= self.min_mask_agreement <= 1.0:
            raise ConfigError(f"{key}.min_mask_agreement: expected a share in [0, 1], got {self.min_mask_agreement}")


@dataclass
class PackageConfig(Section):
    """``imxconv-pt`` on the MCTQ export: packerOut.zip, memory report, Raspberry Pi deploy folder
    (``stages/package.py``)."""

    export_dir: Str = "data/export"
    """the export stage's out_dir"""
    input_persistency: Bool = True
    """false = --no-input-persistency: more memory, no input-tensor debug stream"""
    timeout_s: PositiveIntUpTo(7 * 24 * 3600) = 1800
    """the converter takes 15-70 s on two idle cores"""
    out_dir: Str = "data/package"
    """packerOut.zip, memory report, dnnParams.xml, converter.log, deploy/"""
