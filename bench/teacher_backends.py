"""Teacher backends side by side: SAM2 in PyTorch vs the same model exported to ONNX Runtime.

Run from the repository root:  ``.venv/bin/python bench/teacher_backends.py [--images 20] [--threads 2]``

On the first ``--images`` annotated val2017 images of coco-sample (``../shared/data``), prepared by the real
``prepare`` stage, PicoSAM3 box prompts (every instance of an image in one decoder call). SAM2.1-tiny: the
checkpoint in ``data/checkpoints`` when present, else the same architecture with seeded random weights.

* **per image, per backend**: each backend runs in its own fresh process (so peak RSS is its own): teacher
  build (ONNX: session creation on the already exported files), then per image ``set_image`` (encoder) and one
  ``predict_boxes`` (decoder). First image (cold) and the median of the rest (steady state) are reported apart.
* **parity (the seed's check)**: one point sampled uniformly inside each instance's GT mask (seeded), decoded by
  both backends; Jaccard of the two masks (logit > 0 on the 256 x 256 logits) per instance: mean, min, and a
  box plot PNG in ``--out``.
* **stage overhead**: the teacher-logits stage with ``teacher.backend=onnxruntime`` (local executor, all
  included) against the bare ONNX teacher on the same images, timed before and after the stage.

Targets (printed, not asserted): onnxruntime >= 1.7x PyTorch per image; stage / bare ONNX teacher <= 1.15x.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from logit_storage import DEFAULT_COCO  # noqa: E402
from teacher_logits import CHECKPOINT, bare_teacher, coco_val_sets, run_stage, timed  # noqa: E402

from picosam_pipeline.config import load_config  # noqa: E402
from picosam_pipeline.data.images import load_image  # noqa: E402
from picosam_pipeline.data.index import decode_mask, read_index  # noqa: E402
from picosam_pipeline.device import resolve_runtime  # noqa: E402
from picosam_pipeline.stages import prepare  # noqa: E402
from picosam_pipeline.teacher.base import RandomWeightsWarning  # noqa: E402
from picosam_pipeline.teacher.build import build_teacher  # noqa: E402
from picosam_pipeline.teacher.runner import TeacherSpec, instance_rows, teacher_session  # noqa: E402
from picosam_pipeline.teacher.sam2_onnx import export_teacher, read_manifest  # noqa: E402
from picosam_pipeline.teacher.weights import package_version  # noqa: E402
from picosam_pipeline.train.iou import crop_ious  # noqa: E402

BACKENDS = ("torch", "onnxruntime")
PARTS = {"encode": ("encode",), "decode": ("decode",), "image": ("encode", "decode")}  # timed parts of a record


def worker(args: argparse.Namespace) -> None:
    """One backend in this process: build, time every image, decode the sampled points; print JSON."""
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    cfg = load_config(args.params, json.loads(args.sets))
    runtime = resolve_runtime(cfg.runtime)
    inputs = np.load(args.inputs, allow_pickle=False)
    paths = json.loads(str(inputs["paths"]))
    build_s, teacher = timed(build_teacher, cfg.teacher, runtime)
    records, point_masks = [], []
    for i, path in enumerate(paths):
        rgb = load_image(path).pixels
        encode_s, _ = timed(teacher.set_image, rgb)
        decode_s, _ = timed(teacher.predict_boxes, inputs[f"boxes_{i}"])
        records.append({"encode": encode_s, "decode": decode_s})
        point_masks.append(teacher.predict_points(inputs[f"points_{i}"]).image_logits.numpy() > 0)
    np.save(args.masks, np.packbits(np.concatenate(point_masks), axis=-1))
    print(
        json.dumps(
            {
                "build": build_s,
                "records": records,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def run_backend(backend: str, params: Path, sets: list[str], inputs: Path, folder: Path, threads: int) -> dict:
    masks = folder / f"masks_{backend}.npy"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--params",
        str(params),
        "--sets",
        json.dumps([*sets, f"teacher.backend={backend}"]),
        "--inputs",
        str(inputs),
        "--masks",
        str(masks),
        "--threads",
        str(threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        sys.exit(f"{backend} worker failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["masks"] = np.unpackbits(np.load(masks), axis=-1).astype(bool)
    return result


def sample_points(rows, index_path: Path, seed: int) -> list[np.ndarray]:
    """Per image of ``rows``: ``(n, 2)`` float32 points, one uniformly inside each instance's GT mask."""
    table = read_index(str(index_path), columns=["ann_id", "rle_counts", "width", "height"])
    rle = dict(
        zip(
            table["ann_id"].to_pylist(),
            zip(table["rle_counts"].to_pylist(), table["width"].to_pylist(), table["height"].to_pylist()),
        )
    )
    rng = np.random.default_rng(seed)
    out = []
    for _, sl in rows.images():
        points = []
        for ann in rows.ann_id[sl].tolist():
            counts, w, h = rle[ann]
            ys, xs = np.nonzero(decode_mask(counts, h, w))
            k = rng.integers(len(xs))
            points.append((xs[k] + 0.5, ys[k] + 0.5))
        out.append(np.asarray(points, np.float32))
    return out


