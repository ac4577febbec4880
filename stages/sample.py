"""Stage ``sample``: write the built-in synthetic COCO-format dataset (see ``picosam_pipeline/data/sample.py``).

Reads nothing; writes ``sample.out_dir`` (JSON, images, ``BAD_INPUTS.md``, ``config.resolved.json``) and
``metrics/sample.json`` (images, annotations and planted bad inputs in all; run-stage prints them per split).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from picosam_pipeline.config import Config
from picosam_pipeline.data.sample import MANAGED, generate
from picosam_pipeline.device import Runtime
from picosam_pipeline.outputs import StageOutput, save_resolved
from picosam_pipeline.reports import write_metrics


def output(cfg: Config) -> StageOutput:
    """``sample.out_dir``: replaced whole, only when it holds an earlier sample (outputs.py)."""
    return StageOutput(
        cfg,
        "sample",
        "sample.out_dir",
        cfg.sample.out_dir,
        sections=["sample"],
        names=MANAGED,
        what="sample dataset",
        inputs={},
        writes={"runtime.metrics_dir": cfg.runtime.metrics_dir},
    )


def run(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    """Generate the sample from ``cfg.sample`` (its own seed; ``runtime`` is unused: no tensors here)."""
    with output(cfg) as work:  # <out_dir>.partial, renamed to out_dir when the block ends
        summary = generate(dataclasses.replace(cfg.sample, out_dir=str(work)))
        save_resolved(cfg, work, ["sample"])
        # Headline totals; the per-split counts are the returned summary (printed by run-stage) and the JSON files.
        write_metrics(
            cfg,
            "sample",
            {
                "images": sum(summary["images"].values()),
                "annotations": sum(summary["annotations"].values()),
                "bad_inputs": summary["bad_inputs"],
            },
        )
    return summary
