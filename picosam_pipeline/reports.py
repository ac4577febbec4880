"""What a stage writes besides its outputs: headline metrics, the details report, and the per-machine run log.

* ``metrics/<stage>.json`` (:func:`write_metrics`): the few headline numbers experiments are compared by (``dvc
  metrics show``, ``dvc exp show``);
* ``<out_dir>/report.json`` (:func:`write_report`): the stage's detailed figures, a part of its DVC output;
* ``metrics/runs/<stage>.jsonl``: this run's own facts (seconds, rates, the device), one JSON line per run,
  git-ignored (:func:`last_run` reads the latest back).

The first two hold only figures the stage's inputs and params determine, so a rerun that changes nothing leaves
them byte-identical, and are written through a temporary sibling and a rename: a kill never leaves one half written.
The run log only grows, a line per run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from picosam_pipeline.outputs import REPORT_FILE, atomic_write_bytes

if TYPE_CHECKING:
    from picosam_pipeline.config import Config

RUN_LOG_DIR = "runs"  # inside runtime.metrics_dir: one JSON line per stage run, git-ignored, not a DVC output


def write_metrics(cfg: Config, stage: str, metrics: dict[str, Any], run: dict[str, Any] | None = None) -> Path:
    """Write ``metrics/<stage>.json`` (what ``dvc metrics show`` reads) and log this run's facts.

    ``metrics`` are the stage's headline numbers (at most ~12, flat where possible: every nested key is a column of
    ``dvc exp show``); details go to :func:`write_report`. They hold only figures that the stage's inputs and params
    determine, so a rerun that changes nothing leaves the file byte-identical and ``dvc status`` clean. ``run`` holds
    what belongs to this run alone (seconds, rates, what was computed this time, the device): it is appended with a
    timestamp as one JSON line to ``metrics/runs/<stage>.jsonl`` (:func:`last_run` reads it back).
    """
    out = Path(cfg.runtime.metrics_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{stage}.json"
    atomic_write_bytes(target, (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode())
    if run is not None:
        log = out / RUN_LOG_DIR / f"{stage}.jsonl"
        log.parent.mkdir(exist_ok=True)
        with open(log, "a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **run}, sort_keys=True) + "\n")
    return target


def write_report(out_dir: str | Path, details: dict[str, Any]) -> Path:
    """Write a stage's detailed figures to ``<out_dir>/report.json``, beside its outputs.

    ``metrics/<stage>.json`` holds only the few headline numbers people compare experiments by (``dvc metrics
    show``, ``dvc exp show``); the breakdowns (per split, per size, per category, versions, byte counts) go here.
    Like the metrics, only figures the stage's inputs and params determine, so a rerun leaves it byte-identical.
    """
    target = Path(out_dir) / REPORT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, (json.dumps(details, indent=1, sort_keys=True) + "\n").encode())
    return target


def last_run(metrics_dir: str | Path, stage: str) -> dict[str, Any]:
    """The run facts :func:`write_metrics` logged for the latest run of ``stage`` (``{}`` when there is none)."""
    log = Path(metrics_dir) / RUN_LOG_DIR / f"{stage}.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    return json.loads(lines[-1]) if lines else {}
