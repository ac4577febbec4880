"""Stage ``quantize``: MCT INT8 quantisation of the trained student for the IMX500, scored against float.

Reads the student checkpoint (``quantize.checkpoint``), draws ``representative_batches`` x ``batch_size`` crops
at random from the train shards, wraps the student with its input normalisation (the camera feeds RGB; see
``picosam_pipeline/deploy/quantize.py``) and quantises it with MCT for the IMX500 target platform
``tpc_version`` (PTQ, or GPTQ when ``gptq_epochs > 0``). Float and INT8 are then scored on the same val
shards by the evaluate stage's code (``score_table.evaluate_batches``): crop-space mIoU, the papers'
"mAP@[.5:.95]" and full-image mIoU.

MCT's quantised PyTorch model lives only in this process and its exporter is its only serialisation, so
this stage writes it, in ``quantize.out_dir``:

* ``quantized_mctq.onnx`` / ``quantized_fakequant.onnx``: MCT's two ONNX formats (``onnx_export.py``);
* ``probe.npz``: ``probe_samples`` val crops (``rgb`` float32 (N, 3, S, S) in [0, 1]) with the INT8 torch model's
  and the float model's logits (``int8_logits`` / ``float_logits``, (N, 1, S, S)): the export stage checks the
  ONNX files against them;
* ``report.json``: the student's meta (its crop convention included), the quantisation settings, both models' full
  evaluation report; the ONNX files carry the crop convention too (metadata ``picosam.crop``, JSON);
* ``plots/by_size.csv``: float and INT8 crop mIoU per COCO size (a DVC plot);
* ``config.resolved.json``; and ``metrics/quantize.json``: the headline (float and INT8 crop mIoU, the drop, whether
  it is within quantize.max_miou_drop); ``report.json`` holds the full figures: float and INT8 side by side, their
  difference, mask pixel agreement, INT8 weight bytes beside the papers' INT8 sizes, and the time of each step.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np

from picosam_pipeline.config import Config, require_inputs
from picosam_pipeline.deploy.onnx_export import (
    QUANTIZE_FAKEQUANT_FILE as FAKEQUANT_FILE,
)
from picosam_pipeline.deploy.onnx_export import (
    QUANTIZE_MCTQ_FILE as MCTQ_FILE,
)
from picosam_pipeline.deploy.onnx_export import (
    QUANTIZE_PROBE_FILE as PROBE_FILE,
)
from picosam_pipeline.deploy.onnx_export import (
    QUANTIZE_REPORT_FILE as REPORT_FILE,
)
from picosam_pipeline.device import Runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.outputs import StageOutput, output_folder, save_resolved, writes_output
from picosam_pipeline.reports import write_metrics

HEADLINE = ("crop_miou", "crop_success_map_50_95", "full_image_miou")


def output(cfg: Config) -> StageOutput:
    """``quantize.out_dir``: replaced whole, only when it holds an earlier quantize output (outputs.py)."""
    q = cfg.quantize
    return StageOutput(
        cfg,
        "quantize",
        "quantize.out_dir",
        q.out_dir,
        sections=["quantize"],
        what="quantised model",
        names=(MCTQ_FILE, FAKEQUANT_FILE, PROBE_FILE, REPORT_FILE, "plots/"),
        inputs={
            "quantize.checkpoint": q.checkpoint,
            "quantize.train_shards": q.train_shards,
            "quantize.val_shards": q.val_shards,
            "quantize.index": q.index,
        },
        writes={"runtime.metrics_dir": cfg.runtime.metrics_dir},
    )


@writes_output(output)
def run(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    """Quantise, score, serialise; returns float and INT8 crop mIoU and the wall time."""
    import torch

    from picosam_pipeline.data.crops import convention_differences
    from picosam_pipeline.deploy.onnx_export import export_quantized
    from picosam_pipeline.deploy.quantize import (
        RgbModel,
        camera_input_model,
        quantize,
        quantized_weight_bytes,
        representative_batches,
    )
    from picosam_pipeline.evaluate.plots import size_bars, write_csv
    from picosam_pipeline.evaluate.score_table import InstanceGT, evaluate_batches, evaluation_report
    from picosam_pipeline.train.checkpoints import load_student
    from picosam_pipeline.train.loader import make_loader
    from picosam_pipeline.train.shards import read_shard_index
    from picosam_pipeline.train.students import PUBLISHED_SIZES_MB, folded_int8_bytes

    q = cfg.quantize
    require_inputs(
        {
            "quantize.checkpoint": q.checkpoint,
            "quantize.train_shards": q.train_shards,
            "quantize.val_shards": q.val_shards,
            "quantize.index": q.index,
        }
    )
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    torch.manual_seed(runtime.seed)

    student, meta = load_student(q.checkpoint)
    size = int(meta["input_size"])
    val_index = read_shard_index(q.val_shards)
    if val_index.frame.crop_size != size:
        raise PipelineError(
            f"quantize.val_shards: {q.val_shards} holds {val_index.frame.crop_size}-px crops but the "
            f"student {q.checkpoint} takes {size}-px input; use the shards packed for this student"
        )
    differences = convention_differences(meta.get("crop"), val_index.crop) if meta.get("crop") else []
    if differences:
        raise PipelineError(
            f"quantize.checkpoint: {q.checkpoint} was trained on {meta['crop']['convention']} crops but "
            f"{q.val_shards} holds {val_index.crop['convention']} crops ({'; '.join(differences)}); quantise "
            "it with the shards of its own recipe (recipe.name), or point quantize.checkpoint at the student "
            "trained on these shards"
        )
    model = camera_input_model(student, meta.get("normalization"))

    t0 = time.perf_counter()
    train = make_loader(
        q.train_shards,
        batch_size=q.batch_size,
        shuffle_buffer=q.shuffle_buffer,
        num_workers=0,
        seed=runtime.seed,
        input_size=size,
    )
    calibration = representative_batches(train, q.representative_batches)
    int8 = quantize(model, calibration, tpc_version=q.tpc_version, gptq_epochs=q.gptq_epochs)
    seconds["quantize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    models = {
        "student": RgbModel(model, f"float {q.checkpoint}", size),
        "student_int8": RgbModel(int8, f"int8 {q.checkpoint}", size),
    }
    agreement = _MaskAgreement()
    batches = make_loader(
        q.val_shards, batch_size=q.eval_batch_size, shuffle_buffer=0, num_workers=0, seed=runtime.seed, input_size=size
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
    report = evaluation_report(table, models=list(models))
    seconds["evaluate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    out = output_folder(q.out_dir)  # <out_dir>.partial, renamed to out_dir when this returns: no stale files survive
    # The quantised graph starts with the ImageNet normalisation (CameraInputModel): say so in the files, so
    # anything that runs them (predict, evaluate.int8_model) feeds RGB in [0, 1] and does not normalise twice.
    # The crop convention goes with the model (predict, evaluate-int8 and the deploy folder read it): the student's
    # own record, or the shards' for a student written before checkpoints recorded it.
    in_graph = {
        "input_normalization": "in_graph",
        "crop": json.dumps(meta.get("crop") or val_index.crop, sort_keys=True),
    }
    export_quantized(int8, out / MCTQ_FILE, fmt="mctq", input_size=size, metadata=in_graph)
    export_quantized(int8, out / FAKEQUANT_FILE, fmt="fakequant", input_size=size, metadata=in_graph)
    probe = (
        next(
            iter(
                make_loader(
                    q.val_shards,
                    batch_size=q.probe_samples,
                    shuffle_buffer=0,
                    num_workers=0,
                    seed=runtime.seed,
                    input_size=size,
                )
            )
        )["image"]
        .numpy()
        .astype(np.float32)
    )
    np.savez(
        out / PROBE_FILE, rgb=probe, int8_logits=models["student_int8"](probe), float_logits=models["student"](probe)
    )
    seconds["serialize"] = time.perf_counter() - t0

    float_r, int8_r = report["student"], report["student_int8"]
    weights = {
        "int8_bytes": folded_int8_bytes(model),  # int8 weights + float32 biases after BN folding (students.py)
        "int8_bytes_in_model": quantized_weight_bytes(int8),  # counted in the MCT model (zero biases included)
        "params": sum(p.numel() for p in model.parameters()),
        "published_int8_mb": PUBLISHED_SIZES_MB[meta["student"]][1],  # the papers' figure, params x 1 B in MiB
    }
    weights["int8_mib"] = weights["int8_bytes"] / 2**20
    drop = float_r["crop_miou"] - int8_r["crop_miou"]
    metrics = {
        "student": meta["student"],
        "input_size": size,
        "tpc_version": q.tpc_version,
        "method": f"gptq ({q.gptq_epochs} epochs)" if q.gptq_epochs else "ptq",
        "representative_samples": sum(len(b) for b in calibration),
        "samples": len(table),
        "float": {k: float_r[k] for k in HEADLINE},
        "int8": {k: int8_r[k] for k in HEADLINE},
        "delta": {k: _delta(int8_r[k], float_r[k]) for k in HEADLINE},  # int8 - float
        "mask_pixel_agreement": agreement.value,
        "max_miou_drop": q.max_miou_drop,
        "int8_within_target": drop <= q.max_miou_drop,
        "weights": weights,
    }
    run = {"seconds": {**{k: round(v, 2) for k, v in seconds.items()}, "total": round(time.perf_counter() - start, 2)}}
    # DVC plot: float vs INT8 crop mIoU per COCO size (grouped bars from 0; dvc.yaml `plots:`)
    write_csv(
        out / "plots" / "by_size.csv",
        size_bars(report, ["student", "student_int8"]),
        ["size", "model", "crop_miou", "samples"],
    )
    (out / REPORT_FILE).write_text(
        json.dumps(
            {
                "checkpoint": q.checkpoint,
                "crop": meta.get("crop") or val_index.crop,
                "student_meta": {k: v for k, v in meta.items() if k != "config"},
                "tpc_version": q.tpc_version,
                "method": metrics["method"],
                "files": {"mctq": MCTQ_FILE, "fakequant": FAKEQUANT_FILE, "probe": PROBE_FILE},
                "evaluation": report,
                "metrics": metrics,
            },
            indent=1,
            sort_keys=True,
        )
        + "\n"
    )
    save_resolved(cfg, out, ["quantize"])
    # Headline: float vs INT8 side by side and the drop; the full evaluation and weight counts are in report.json.
    write_metrics(
        cfg,
        "quantize",
        {
            "float_crop_miou": float_r["crop_miou"],
            "int8_crop_miou": int8_r["crop_miou"],
            "crop_miou_drop": drop,
            "int8_within_target": drop <= q.max_miou_drop,
        },
        run,
    )
    if drop > q.max_miou_drop:
        print(
            f"warning: INT8 crop mIoU is {drop:.4f} below float ({int8_r['crop_miou']:.4f} vs "
            f"{float_r['crop_miou']:.4f}), more than quantize.max_miou_drop={q.max_miou_drop}; try "
            "quantize.gptq_epochs=5 or more representative batches",
            file=sys.stderr,
        )
    return {
        "student": meta["student"],
        "float_crop_miou": round(float_r["crop_miou"], 4),
        "int8_crop_miou": round(int8_r["crop_miou"], 4),
        "seconds": run["seconds"]["total"],
    }


class _MaskAgreement:
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
