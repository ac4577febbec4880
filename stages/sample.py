"""Stage ``sample``: write the built-in synthetic COCO-format dataset (see ``picosam_pipeline/data/sample.py``).

Reads nothing; writes ``sample.out_dir`` (JSON, images, ``BAD_INPUTS.md``, ``config.resolved.json``) and
``metrics/sample.json`` (image / annotation counts per split, number of planted bad inputs).
"""

from __future__ import annotations

from typing import Any

from picosam_pipeline.config import Config, save_resolved, write_metrics
from picosam_pipeline.data.sample import generate
from picosam_pipeline.device import Runtime


def run(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    """Generate the sample from ``cfg.sample`` (its own seed; ``runtime`` is unused: no tensors here)."""
    summary = generate(cfg.sample)
    save_resolved(cfg, cfg.sample.out_dir, ["sample"])
    write_metrics(cfg, "sample", summary)
    return summary
