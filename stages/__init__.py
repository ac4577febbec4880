"""Pipeline stages: one module per stage, each exposing ``run(cfg, runtime) -> dict``.

A stage is a plain function over the typed :class:`~picosam_pipeline.config.Config`; it runs without DVC
and without dask (``dvc.yaml`` and the teacher's dask cluster wrap it). ``STAGES`` lists them in pipeline
order, with the params sections each reads (what ``dvc.yaml`` lists as ``params``) and one line on what it
reads and writes (what ``picosam-pipeline stages`` prints).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

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
            writes="data/prepared/index.parquet (one row per instance), bad_inputs.jsonl, metrics/prepare.json",
        ),
        StageSpec(
            "teacher-logits",
            "picosam_pipeline.stages.teacher_logits",
            ("teacher", "runtime"),
            reads="data/prepared/index.parquet + the images it names; the teacher checkpoint (teacher.checkpoint)",
            writes="data/teacher/stores/NAME.zarr per teacher pass (soft logits per instance, Zarr v3 shards), "
                   "metrics/teacher-logits@NAME.json; run one pass as teacher-logits@NAME",
        ),
        StageSpec(
            "pack",
            "picosam_pipeline.stages.pack",
            ("pack",),
            reads="data/prepared/index.parquet + the images + data/teacher/stores/NAME.zarr of each pack.teachers",
            writes="data/shards/<split>/: WebDataset shards (crop JPEG, mask + logits PNG, JSON) + shards.json, metrics/pack.json",
        ),
        StageSpec(
            "train",
            "picosam_pipeline.stages.train",
            ("train", "runtime"),
            reads="data/shards/train + data/shards/val",
            writes="data/train/student.pt (+ checkpoint.pt, resumable), metrics/train.json, plots metrics/train_steps.csv + train_val.csv",
        ),
        StageSpec(
            "evaluate",
            "picosam_pipeline.stages.evaluate",
            ("evaluate", "runtime"),
            reads="data/shards/val + data/train/student.pt + data/prepared/index.parquet (optional: int8 ONNX, LVIS JSON + images)",
            writes="data/evaluate/ (report.json, per_sample.csv, plots/, grid.png), metrics/evaluate.json",
        ),
        StageSpec(
            "quantize",
            "picosam_pipeline.stages.quantize",
            ("quantize", "runtime"),
            reads="data/train/student.pt + data/shards/train (representative crops) + data/shards/val + data/prepared/index.parquet",
            writes="data/quantize/ (MCT's MCTQ + fake-quant ONNX, probe.npz, report.json), metrics/quantize.json (float vs INT8)",
            extra="imx500",
        ),
        StageSpec(
            "export",
            "picosam_pipeline.stages.export",
            ("export",),
            reads="data/quantize/",
            writes="data/export/ (picosam_int8.onnx for the converter, picosam_int8_fakequant.onnx, picosam_int8.json), metrics/export.json",
            extra="imx500",
        ),
        StageSpec(
            "package",
            "picosam_pipeline.stages.package",
            ("package",),
            reads="data/export/picosam_int8.onnx + picosam_int8.json (needs Java 17 for imxconv-pt)",
            writes="data/package/ (packerOut.zip, memory report, dnnParams.xml, deploy/ for the Raspberry Pi), metrics/package.json",
            extra="imx500",
        ),
    ]
}
