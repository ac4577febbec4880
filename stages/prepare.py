"""Stage ``prepare``: COCO / LVIS instances JSON -> instance index (Parquet) + bad-input report.

For every split in ``prepare.splits``: load the annotations, check each referenced image once, check each annotation
and decode its mask, apply the selection (non-crowd, ``area >= min_area``, ROI side ``>= min_roi_side``), and compute
both prompt conventions (``picosam_pipeline.data.prepare_index``). Outputs in ``prepare.out_dir``:

* ``index.parquet``     one row per kept instance (schema in ``picosam_pipeline.data.index``);
* ``bad_inputs.jsonl``  one JSON record per dropped or converted bad input (split, kind, ids, file, reason, action);
* ``report.json``       per split: kept / dropped by reason / converted by kind, the dataset's format;
* ``config.resolved.json``; and ``metrics/prepare.json``: the headline, instances kept and dropped.

``prepare.on_bad_input``: ``skip`` drops a bad input and reports it; ``strict`` stops at the first one with a
message naming the file and the fix. Conversions (bbox clipped, grayscale -> RGB, EXIF rotation, ...) and
selection drops (crowd, small) never stop the stage. Every annotation is counted exactly once, as kept or
under one drop reason, so ``kept + sum(dropped) == annotations`` per split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from picosam_pipeline.config import Config, require_inputs
from picosam_pipeline.data.index import INDEX_FILE
from picosam_pipeline.data.prepare_index import BAD_INPUTS_FILE, WORK_FILES, prepare_index
from picosam_pipeline.datasets import check_dataset
from picosam_pipeline.device import Runtime
from picosam_pipeline.outputs import StageOutput, save_resolved
from picosam_pipeline.reports import write_metrics, write_report


def output(cfg: Config) -> StageOutput:
    """``prepare.out_dir``: replaced whole, only when it holds an earlier index (outputs.py); never the dataset."""
    p = cfg.prepare
    return StageOutput(
        cfg,
        "prepare",
        "prepare.out_dir",
        p.out_dir,
        sections=["prepare"],
        names=(INDEX_FILE, BAD_INPUTS_FILE, *WORK_FILES),
        what="instance index",
        inputs=p.input_paths("prepare"),
        writes={"runtime.metrics_dir": cfg.runtime.metrics_dir},
    )


def run(cfg: Config, runtime: Runtime | None = None) -> dict[str, Any]:
    """Build ``<prepare.out_dir>/index.parquet`` from every split; returns kept / dropped totals.

    ``runtime`` is unused: prepare runs on the CPU (pycocotools, PIL) whatever the device.
    """
    p = cfg.prepare
    with output(cfg) as work:  # <out_dir>.partial, renamed to out_dir when the block ends
        folder = Path(cfg.dataset.folder)
        in_dataset = [
            (s.name, s.annotations, s.images)
            for s in p.splits
            if folder in Path(s.annotations).parents and folder in Path(s.images).parents
        ]
        check_dataset(cfg.dataset.name, folder, in_dataset)  # names `fetch` / the sample stage for a missing dataset
        require_inputs(p.input_paths("prepare"))
        prepared = prepare_index(p, work)
        save_resolved(cfg, work, ["prepare"])
        write_report(work, prepared.report())
        # Headline: what was kept and dropped; per split, by reason and by kind of conversion in report.json.
        dropped = prepared.dropped
        write_metrics(cfg, "prepare", {"kept": prepared.kept, "dropped": sum(dropped.values())})
    return {"kept": prepared.kept, "dropped": dict(sorted(dropped.items())), "index": str(Path(p.out_dir) / INDEX_FILE)}
