"""A trained student quantised for the IMX500, scored against its float self on the val shards, and written out.

The quantize stage's work, in the order it runs (:func:`quantize_student`)::

    student, meta, val_index = load_checked_student(q)        # its crops must be the val shards'
    model = camera_input_model(student, meta["normalization"])  # RGB in [0, 1] -> logits (deploy/quantize.py)
    int8 = quantize(model, calibration_batches(q, ...), ...)    # MCT PTQ / GPTQ on crops drawn from the train shards
    report, samples, agreement = score_float_and_int8(q, models, val_index, ...)   # score_table, same crops
    write_quantized_files(work, int8, models, ...)              # the two ONNX files and probe.npz

An untrained student (the trainer's ``untrained`` in the checkpoint's meta: a run too short to train, or no val IoU
gain) is quantised all the same, but said so on stderr (``untrained.warn_untrained``), flagged
``untrained_student: true`` in ``metrics/quantize.json``, and its ONNX files carry the flag and the trainer's warnings
(``untrained.untrained_metadata``), which export keeps and package reads (``untrained.metadata_training_warnings``).

Float and INT8 are scored by the evaluate stage's code (``score_table.evaluate_batches``): crop-space mIoU, the
papers' "mAP@[.5:.95]" and full-image mIoU. MCT's quantised PyTorch model lives only in this process and its
exporter is its only serialisation, so the ONNX files (``onnx_export.export_quantized``) and ``probe.npz`` (val
crops with both models' logits, for the export stage's checks) are written here too.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from picosam_pipeline.config import require_inputs
from picosam_pipeline.data.crop_convention import check_crops
from picosam_pipeline.deploy.onnx_export import (
    QUANTIZE_FAKEQUANT_FILE,
    QUANTIZE_MCTQ_FILE,
    QUANTIZE_PROBE_FILE,
    export_quantized,
)
from picosam_pipeline.deploy.quantize import (
    RgbModel,
    camera_input_model,
    quantize,
    quantized_weight_bytes,
    representative_batches,
)
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.evaluate.plots import size_bars, write_csv
from picosam_pipeline.evaluate.score_table import InstanceGT, evaluate_batches, evaluation_report
from picosam_pipeline.reports import write_report
from picosam_pipeline.train.checkpoints import load_student
from picosam_pipeline.train.loader import make_loader
from picosam_pipeline.train.shards import ShardIndex, read_shard_index
from picosam_pipeline.train.students import PUBLISHED_SIZES_MB, folded_int8_bytes
from picosam_pipeline.untrained import training_warnings, untrained_flag, untrained_metadata, warn_untrained

if TYPE_CHECKING:
    from picosam_pipeline.config import QuantizeConfig
    from picosam_pipeline.device import Runtime

HEADLINE = ("crop_miou", "crop_success_map_50_95", "full_image_miou")  # per model in report.json's metrics


def quantize_inputs(q: QuantizeConfig) -> dict[str, str]:
    """``{param: path}`` of what the quantize stage reads."""
    return {
        "quantize.checkpoint": q.checkpoint,
        "quantize.train_shards": q.train_shards,
        "quantize.val_shards": q.val_shards,
        "quantize.index": q.index,
    }


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize_student` found (its files are written by then)."""

    student: str  # the checkpoint's student (picosam2 / picosam3)
    report: dict[str, Any]  # score_table.evaluation_report of ``student`` (float) and ``student_int8``
    metrics: dict[str, Any]  # report.json's ``metrics``: settings, figures side by side, weights (quantize_figures)
    run: dict[str, Any]  # this run's facts for the run log: {"seconds": {quantize, evaluate, serialize, total}}
    max_miou_drop: float
    training_warnings: list[str] | None = None  # the student is untrained: the trainer's warnings; None: it trained
    checkpoint: str = ""

    @property
    def drop(self) -> float:
        """Float crop mIoU minus INT8 crop mIoU."""
        return self.report["student"]["crop_miou"] - self.report["student_int8"]["crop_miou"]

    def headline(self) -> dict[str, Any]:
        """``metrics/quantize.json``: the INT8 crop mIoU, the drop from float, whether it is within target (the float
        student's crop mIoU, the same number as evaluate's on the same val crops, is in metrics/evaluate.json only)."""
        return {
            "int8_crop_miou": self.report["student_int8"]["crop_miou"],
            "crop_miou_drop": self.drop,
            "int8_within_target": self.drop <= self.max_miou_drop,
            **untrained_flag(self.training_warnings),
        }

    def warn(self) -> None:
        """The warnings on stderr: an untrained student (``untrained.warn_untrained``), INT8 over its target."""
        warn_untrained("quantize", self.checkpoint, self.training_warnings)
        self.warn_over_target()

    def warn_over_target(self) -> None:
        """A warning on stderr when INT8 lost more crop mIoU than ``quantize.max_miou_drop``."""
        if self.drop > self.max_miou_drop:
            int8, float_ = self.report["student_int8"]["crop_miou"], self.report["student"]["crop_miou"]
            print(
                f"warning: INT8 crop mIoU is {self.drop:.4f} below float ({int8:.4f} vs {float_:.4f}), more than "
                f"quantize.max_miou_drop={self.max_miou_drop}; try quantize.gptq_epochs=5 or more representative "
                "batches",
                file=sys.stderr,
            )

    def summary(self) -> dict[str, Any]:
        """What the stage returns: the student, float and INT8 crop mIoU (4 decimals), the wall time."""
        return {
            "student": self.student,
            "float_crop_miou": round(self.report["student"]["crop_miou"], 4),
            "int8_crop_miou": round(self.report["student_int8"]["crop_miou"], 4),
            "seconds": self.run["seconds"]["total"],
            **untrained_flag(self.training_warnings),
        }


