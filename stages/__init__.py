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
    ]
}
