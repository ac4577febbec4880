"""Pipeline stages: one module per stage, each exposing ``run(cfg, runtime) -> dict``.

A stage is a plain function over the typed :class:`~picosam_pipeline.config.Config`; it runs without DVC
and without dask (``dvc.yaml`` and the teacher's dask cluster wrap it). ``STAGES`` lists them in pipeline
order, with the params sections each reads (what ``dvc.yaml`` lists as ``params``) and one line on what it
reads and writes (what ``picosam-pipeline stages`` prints).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from picosam_pipeline.errors import require_extra


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    sections: tuple[str, ...]
    reads: str
    writes: str
    extra: str | None = None  # the pyproject extra the stage needs beyond the base install

    def load(self) -> Callable:
        """The stage's ``run``, after checking that its optional dependencies are installed."""
        if self.extra:
            require_extra(self.extra, f"stage {self.name}")
        return importlib.import_module(self.module).run


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in [
        StageSpec(
            "sample",
            "picosam_pipeline.stages.sample",
            ("sample",),
            reads="nothing (deterministic generator)",
            writes="data/datasets/sample/: COCO-format JSON + JPEG images, bad inputs included",
        ),
        StageSpec(
            "prepare",
            "picosam_pipeline.stages.prepare",
            ("prepare",),
            reads="COCO / LVIS instances JSON + image folders (prepare.splits)",
            writes="data/prepared/index.parquet (one row per instance), bad_inputs.jsonl, report.json, "
            "metrics/prepare.json",
        ),
        StageSpec(
            "teacher-logits",
            "picosam_pipeline.stages.teacher_logits",
            ("teacher", "recipe", "runtime"),
            reads="data/prepared/index.parquet + the images it names; the teacher checkpoint (teacher.checkpoint)",
            writes="data/teacher/stores/NAME.zarr per teacher pass (soft logits per instance, Zarr v3 shards), "
            "metrics/teacher-logits@NAME.json; run one pass as teacher-logits@NAME",
        ),
        StageSpec(
            "pack",
            "picosam_pipeline.stages.pack",
            ("pack", "recipe", "teacher"),
            reads="data/prepared/index.parquet + the images + data/teacher/stores/NAME.zarr of each pack.teachers",
            writes="data/shards/<split>/: WebDataset shards (crop JPEG, mask + logits PNG, JSON) + shards.json, "
            "report.json, metrics/pack.json",
        ),
        StageSpec(
            "train",
            "picosam_pipeline.stages.train",
            ("train", "recipe", "runtime"),
            reads="data/shards/train + data/shards/val",
            writes="data/train/student.pt (last) + student_best.pt (best val IoU) (+ data/train.state/checkpoint.pt, "
            "resumable) and report.json, metrics/train.json, dvclive log metrics/train/ (step plots, live summary)",
        ),
        StageSpec(
            "evaluate",
            "picosam_pipeline.stages.evaluate",
            ("evaluate", "runtime"),
            reads="data/shards/val + data/train/student_best.pt + data/prepared/index.parquet (optional: int8 ONNX, "
            "LVIS JSON + images)",
            writes="data/evaluate/ (report.json, per_sample.csv, plots/, grid.png; predictions.json + .crop.json when "
            "asked), metrics/evaluate.json",
        ),
        StageSpec(
            "quantize",
            "picosam_pipeline.stages.quantize",
            ("quantize", "runtime"),
            reads="data/train/student_best.pt + data/shards/train (representative crops) + data/shards/val + "
            "data/prepared/index.parquet",
            writes="data/quantize/ (MCT's MCTQ + fake-quant ONNX, probe.npz, report.json, plots/), "
            "metrics/quantize.json (float vs INT8)",
            extra="imx500",
        ),
        StageSpec(
            "export",
            "picosam_pipeline.stages.export",
            ("export",),
            reads="data/quantize/",
            writes="data/export/ (picosam_int8.onnx for the converter, picosam_int8_fakequant.onnx, picosam_int8.json, "
            "report.json), metrics/export.json",
            extra="imx500",
        ),
        StageSpec(
            "evaluate-int8",
            "picosam_pipeline.stages.evaluate_int8",
            ("evaluate", "runtime"),
            reads="data/shards/val + data/train/student_best.pt + data/export/picosam_int8_fakequant.onnx + "
            "data/prepared/index.parquet",
            writes="data/evaluate-int8/ (float, teacher and INT8 side by side: report.json, per_sample.csv, plots/, "
            "grid.png with the INT8 column), metrics/evaluate-int8.json",
            extra="imx500",
        ),
        StageSpec(
            "package",
            "picosam_pipeline.stages.package",
            ("package",),
            reads="data/export/picosam_int8.onnx + picosam_int8.json (needs Java 17 for imxconv-pt)",
            writes="data/package/ (packerOut.zip, memory report, dnnParams.xml, deploy/ for the Raspberry Pi, "
            "report.json), metrics/package.json",
            extra="imx500",
        ),
    ]
}