def quantize_student(q: QuantizeConfig, runtime: Runtime, work: Path) -> QuantizeResult:
    """Quantise ``q.checkpoint``, score float and INT8 on ``q.val_shards`` and write the quantize folder into ``work``:
    the two ONNX files, ``probe.npz``, ``plots/by_size.csv`` and ``report.json``."""
    require_inputs(quantize_inputs(q))
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    torch.manual_seed(runtime.seed)
    student, meta, val_index = load_checked_student(q)
    untrained = training_warnings(meta)
    warn_untrained("quantize", q.checkpoint, untrained)  # now, and again at the end (QuantizeResult.warn)
    size = int(meta["input_size"])
    model = camera_input_model(student, meta.get("normalization"))

    t0 = time.perf_counter()
    calibration = calibration_batches(q, seed=runtime.seed, input_size=size)
    int8 = quantize(model, calibration, tpc_version=q.tpc_version, gptq_epochs=q.gptq_epochs)
    seconds["quantize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    models = {
        "student": RgbModel(model, f"float {q.checkpoint}", size),
        "student_int8": RgbModel(int8, f"int8 {q.checkpoint}", size),
    }
    report, samples, agreement = score_float_and_int8(q, models, val_index, seed=runtime.seed)
    seconds["evaluate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # The crop convention goes with the model (predict, evaluate-int8 and the deploy folder read it): the student's
    # own record, or the shards' for a student written before checkpoints recorded it.
    crop = meta.get("crop") or val_index.crop
    write_quantized_files(q, work, int8, models, crop=crop, seed=runtime.seed, untrained=untrained)
    seconds["serialize"] = time.perf_counter() - t0

    metrics = quantize_figures(
        q, meta, report, model=model, int8=int8, calibration=calibration, samples=samples, agreement=agreement
    )
    run = {"seconds": {**{k: round(v, 2) for k, v in seconds.items()}, "total": round(time.perf_counter() - start, 2)}}
    # DVC plot: float vs INT8 crop mIoU per COCO size (grouped bars from 0; dvc.yaml `plots:`)
    write_csv(
        work / "plots" / "by_size.csv",
        size_bars(report, ["student", "student_int8"]),
        ["size", "model", "crop_miou", "samples"],
    )
    write_report(
        work,
        {
            "checkpoint": q.checkpoint,
            "crop": crop,
            "student_meta": {k: v for k, v in meta.items() if k != "config"},
            "tpc_version": q.tpc_version,
            "method": metrics["method"],
            "files": {"mctq": QUANTIZE_MCTQ_FILE, "fakequant": QUANTIZE_FAKEQUANT_FILE, "probe": QUANTIZE_PROBE_FILE},
            "evaluation": report,
            "metrics": metrics,
        },
    )
    return QuantizeResult(meta["student"], report, metrics, run, q.max_miou_drop, untrained, q.checkpoint)


def load_checked_student(q: QuantizeConfig) -> tuple[nn.Module, dict[str, Any], ShardIndex]:
    """The student of ``q.checkpoint``, its meta and the val shards' index, checked against each other: its input
    size must be the shards' crop size and its recorded crops (when it records them) the shards'."""
    student, meta = load_student(q.checkpoint)
    size = int(meta["input_size"])
    val_index = read_shard_index(q.val_shards)
    if val_index.frame.crop_size != size:
        raise PipelineError(
            f"quantize.val_shards: {q.val_shards} holds {val_index.frame.crop_size}-px crops but the "
            f"student {q.checkpoint} takes {size}-px input; use the shards packed for this student"
        )
    if meta.get("crop"):
        check_crops(
            val_index.crop,
            str(q.val_shards),
            meta["crop"],
            f"quantize.checkpoint ({q.checkpoint})",
            "quantise it with the shards of its own recipe (recipe.name), or point quantize.checkpoint at the "
            "student trained on these shards",
        )
    return student, meta, val_index


def calibration_batches(q: QuantizeConfig, *, seed: int, input_size: int) -> list[Tensor]:
    """MCT's representative data: ``q.representative_batches`` batches of ``q.batch_size`` crops drawn at random
    (``q.shuffle_buffer``) from the train shards, each float32 (B, 3, S, S) RGB in [0, 1]."""
    train = make_loader(
        q.train_shards,
        batch_size=q.batch_size,
        shuffle_buffer=q.shuffle_buffer,
        num_workers=0,
        seed=seed,
        input_size=input_size,
    )
    return representative_batches(train, q.representative_batches)


def score_float_and_int8(
    q: QuantizeConfig, models: dict[str, RgbModel], val_index: ShardIndex, *, seed: int
) -> tuple[dict[str, Any], int, float | None]:
    """Score ``models`` (``student``: float, ``student_int8``) on the same val crops, in file order.

    Returns:
        the evaluation report of both (``score_table.evaluation_report``), the number of samples, and the share of
        crop pixels where the float and INT8 masks agree (None without pixels).
    """
    agreement = MaskAgreement()
    size = models["student"].input_size
    batches = make_loader(
        q.val_shards, batch_size=q.eval_batch_size, shuffle_buffer=0, num_workers=0, seed=seed, input_size=size
    )
    table, _ = evaluate_batches(
        batches,
        models,
        InstanceGT.from_index(q.index, q.split),
        on_sample=agreement,
        total=val_index.samples,
        teachers=batches.teachers,
    )
    if len(table) == 0:
        raise PipelineError(f"quantize.val_shards: {q.val_shards} yielded no sample; repack the {q.split!r} split")
    return evaluation_report(table, models=list(models)), len(table), agreement.value


def write_quantized_files(
    q: QuantizeConfig,
    work: Path,
    int8: nn.Module,
    models: dict[str, RgbModel],
    *,
    crop: dict[str, Any],
    seed: int,
    untrained: list[str] | None = None,
) -> None:
    """MCT's two ONNX files of ``int8`` (MCTQ and fake-quant) and ``probe.npz`` into ``work``; the ONNX files of an
    untrained student (``untrained``: the trainer's warnings) carry :func:`untrained_metadata`.

    ``probe.npz``: the first ``q.probe_samples`` val crops (``rgb`` float32 (N, 3, S, S) in [0, 1]) with the INT8
    and float models' logits (``int8_logits`` / ``float_logits``, float32 (N, 1, S, S)).
    """
    size = models["student"].input_size
    # The quantised graph starts with the ImageNet normalisation (CameraInputModel): say so in the files, so
    # anything that runs them (predict, evaluate.int8_model) feeds RGB in [0, 1] and does not normalise twice.
    in_graph = {
        "input_normalization": "in_graph",
        "crop": json.dumps(crop, sort_keys=True),
        **untrained_metadata(untrained),
    }
    export_quantized(int8, work / QUANTIZE_MCTQ_FILE, fmt="mctq", input_size=size, metadata=in_graph)
    export_quantized(int8, work / QUANTIZE_FAKEQUANT_FILE, fmt="fakequant", input_size=size, metadata=in_graph)
    probe_batches = make_loader(
        q.val_shards, batch_size=q.probe_samples, shuffle_buffer=0, num_workers=0, seed=seed, input_size=size
    )
    probe = next(iter(probe_batches))["image"].numpy().astype(np.float32)
    np.savez(
        work / QUANTIZE_PROBE_FILE,
        rgb=probe,
        int8_logits=models["student_int8"](probe),
        float_logits=models["student"](probe),
    )


def quantize_figures(
    q: QuantizeConfig,
    meta: dict[str, Any],
    report: dict[str, Any],
    *,
    model: nn.Module,
    int8: nn.Module,
    calibration: list[Tensor],
    samples: int,
    agreement: float | None,
) -> dict[str, Any]:
    """report.json's ``metrics``: the settings, float and INT8 figures (:data:`HEADLINE`) side by side and their
    difference (INT8 - float), mask pixel agreement, whether the crop mIoU drop is within ``q.max_miou_drop``, and
    the INT8 weight bytes beside the papers' INT8 size."""
    float_r, int8_r = report["student"], report["student_int8"]
    weights = {
        "int8_bytes": folded_int8_bytes(model),  # int8 weights + float32 biases after BN folding (students.py)
        "int8_bytes_in_model": quantized_weight_bytes(int8),  # counted in the MCT model (zero biases included)
        "params": sum(p.numel() for p in model.parameters()),
        "published_int8_mb": PUBLISHED_SIZES_MB[meta["student"]][1],  # the papers' figure, params x 1 B in MiB
    }
    weights["int8_mib"] = weights["int8_bytes"] / 2**20
    drop = float_r["crop_miou"] - int8_r["crop_miou"]
    return {
        "student": meta["student"],
        "input_size": int(meta["input_size"]),
        "tpc_version": q.tpc_version,
        "method": f"gptq ({q.gptq_epochs} epochs)" if q.gptq_epochs else "ptq",
        "representative_samples": sum(len(b) for b in calibration),
        "samples": samples,
        "float": {k: float_r[k] for k in HEADLINE},
        "int8": {k: int8_r[k] for k in HEADLINE},
        "delta": {k: _delta(int8_r[k], float_r[k]) for k in HEADLINE},  # int8 - float
        "mask_pixel_agreement": agreement,
        "max_miou_drop": q.max_miou_drop,
        "int8_within_target": drop <= q.max_miou_drop,
        "weights": weights,
    }


class MaskAgreement:
    """``on_sample`` hook of ``evaluate_batches``: share of crop pixels where float and INT8 masks agree."""

    def __init__(self) -> None:
        self.agree = 0
        self.pixels = 0

    def __call__(self, sample: dict[str, Any]) -> None:
        logits = sample["logits"]
        self.agree += int(np.count_nonzero((logits["student"] > 0) == (logits["student_int8"] > 0)))
        self.pixels += logits["student"].size

    @property
    def value(self) -> float | None:
        return self.agree / self.pixels if self.pixels else None


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b
