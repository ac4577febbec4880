"""Typed pipeline configuration, loaded once from ``params.yaml``.

One dataclass per ``params.yaml`` section; :class:`Config` holds them all. Loading checks every key
against the dataclass fields (unknown keys, wrong types and impossible values are rejected with a
message naming the key and the expected form) before any stage does work. Stages receive the
resolved :class:`Config` and write it beside their outputs with :func:`save_resolved`.

Paths are strings relative to the working directory (the repository root when run by DVC).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from picosam_pipeline.errors import PipelineError


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

    def validate(self, key: str) -> None:
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"{key}.device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class SampleConfig:
    """The built-in synthetic COCO-format dataset (``stages/sample.py``)."""

    out_dir: str = "data/sample"
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
                f"one, one for the bad annotations), got {self.train_images}; raise it or set {key}.plant_bad_inputs=false"
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

    splits: list[SplitSource] = field(
        default_factory=lambda: [
            SplitSource("train", "data/sample/annotations/instances_train.json", "data/sample/train"),
            SplitSource("val", "data/sample/annotations/instances_val.json", "data/sample/val"),
        ]
    )
    dataset_format: Literal["auto", "coco", "lvis"] = "auto"
    min_area: float = 0.0  # in pixels, COCO ``area`` (mask area)
    min_roi_side: float = 4.0  # px; PicoSAM3 skips ROIs with a side < 4 px
    roi_padding: float = 0.1  # fraction of w/h added per side before squaring (PicoSAM3)
    point_crop_size: int = 96  # px; PicoSAM2 fixed native-resolution window
    check_images: bool = True  # decode every image once to catch missing / corrupt files
    on_bad_input: Literal["skip", "strict"] = "skip"
    out_dir: str = "data/prepared"

    def validate(self, key: str) -> None:
        if not self.splits:
            raise ConfigError(f"{key}.splits: expected at least one {{name, annotations, images}} entry")
        names = [s.name for s in self.splits]
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


SAM2_MODELS = ("sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus", "sam2.1_hiera_large",
               "sam2_hiera_tiny", "sam2_hiera_small", "sam2_hiera_base_plus", "sam2_hiera_large")


@dataclass
class TeacherConfig:
    """The teacher pass: SAM2/SAM3 run once per image, soft logits into a Zarr v3 store (``stages/teacher_logits.py``)."""

    index: str = "data/prepared/index.parquet"
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    model: str = "sam2.1_hiera_tiny"  # one of SAM2_MODELS, or "sam3" (needs the optional sam3 extra)
    checkpoint: str | None = "data/checkpoints/sam2.1_hiera_tiny.pt"
    allow_random_weights: bool = False  # run with random weights when the checkpoint is missing (tests, sample)
    prompt: Literal["roi", "point"] = "roi"  # roi: PicoSAM3 box prompt + ROI crop; point: PicoSAM2 point + 96-px window
    multimask_output: bool = True  # ask for 3 masks and keep the one with the highest predicted IoU
    store_size: int = 96  # logits stored at store_size x store_size in the crop frame
    context_margin: float = 0.0  # extra fraction of the crop side stored on each side (for train-time jitter)
    codec: Literal["sigmoid_uint8", "float16", "linear_uint8"] = "sigmoid_uint8"
    compression_level: int = 5  # Blosc-zstd level, 1..9
    instances_per_shard: int = 256  # instances per Zarr shard file (= per dask task)
    scheduler_address: str | None = None  # existing dask scheduler (tcp://host:8786); None = LocalCluster
    n_workers: int = 0  # LocalCluster workers; 0 = one per GPU, else 1
    threads_per_worker: int = 0  # 0 = all cores / workers
    out: str = "data/teacher/logits.zarr"

    def validate(self, key: str) -> None:
        if self.model not in SAM2_MODELS + ("sam3",):
            raise ConfigError(f"{key}.model: expected one of {list(SAM2_MODELS) + ['sam3']}, got {self.model!r}")
        if not self.splits:
            raise ConfigError(f"{key}.splits: expected at least one split name, e.g. [train, val]")
        _positive(key, "store_size", self.store_size)
        _positive(key, "instances_per_shard", self.instances_per_shard)
        _non_negative(key, "n_workers", self.n_workers)
        _non_negative(key, "threads_per_worker", self.threads_per_worker)
        if not 0.0 <= self.context_margin <= 1.0:
            raise ConfigError(f"{key}.context_margin: expected a fraction in [0, 1], got {self.context_margin}")
        if not 1 <= self.compression_level <= 9:
            raise ConfigError(f"{key}.compression_level: expected an integer 1..9, got {self.compression_level}")


@dataclass
class Config:
    """The whole pipeline configuration (one attribute per ``params.yaml`` section)."""

    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        if not path.is_file():
            raise ConfigError(f"params file {str(path)!r} does not exist; pass --params FILE or run from the repository root")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"params file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"params file {str(path)!r}: expected a mapping of sections at the top level")
    for item in overrides:
        apply_override(raw, item)
    return build(Config, raw, "")


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
        raise ConfigError(f"{where}: expected a mapping with keys {sorted(f.name for f in dataclasses.fields(cls))}, got {data!r}")
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
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {args}")
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
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has unsupported type {tp!r}")  # programming error


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _positive(section: str, name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{section}.{name}: expected a positive number, got {value}")


def _non_negative(section: str, name: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{section}.{name}: expected a number >= 0, got {value}")


# --------------------------------------------------------------------------------------------------
# helpers for stages


def require_inputs(paths: dict[str, str]) -> None:
    """Raise :class:`ConfigError` for the first ``{key: path}`` whose path does not exist."""
    for key, p in paths.items():
        if not Path(p).exists():
            raise ConfigError(f"{key}: path {p!r} does not exist; fix the path in params.yaml or with --set {key}=PATH")


def write_metrics(cfg: Config, stage: str, metrics: dict[str, Any]) -> Path:
    """Write ``metrics/<stage>.json`` (what ``dvc metrics show`` reads)."""
    out = Path(cfg.runtime.metrics_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{stage}.json"
    target.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return target


def save_resolved(cfg: Config, out_dir: str | Path, sections: list[str]) -> Path:
    """Write the sections a stage read (resolved, defaults filled in) to ``out_dir/config.resolved.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full = cfg.to_dict()
    target = out / "config.resolved.json"
    target.write_text(json.dumps({s: full[s] for s in sections}, indent=2, sort_keys=True) + "\n")
    return target