def box_plot(values: np.ndarray, path: Path, title: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.boxplot(values, vert=True, whis=(0, 100))
    ax.set_xticks([1], ["PyTorch vs ONNX Runtime"])
    ax.set_ylabel("Jaccard of the two masks (logit > 0)")
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.6f"))
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco", default=str(DEFAULT_COCO), help="COCO folder with annotations/ and val2017/")
    parser.add_argument("--images", type=int, default=20, help="first N annotated val2017 images")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both backends")
    parser.add_argument("--seed", type=int, default=0, help="seed of the points sampled inside the GT masks")
    parser.add_argument("--out", default=str(REPO / "bench" / "out"), help="folder for the Jaccard box plot")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--params", "--sets", "--inputs", "--masks"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    coco = Path(args.coco)
    if not (coco / "val2017").is_dir():
        sys.exit(f"{coco}/val2017 not found: pass --coco DIR (the coco-sample of ../shared/data)")
    warnings.simplefilter("ignore", RandomWeightsWarning)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = coco_val_sets(
            coco,
            args.images,
            tmp,
            "teacher.instances_per_shard=64",
            f"teacher.out={tmp / 'stage.zarr'}",
            f"teacher.onnx_dir={tmp / 'onnx'}",
            f"teacher.threads_per_worker={args.threads}",
        )
        params = REPO / "params.yaml"
        cfg = load_config(params, sets)
        runtime = resolve_runtime(cfg.runtime)
        with contextlib.redirect_stderr(io.StringIO()):
            prepare.run(cfg, runtime)
        rows = instance_rows(cfg.teacher.index, ["val"], "roi")
        groups = [rows.take(sl) for _, sl in rows.images()]
        points = sample_points(rows, Path(cfg.teacher.index), args.seed)
        arrays = {"paths": np.array(json.dumps([str(g.image_path[0]) for g in groups]))}
        arrays.update({f"boxes_{i}": g.prompt for i, g in enumerate(groups)})
        arrays.update({f"points_{i}": p for i, p in enumerate(points)})
        np.savez(tmp / "inputs.npz", **arrays)

        ort_cfg = load_config(params, [*sets, "teacher.backend=onnxruntime"])
        export_s, folder = timed(export_teacher, ort_cfg.teacher, runtime)
        files = read_manifest(folder)["files"]
        results = {b: run_backend(b, params, sets, tmp / "inputs.npz", tmp, args.threads) for b in BACKENDS}

        # Stage overhead, ONNX backend: the stage's own process builds the teacher once (the per-process cache).
        spec = TeacherSpec.of(ort_cfg.teacher, runtime, threads=args.threads)
        session = teacher_session(spec)
        session.teacher.set_image(load_image(rows.image_path[0]).pixels)  # warm-up
        bare_before = bare_teacher(session, rows)
        stage_s, metrics = run_stage(ort_cfg)
        bare_after = bare_teacher(session, rows)

    n, n_images = len(rows), len(groups)
    weights = "checkpoint" if CHECKPOINT.is_file() else "random weights"
    print(
        f"# SAM2.1-tiny ({weights}), {n} instances on {n_images} coco-sample val2017 images ({n / n_images:.2f} "
        f"per image), box prompts; {args.threads} threads per backend, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, "
        f"onnxruntime {package_version('onnxruntime')}, Python {platform.python_version()}"
    )
    print(
        f"ONNX export (once, cached): {export_s:.1f} s; encoder.onnx {files['encoder.onnx']['bytes'] / 2**20:.1f} MiB, "
        f"decoder.onnx {files['decoder.onnx']['bytes'] / 2**20:.1f} MiB"
    )
    header = (
        f"{'backend':<12} {'build s':>8} {'1st enc':>8} {'1st dec':>8} {'enc med':>8} {'dec med':>8} "
        f"{'img med':>8} {'img/s':>7} {'inst/s':>7} {'peak RSS':>9}"
    )
    print(header)
    median = {}  # backend -> steady-state medians (every image but the first) of encode, decode, image
    for b in BACKENDS:
        r = results[b]
        rec = r["records"]
        steady = rec[1:] or rec
        median[b] = {part: statistics.median(sum(x[k] for k in keys) for x in steady) for part, keys in PARTS.items()}
        total = sum(x["encode"] + x["decode"] for x in rec)
        m = median[b]
        print(
            f"{b:<12} {r['build']:8.2f} {rec[0]['encode']:8.2f} {rec[0]['decode']:8.2f} {m['encode']:8.3f} "
            f"{m['decode']:8.3f} {m['image']:8.3f} {n_images / total:7.3f} {n / total:7.2f} "
            f"{r['peak_rss_mib']:7.0f} MiB"
        )
    speedup = {part: median["torch"][part] / median["onnxruntime"][part] for part in PARTS}
    print(
        f"onnxruntime speed-up, steady state (median per image): {speedup['image']:.2f}x (target >= 1.7x); "
        f"encoder {speedup['encode']:.2f}x, decoder {speedup['decode']:.2f}x"
    )

    ious = crop_ious(results["torch"]["masks"], results["onnxruntime"]["masks"])  # per-instance Jaccard
    plot = out_dir / "teacher_backends_jaccard.png"
    box_plot(
        ious, plot, f"{len(ious)} instances, 1 point inside each GT mask\n{n_images} coco-sample val images, {weights}"
    )
    print(
        f"parity, point prompts inside GT masks: Jaccard mean {ious.mean():.6f}, min {ious.min():.6f} over "
        f"{len(ious)} instances; {int((ious < 1).sum())} not identical; box plot {plot}"
    )
    bare_s = (bare_before + bare_after) / 2
    print(
        f"stage (backend onnxruntime, local executor) {stage_s:.2f} s vs bare ONNX teacher {bare_s:.2f} s "
        f"(before / after: {bare_before:.2f} / {bare_after:.2f}): overhead {stage_s / bare_s:.3f}x (target <= 1.15x); "
        f"over its own teacher calls {stage_s / metrics['teacher_seconds']:.3f}x"
    )


if __name__ == "__main__":
    main()
