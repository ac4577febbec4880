"""Teacher-pass benchmark: the teacher-logits stage against the bare teacher and a per-annotation baseline.

Run from the repository root:  ``.venv/bin/python bench/teacher_logits.py [--images 3] [--baseline-sample 8] [--dask]``

Measured in one process, on the same images: the first ``--images`` annotated images of coco-sample val2017
(``../shared/data``), prepared by the real ``prepare`` stage into a temporary folder, PicoSAM3 ROI prompts.
The teacher is SAM2.1-tiny: ``data/checkpoints/sam2.1_hiera_tiny.pt`` when present, else the same architecture
with random weights (same compute). It is built once (the per-process cache) and warmed up on one image first.

* **bare teacher**: per image, ``set_image`` + ONE batched ``predict_boxes`` of all its instances, pixels
  decoded beforehand; no crop mapping, no codec, no store. The floor for any teacher pass.
* **stage**: ``stages.teacher_logits.run`` with ``executor=local``, everything included (index read, image
  decode, crop mapping, codec, Zarr writes, metrics), teacher already built. ``--dask`` also times it on a
  LocalCluster, cluster start and the worker's teacher build included.
* **per-annotation baseline**, as published precompute scripts work (PicoSAM3's ``sam3_teacher_precompute.py``):
  for each annotation load the image, ``set_image``, decode its one box, crop, ``torch.save`` one file. Its cost
  per instance does not depend on how many it does, so it runs on ``--baseline-sample`` instances spread over the
  same images (0 = all) and its rate is compared.

The bare teacher and the baseline are timed both before and after the stage, so that a drift in machine
load cancels out; the stage's wall time over its own teacher calls in the same run (``teacher_seconds`` in
the run log ``metrics/runs/teacher-logits.jsonl``) is a second, drift-free overhead figure. Targets (reported, not
asserted): stage / bare teacher <= 1.15x; speed-up over the per-annotation baseline close to the mean number of
instances per image. Then the storage and fidelity figures of ``bench/logit_storage.py`` (:func:`storage_figures` on
logits made from the coco-sample masks).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from logit_storage import DEFAULT_COCO, coco_like_logits, storage_figures  # noqa: E402

from picosam_pipeline.config import TeacherConfig, load_config  # noqa: E402
from picosam_pipeline.data.images import load_image  # noqa: E402
from picosam_pipeline.device import resolve_runtime  # noqa: E402
from picosam_pipeline.reports import last_run  # noqa: E402
from picosam_pipeline.stages import prepare, teacher_logits  # noqa: E402
from picosam_pipeline.teacher.base import RandomWeightsWarning  # noqa: E402
from picosam_pipeline.teacher.executors import compute_threads  # noqa: E402
from picosam_pipeline.teacher.runner import TeacherSpec, instance_rows, predict_crops, teacher_session  # noqa: E402

CHECKPOINT = REPO / "data" / "checkpoints" / "sam2.1_hiera_tiny.pt"


def subset_annotations(coco: Path, n_images: int, out: Path) -> Path:
    """The first ``n_images`` val2017 images with a non-crowd annotation, with all their annotations."""
    data = json.loads((coco / "annotations" / "instances_val2017.json").read_text())
    annotated = {a["image_id"] for a in data["annotations"] if not a["iscrowd"]}
    keep = [img for img in data["images"] if img["id"] in annotated][:n_images]
    ids = {img["id"] for img in keep}
    data.update(images=keep, annotations=[a for a in data["annotations"] if a["image_id"] in ids])
    out.write_text(json.dumps(data))
    return out


def coco_val_sets(coco: Path, n_images: int, tmp: Path, *more: str) -> list[str]:
    """``--set`` overrides for a teacher pass over the first ``n_images`` annotated val2017 images: prepared into
    ``tmp``, the val split, the local executor on the CPU, the tiny checkpoint or random weights; plus ``more``."""
    ann = subset_annotations(coco, n_images, tmp / "instances_val.json")
    return [
        f"prepare.splits=[{{name: val, annotations: {ann}, images: {coco / 'val2017'}}}]",
        f"prepare.out_dir={tmp / 'prepared'}",
        f"teacher.index={tmp / 'prepared' / 'index.parquet'}",
        "teacher.splits=[val]",
        "teacher.executor=local",
        f"teacher.checkpoint={CHECKPOINT}",
        "teacher.allow_random_weights=true",
        "runtime.device=cpu",
        f"runtime.metrics_dir={tmp / 'metrics'}",
        *more,
    ]


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def bare_teacher(session, rows) -> float:
    """Seconds of ``set_image`` + one batched box decode per image, pixels decoded beforehand."""
    groups = [rows.take(sl) for _, sl in rows.images()]
    pixels = [load_image(g.image_path[0]).pixels for g in groups]
    start = time.perf_counter()
    for group, rgb in zip(groups, pixels):
        session.teacher.set_image(rgb)
        session.teacher.predict_boxes(group.prompt)
    return time.perf_counter() - start


def per_annotation(session, cfg, rows, picked: np.ndarray, folder: Path) -> float:
    """Seconds for ``picked`` rows done one annotation at a time, each re-encoding its image and saving a file."""
    start = time.perf_counter()
    for i in picked.tolist():
        row = rows.take(slice(i, i + 1))
        session.teacher.set_image(load_image(row.image_path[0]).pixels)
        logits, confidence = predict_crops(session.teacher, cfg.teacher, row)
        torch.save(
            {
                "logits": torch.from_numpy(logits).half(),
                "score": float(confidence[0]),
                "roi": row.crop_box[0].tolist(),
                "image_id": int(row.image_id[0]),
            },
            folder / f"ann_{row.ann_id[0]}.pt",
        )
    return time.perf_counter() - start


def run_stage(cfg) -> tuple[float, dict]:
    with contextlib.redirect_stderr(io.StringIO()):
        seconds, _ = timed(teacher_logits.run, cfg, resolve_runtime(cfg.runtime))
    metrics = json.loads((Path(cfg.runtime.metrics_dir) / "teacher-logits.json").read_text())
    return seconds, {**metrics, **last_run(cfg.runtime.metrics_dir, "teacher-logits")}  # + this run's facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco", default=str(DEFAULT_COCO), help="COCO folder with annotations/ and val2017/")
    parser.add_argument("--images", type=int, default=3, help="first N annotated val2017 images")
    parser.add_argument(
        "--baseline-sample",
        type=int,
        default=8,
        help="instances the per-annotation baseline runs on, spread over the same images (0 = all)",
    )
    parser.add_argument("--dask", action="store_true", help="also time the stage on a dask LocalCluster")
    args = parser.parse_args()
    coco = Path(args.coco)
    if not (coco / "val2017").is_dir():
        sys.exit(f"{coco}/val2017 not found: pass --coco DIR (the coco-sample of ../shared/data)")
    warnings.simplefilter("ignore", RandomWeightsWarning)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = coco_val_sets(
            coco, args.images, tmp, "teacher.instances_per_shard=16", f"teacher.out={tmp / 'local.zarr'}"
        )
        cfg = load_config(REPO / "params.yaml", sets)
        runtime = resolve_runtime(cfg.runtime)
        with contextlib.redirect_stderr(io.StringIO()):
            prepare.run(cfg, runtime)
        rows = instance_rows(cfg.teacher.index, ["val"], "roi")
        n_images = len(rows.images())

        # The spec the stage's in-process executor uses, so that the stage below finds this teacher built.
        spec = TeacherSpec.of(cfg.teacher, runtime, threads=cfg.teacher.threads_per_worker or compute_threads())
        build_s, session = timed(teacher_session, spec)
        session.teacher.set_image(load_image(rows.image_path[0]).pixels)  # warm-up: first calls are slower
        picked = (
            np.arange(len(rows))
            if args.baseline_sample <= 0
            else np.unique(np.linspace(0, len(rows) - 1, min(args.baseline_sample, len(rows))).round().astype(int))
        )
        (tmp / "pt").mkdir()
        # The bare teacher and the baseline (half of its instances each time) run both before and after the stage,
        # so that a drift in machine load during the benchmark (other jobs on a shared machine) cancels out.
        bare_before = bare_teacher(session, rows)
        base_s = per_annotation(session, cfg, rows, picked[::2], tmp / "pt")
        stage_s, metrics = run_stage(cfg)
        base_s += per_annotation(session, cfg, rows, picked[1::2], tmp / "pt")
        bare_after = bare_teacher(session, rows)
        bare_s = (bare_before + bare_after) / 2
        dask_s = None
        if args.dask:
            dask_cfg = load_config(
                REPO / "params.yaml", [*sets, "teacher.executor=dask", f"teacher.out={tmp / 'dask.zarr'}"]
            )
            dask_s, _ = run_stage(dask_cfg)

        n = len(rows)
        weights = session.teacher.metadata["weights"]
        print(
            f"# teacher pass: SAM2.1-tiny ({weights}), {n} instances on {n_images} coco-sample val2017 images "
            f"({n / n_images:.2f} instances/image); {runtime.describe()}, {torch.get_num_threads()} torch threads, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}"
        )
        print(f"{'method':<44} {'seconds':>8} {'inst/s':>8} {'vs stage':>9}")
        stage_rate = n / stage_s
        table = [
            ("bare teacher (encode + batched decode only)", bare_s, n / bare_s),
            ("stage, executor=local (all included)", stage_s, stage_rate),
        ]
        if dask_s is not None:
            table.append(("stage, executor=dask (+cluster, +worker build)", dask_s, n / dask_s))
        table.append((f"per-annotation baseline ({len(picked)} instances)", base_s, len(picked) / base_s))
        for name, seconds, rate in table:
            print(f"{name:<44} {seconds:8.2f} {rate:8.3f} {stage_rate / rate:8.2f}x")
        print(
            f"bare teacher timed before / after the stage: {bare_before:.2f} / {bare_after:.2f} s (mean above); "
            f"teacher build (once per process, not in the rows above): {build_s:.2f} s"
        )
        print(
            f"stage overhead over the bare teacher: {stage_s / bare_s:.3f}x (target <= 1.15x); over its own teacher "
            f"calls in the same run: {stage_s / metrics['teacher_seconds']:.3f}x ({metrics['teacher_seconds']:.2f} s); "
            f"encoder passes {metrics['encoder_passes']} for {n_images} images"
        )
        print(
            f"speed-up over the per-annotation baseline: {stage_rate / (len(picked) / base_s):.2f}x "
            f"(mean instances per image {n / n_images:.2f})"
        )
        print(
            f"stage store: {metrics['bytes_per_instance']:.0f} B/instance on disk ({metrics['codec']}, random-weight "
            "logits compress worse than real ones; see below)"
            if metrics["random_weights"]
            else f"stage store: {metrics['bytes_per_instance']:.0f} B/instance on disk ({metrics['codec']})"
        )

        data = coco_like_logits(coco)
        rows_ = storage_figures(data, tmp / "storage", instances_per_shard=TeacherConfig().instances_per_shard)
    print(f"\n# storage and fidelity (bench/logit_storage.py: {len(data['logits'])} coco-sample instances, 96x96)")
    print(f"{'layout':<28} {'B/inst':>8} {'alloc':>8} {'vs f32':>7} {'max|dsig|':>10} {'flipped':>8}")
    for r in rows_:
        print(
            f"{r['layout']:<28} {r['bytes']:8.0f} {r['allocated']:8.0f} {rows_[0]['bytes'] / r['bytes']:6.1f}x "
            f"{r['max_sigmoid_err']:10.5f} {r['flipped']:8.5f}"
        )


if __name__ == "__main__":
    main()
