"""What ``picosam-pipeline inspect`` and the teacher stage's metrics say about a logit store: counts, bytes on
disk, logit and confidence ranges (:func:`summarize_store`), and the human-readable report
(:func:`format_store_summary`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from picosam_pipeline.teacher.store import DIGEST, META_ARRAYS, LogitStore


def summarize_store(store: LogitStore, max_scan: int = 20_000) -> dict[str, Any]:
    """Counts, bytes on disk and value ranges of ``store`` (what ``picosam-pipeline inspect`` prints).

    Logit ranges come from whole finished shards spread evenly over the store, at least ``max_scan``
    instances of them (all when ``max_scan`` is 0); confidence comes from every finished instance.
    """
    done = np.flatnonzero(store.done_shards())
    spans = [store.shard_slice(int(k)) for k in done]
    done_rows = np.concatenate([np.arange(r.start, r.stop) for r in spans]) if spans else np.zeros(0, np.int64)
    on_disk = {name: _tree_bytes(store.path / name) for name in ("logits", *META_ARRAYS, DIGEST)}
    summary: dict[str, Any] = {
        "instances": store.n_instances,
        "instances_done": len(done_rows),
        "shards": store.n_shards,
        "shards_done": len(done),
        "bytes_on_disk": _tree_bytes(store.path),
        "bytes_by_array": on_disk,
        "raw_float32_bytes": 4 * store.side**2,
        "raw_float16_bytes": 2 * store.side**2,
    }
    if not len(done):
        return summary
    per_shard = store.instances_per_shard
    n_scan = len(done) if max_scan <= 0 else min(len(done), math.ceil(max_scan / per_shard))
    low, high, positive, scanned, background = np.inf, -np.inf, 0, 0, 0
    for k in np.unique(done[np.linspace(0, len(done) - 1, n_scan).round().astype(int)]):
        logits = store.read_logits(store.shard_slice(int(k)))
        low, high = min(low, float(logits.min())), max(high, float(logits.max()))
        positive, scanned = positive + int((logits > 0).sum()), scanned + len(logits)
        background += int((logits.reshape(len(logits), -1) <= 0).all(axis=1).sum())
    confidence = store.read_meta(done_rows)["confidence"]
    zero_confidence = int((confidence <= 0).sum())
    summary.update(
        bytes_per_instance=summary["bytes_on_disk"] / len(done_rows),
        logits_bytes_per_instance=on_disk["logits"] / len(done_rows),
        logit_min=low,
        logit_max=high,
        mask_share=positive / (scanned * store.side**2),
        instances_scanned=scanned,
        confidence_min=float(confidence.min()),
        confidence_mean=float(confidence.mean()),
        confidence_max=float(confidence.max()),
        all_background_instances=background,  # of the scanned ones: no stored pixel with logit > 0
        zero_confidence_instances=zero_confidence,  # of all finished ones
        # No teaching signal at all: a broken teacher (NaN scores once made SAM3 write exactly this), not data.
        all_instances_empty=background == scanned or zero_confidence == len(done_rows),
    )
    return summary


def empty_warning(s: dict[str, Any]) -> str | None:
    """The warning for a store whose every instance came back empty (see :func:`summarize_store`), else None."""
    if not s.get("all_instances_empty"):
        return None
    return (
        f"every instance of the teacher pass came back empty ({s['all_background_instances']} of "
        f"{s['instances_scanned']} scanned instances all background, {s['zero_confidence_instances']} of "
        f"{s['instances_done']} with confidence 0): the store holds no teaching signal. Check the teacher's "
        "checkpoint and precision; do not train on it"
    )


def _tree_bytes(path: Path) -> int:
    """Total size of the files under ``path`` (apparent sizes, what a copy or a DVC push moves)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def format_store_summary(store: LogitStore, s: dict[str, Any]) -> tuple[str, bool]:
    """The ``inspect`` report of ``store`` from its :func:`summarize_store` dict ``s``; and whether its teacher had
    random weights (the CLI then warns on stderr)."""
    layout, teacher = store.attrs["logit_store"], store.attrs.get("teacher", {})
    enc = layout["encoding"]
    lines = [
        f"teacher-logit store {store.path} (format {layout['format_version']}, written by picosam-pipeline "
        f"{layout['code_version']})",
        f"  instances   {s['instances_done']:,} of {s['instances']:,} written; shards {s['shards_done']} of "
        f"{s['shards']} done"
        f" ({store.instances_per_shard} instances each)"
        + ("" if s["shards_done"] == s["shards"] else "; rerun the teacher stage to finish the rest"),
        f"  logits      {store.side}x{store.side} per instance, codec {store.codec.name} ({enc['stored_dtype']}, "
        f"Blosc {enc['blosc']['cname']} level {enc['blosc']['clevel']}, {enc['blosc']['shuffle']})",
        f"  decode      {enc['decode']}; mask = logit > 0",
    ]
    if s["instances_done"]:
        per, raw32, raw16 = s["bytes_per_instance"], s["raw_float32_bytes"], s["raw_float16_bytes"]
        lines += [
            f"  on disk     {s['bytes_on_disk']:,} B = {per:,.0f} B per instance "
            f"(logits {s['logits_bytes_per_instance']:,.0f} B):"
            f" {raw32 / per:.1f}x smaller than raw float32 ({raw32:,} B), {raw16 / per:.1f}x than float16 "
            f"({raw16:,} B)",
            f"  logits      min {s['logit_min']:.3f}, max {s['logit_max']:.3f}, mask share {s['mask_share']:.3f}"
            f" (over {s['instances_scanned']:,} instances)",
            f"  confidence  min {s['confidence_min']:.3f}, mean {s['confidence_mean']:.3f}, "
            f"max {s['confidence_max']:.3f}",
        ]
        if warning := empty_warning(s):
            lines.append(f"  WARNING     {warning}")
    random_weights = bool(teacher.get("random_weights") or not teacher.get("checkpoint_sha256"))
    weights = (
        "RANDOM WEIGHTS (no checkpoint loaded)"
        if random_weights
        else f"checkpoint {teacher.get('checkpoint')} (sha256 {teacher['checkpoint_sha256']})"
    )
    lines.append(f"  teacher     {teacher.get('model', 'unknown')}, {weights}")
    prompt, crop = store.attrs.get("prompt", {}), store.attrs.get("crop", {})
    lines.append(f"  prompt      {prompt.get('convention', 'unknown')}: {prompt.get('description', '')}")
    lines.append(f"  crop        {', '.join(f'{k}={v}' for k, v in crop.items()) or 'unknown'}")
    return "\n".join(lines), random_weights
