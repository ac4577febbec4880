"""Stage ``pack``: instance index + images + teacher-logit store -> WebDataset shards, one set per split.

Reads ``pack.index`` (from prepare), the store of every teacher pass in ``pack.teachers``
(``<pack.stores_dir>/<NAME>.zarr``, from teacher-logits@NAME) and the images the index points to; writes, for
each split in ``pack.splits``, ``<pack.out_dir>/<split>/shard-NNNNNN.tar`` and
``shards.json`` (every shard with its sample count and sha256), plus ``<pack.out_dir>/config.resolved.json``,
``<pack.out_dir>/report.json`` (frame, teachers' codecs, per split: samples, shards, bytes, payload bytes per
member) and ``metrics/pack.json`` (the headline: samples and bytes per sample). The
sample format, frames and pack order are described in ``picosam_pipeline/train/shards.py``.

Joining (``picosam_pipeline/train/packing.py``): index rows and store rows are matched on ``(image_id, ann_id)``
(each store's own id arrays), and each store's crop boxes must equal the index's boxes of the store's prompt
convention, so a store computed from an older index is refused instead of silently misaligning crops and logits.
Every teacher packed must share one prompt convention and frame (store size, context margin): one sample holds one
crop, and that convention must be the one the params ask for (``teacher.prompt`` of each pass, ``auto`` = the
recipe's; ``data.crop_convention.check_crops``), so shards of the other paper's crops are refused before any work.
Each split's ``shards.json`` records the convention with its parameters from the index (``crop``:
``crops.crop_convention``, the params read by ``crop_convention.index_crop_params``), for the train stage and the
student. The pack is built in ``<out_dir>.partial`` and swapped in at the end, so an interrupted run never leaves a
half-written pack where the loader looks; ``out_dir`` is replaced only when it holds an earlier pack
(``outputs.py``).
"""

from __future__ import annotations

from typing import Any

from picosam_pipeline.config import Config, require_inputs
from picosam_pipeline.data.crop_convention import check_crops
from picosam_pipeline.device import Runtime
from picosam_pipeline.outputs import StageOutput, save_resolved
from picosam_pipeline.reports import write_metrics, write_report
from picosam_pipeline.teacher.store import LogitStore, open_store
from picosam_pipeline.train.packing import common_frame, pack_report, pack_splits, shard_crop, store_convention


def output(cfg: Config) -> StageOutput:
    """``pack.out_dir``: one folder of shards per split (each with its shards.json) and the marker."""
    p = cfg.pack
    inputs = {"pack.index": p.index, **{f"pack.teachers[{name}]": path for name, path in p.store_paths().items()}}
    return StageOutput(
        cfg,
        "pack",
        "pack.out_dir",
        p.out_dir,
        sections=["pack"],
        names=("*/",),
        what="shards",
        inputs=inputs,
        writes={"runtime.metrics_dir": cfg.runtime.metrics_dir},
    )


def run(cfg: Config, runtime: Runtime | None = None) -> dict[str, Any]:
    """Pack every split of ``cfg.pack``; returns samples and bytes per sample per split (no tensors: no device)."""
    p = cfg.pack
    paths = p.store_paths()
    with output(cfg) as building:  # <out_dir>.partial, renamed to out_dir when the block ends
        require_inputs(
            {
                "pack.index": p.index,
                **{f"pack.teachers[{name}] (teacher-logits@{name})": path for name, path in paths.items()},
            }
        )
        stores = {name: open_store(path) for name, path in paths.items()}
        frame, convention = common_frame(stores)
        _check_store_crops(cfg, stores)
        crop = shard_crop(p.index, convention, frame)
        summaries = pack_splits(
            p.index,
            stores,
            p.splits,
            building,
            frame=frame,
            convention=convention,
            crop=crop,
            samples_per_shard=p.samples_per_shard,
            seed=p.seed,
            jpeg_quality=p.jpeg_quality,
        )
        details = pack_report(frame, crop, stores, summaries)
        write_report(building, details)
        save_resolved(cfg, building, ["pack"])
        samples, total_bytes = details["total"]["samples"], details["total"]["bytes"]
        write_metrics(cfg, "pack", {"samples": samples, "bytes_per_sample": round(total_bytes / samples, 1)})
    return {
        name: {"samples": s.samples, "shards": s.shards, "bytes_per_sample": round(s.bytes_per_sample)}
        for name, s in summaries.items()
    }


def _check_store_crops(cfg: Config, stores: dict[str, LogitStore]) -> None:
    """Each store must hold the crops its pass is configured for (``teachers.NAME.prompt`` or ``teacher.prompt``;
    ``auto`` = the recipe's): a store made with the other paper's convention is refused, naming the keys."""
    for name, store in stores.items():
        found = store_convention(name, store)
        if name in cfg.teachers:
            key = f"teachers.{name}.prompt" if "prompt" in (cfg.teachers[name] or {}) else "teacher.prompt"
            wanted = cfg.teacher_pass(name).teacher.prompt
        else:
            key, wanted = "teacher.prompt", cfg.teacher.prompt
        check_crops(
            {"convention": found},
            str(store.path),
            {"convention": wanted},
            f"pack ({key}={wanted}, recipe.name={cfg.recipe.name})",
            f"rerun the teacher pass with these params (`dvc repro teacher-logits@{name}` or "
            f"`picosam-pipeline run-stage teacher-logits@{name}`), or set recipe.name / {key} to the store's "
            "convention",
            keys=("convention",),
        )
