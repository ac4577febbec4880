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


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    sections: tuple[str, ...]
    reads: str
    writes: str

    def load(self) -> Callable:
        return importlib.import_module(self.module).run


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in [
        StageSpec(
            "sample",
            "stages.sample",
            ("sample",),
            reads="nothing (deterministic generator)",
            writes="data/sample/: COCO-format JSON + JPEG images, bad inputs included",
        ),
        StageSpec(
            "prepare",
            "stages.prepare",
            ("prepare",),
            reads="COCO / LVIS instances JSON + image folders (prepare.splits)",
            writes="data/prepared/index.parquet (one row per instance), bad_inputs.jsonl, metrics/prepare.json",
        ),
        StageSpec(
            "teacher-logits",
            "stages.teacher_logits",
            ("teacher", "runtime"),
            reads="data/prepared/index.parquet + the images it names; the teacher checkpoint (teacher.checkpoint)",
            writes="data/teacher/logits.zarr (soft logits per instance, Zarr v3 shards), metrics/teacher-logits.json",
        ),
        StageSpec(
            "pack",
            "stages.pack",
            ("pack",),
            reads="data/prepared/index.parquet + the images + data/teacher/logits.zarr",
            writes="data/shards/<split>/: WebDataset shards (crop JPEG, mask + logits PNG, JSON) + shards.json, metrics/pack.json",
        ),
        StageSpec(
            "train",
            "stages.train",
            ("train", "runtime"),
            reads="data/shards/train + data/shards/val",
            writes="data/train/student.pt (+ checkpoint.pt, resumable), metrics/train.json, plots metrics/train_steps.csv + train_val.csv",
        ),
        StageSpec(
            "evaluate",
            "stages.evaluate",
            ("evaluate", "runtime"),
            reads="data/shards/val + data/train/student.pt + data/prepared/index.parquet (optional: int8 ONNX, LVIS JSON + images)",
            writes="data/evaluate/ (report.json, per_sample.csv, plots/, grid.png), metrics/evaluate.json",
        ),
        StageSpec(
            "quantize",
            "stages.quantize",
            ("quantize", "runtime"),
            reads="data/train/student.pt + data/shards/train (representative crops) + data/shards/val + data/prepared/index.parquet",
            writes="data/quantize/ (MCT's MCTQ + fake-quant ONNX, probe.npz, report.json), metrics/quantize.json (float vs INT8)",
        ),
        StageSpec(
            "export",
            "stages.export",
            ("export",),
            reads="data/quantize/",
            writes="data/export/ (picosam_int8.onnx for the converter, picosam_int8_fakequant.onnx, picosam_int8.json), metrics/export.json",
        ),
        StageSpec(
            "package",
            "stages.package",
            ("package",),
            reads="data/export/picosam_int8.onnx + picosam_int8.json (needs Java 17 for imxconv-pt)",
            writes="data/package/ (packerOut.zip, memory report, dnnParams.xml, deploy/ for the Raspberry Pi), metrics/package.json",
        ),
    ]
}
