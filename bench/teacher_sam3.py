"""SAM3's two prompt paths next to SAM2.1-tiny: build, encode and per-prompt seconds, peak memory, COCO estimate.

Run from the repository root:  ``.venv/bin/python bench/teacher_sam3.py [--images 1] [--prompts 3] [--teachers ...]``

Each teacher runs in its own child process (so that its peak RSS is its own) on the same images and box prompts:
the first ``--images`` annotated coco-sample val2017 images with the COCO boxes of their first ``--prompts``
instances (``../shared/data``), or, where that is absent (a GPU machine), seeded noise images of 640x480 with
seeded boxes; random weights (same compute as the checkpoints), ``runtime.precision: auto`` (fp32 on a CPU, bf16
autocast on CUDA). Teachers (``--teachers``): ``sam2.1_hiera_tiny`` (the stage's batched path),
``sam3:geometric`` (PicoSAM3's path: each box a geometric prompt of the grounding head) and ``sam3:instance``
(``predict_inst``: all boxes of an image in one call). Per teacher:

* **build**: ``build.build_teacher`` (import included for SAM3: a child process starts cold);
* **encode**: ``set_image`` per image (SAM2.1 at 1024x1024, SAM3 at 1008x1008);
* **per prompt**: one ``predict_boxes`` of all the image's boxes (the stage's call; SAM3's geometric path splits
  it into calls of ``decode_batch`` prompts, 1 on a CPU), divided by the number of boxes;
* **peak RSS** of the child (``ru_maxrss``) and, on CUDA, peak allocated device memory;
* **COCO train2017**: 118,287 images x encode + 860,001 instances x per prompt (teacher calls only, no I/O).

On CUDA the first image is a warm-up, not timed (run with ``--images 2`` or more); on a CPU every image is timed
(a SAM3 encode takes minutes there). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import numpy as np  # noqa: E402

COCO = REPO.parent / "shared" / "data" / "coco-sample"
COCO_TRAIN_IMAGES, COCO_TRAIN_INSTANCES = 118_287, 860_001
TEACHERS = ("sam2.1_hiera_tiny", "sam3:geometric", "sam3:instance")


def workload(coco: Path, n_images: int, n_prompts: int) -> tuple[str, list[tuple[np.ndarray, np.ndarray]]]:
    """``(description, [(rgb (H, W, 3) uint8, boxes (k, 4) float32 xyxy), ...])``."""
    annotations = coco / "annotations" / "instances_val2017.json"
    if annotations.is_file() and (coco / "val2017").is_dir():
        from picosam_pipeline.data.images import load_image

        data = json.loads(annotations.read_text())
        by_image: dict[int, list] = {}
        for a in data["annotations"]:
            if not a["iscrowd"] and a["bbox"][2] > 1 and a["bbox"][3] > 1:
                by_image.setdefault(a["image_id"], []).append(a["bbox"])
        images = [img for img in data["images"] if img["id"] in by_image][:n_images]
        out = []
        for img in images:
            boxes = np.array(by_image[img["id"]][:n_prompts], np.float32)
            boxes[:, 2:] += boxes[:, :2]
            out.append((load_image(coco / "val2017" / img["file_name"]).pixels, boxes))
        return f"{len(out)} coco-sample val2017 images", out
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n_images):
        xy = rng.uniform(0, 400, size=(n_prompts, 2))
        wh = rng.uniform(40, 240, size=(n_prompts, 2))
        out.append(
            (
                (rng.random((480, 640, 3)) * 255).astype(np.uint8),
                np.concatenate([xy, np.minimum(xy + wh, [640, 480])], axis=1).astype(np.float32),
            )
        )
    return f"{n_images} seeded noise images of 640x480 (no coco-sample here)", out


def measure(teacher_name: str, n_images: int, n_prompts: int, coco: Path, device: str) -> dict:
    """In the child: build one teacher, run the workload, return its figures."""
    import torch

    from picosam_pipeline.config import RuntimeConfig, TeacherConfig
    from picosam_pipeline.device import resolve_runtime
    from picosam_pipeline.teacher.build import build_teacher

    warnings.simplefilter("ignore")
    runtime = resolve_runtime(RuntimeConfig(device=device))
    model, _, path = teacher_name.partition(":")
    cfg = TeacherConfig(
        model=model, checkpoint=None, allow_random_weights=True, **({"sam3_path": path} if path else {})
    )
    cuda = runtime.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(runtime.device)

    _, images = workload(coco, n_images, n_prompts)
    start = time.perf_counter()
    teacher = build_teacher(cfg, runtime)
    sync()
    build_s = time.perf_counter() - start
    rss_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    encode, decode, prompts = [], [], 0
    for i, (rgb, boxes) in enumerate(images):
        start = time.perf_counter()
        teacher.set_image(rgb)
        sync()
        encoded = time.perf_counter()
        out = teacher.predict_boxes(boxes)
        sync()
        if not torch.isfinite(out.image_logits).all() or not torch.isfinite(out.confidence).all():
            raise RuntimeError(f"{teacher_name}: non-finite output on image {i}")
        if cuda and i == 0 and len(images) > 1:
            continue  # warm-up
        encode.append(encoded - start)
        decode.append(time.perf_counter() - encoded)
        prompts += len(boxes)
    per_prompt = sum(decode) / prompts
    return {
        "teacher": teacher_name,
        "device": runtime.describe(),
        "threads": torch.get_num_threads(),
        "build_s": build_s,
        "encode_s": float(np.mean(encode)),
        "per_prompt_s": per_prompt,
        "images_timed": len(encode),
        "prompts_timed": prompts,
        "prompts_per_call": getattr(teacher, "decode_batch", None),
        "rss_after_build_gib": rss_build,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_device_gib": torch.cuda.max_memory_allocated(runtime.device) / 2**30 if cuda else None,
        "coco_hours": (COCO_TRAIN_IMAGES * float(np.mean(encode)) + COCO_TRAIN_INSTANCES * per_prompt) / 3600,
        "weights_sha256": teacher.metadata.get("weights_sha256"),
        "logits_shape": list(out.image_logits.shape),
        "confidence_mean": float(out.confidence.float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco", default=str(COCO), help="COCO folder with annotations/ and val2017/")
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=3, help="box prompts per image (its first instances)")
    parser.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=TEACHERS)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one teacher, print JSON
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.images, args.prompts, Path(args.coco), args.device)))
        return
    described, _ = workload(Path(args.coco), args.images, args.prompts)
    import torch

    print(
        f"# teachers side by side on {described}, up to {args.prompts} box prompts each; torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, random weights",
        flush=True,
    )
    print(
        f"{'teacher':<20} {'device':<16} {'build s':>8} {'encode s':>9} {'s/prompt':>9} {'per call':>8} "
        f"{'RSS GiB':>8} {'dev GiB':>8} {'COCO h':>8}",
        flush=True,
    )
    rows = []
    for name in args.teachers:
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                name,
                "--images",
                str(args.images),
                "--prompts",
                str(args.prompts),
                "--coco",
                args.coco,
                "--device",
                args.device,
            ],
            capture_output=True,
            text=True,
        )
        if child.returncode != 0:
            print(
                f"{name:<20} failed: "
                f"{child.stderr.strip().splitlines()[-1] if child.stderr.strip() else child.returncode}",
                flush=True,
            )
            continue
        r = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append(r)
        device_gib = f"{r['peak_device_gib']:8.2f}" if r["peak_device_gib"] is not None else f"{'-':>8}"
        print(
            f"{name:<20} {r['device']:<16} {r['build_s']:8.1f} {r['encode_s']:9.3f} {r['per_prompt_s']:9.3f} "
            f"{str(r['prompts_per_call']):>8} {r['peak_rss_gib']:8.2f} {device_gib} {r['coco_hours']:8.1f}",
            flush=True,
        )
    if rows:
        print(
            "RSS: peak of the child process (the teacher, one image's features and its decoder activations); "
            "RSS right after the build: " + ", ".join(f"{r['teacher']} {r['rss_after_build_gib']:.2f}" for r in rows)
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
