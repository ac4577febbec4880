"""Teacher throughput on whatever device this machine has: the encoder's limit against the whole stage.

Run from the repository root:  ``python bench/teacher_gpu.py [--images 25] [--repeat 20] [--models ...]``

Per teacher, in one run and on the same images (the first ``--images`` annotated coco-sample val2017 images,
listed ``--repeat`` times under new ids, prepared by the real ``prepare`` stage; random weights, same compute
as the real checkpoints):

* **encoder alone**: ``Sam2Teacher.encode`` on a resident, preprocessed batch of ``--encoder-batch`` images
  (64 on a GPU): the limit of any teacher pass, in images/s and, times the instances per image, instances/s.
* **stage, predictor path**: ``teacher-logits`` with SAM2's ``SAM2ImagePredictor`` one image at a time (the
  stage before the batched path; only on the first ``--images``, it is slow on a GPU; after a warm-up pass).
* **stage, batched**: ``teacher-logits`` as shipped (``images_per_batch: auto``), everything included: index
  read, image decode, encoder, decoder, crop resampling, codec, Zarr writes, metrics; teacher built and warmed
  up beforehand. Its ratio to the encoder alone, the peak device memory during it, the mean GPU utilisation
  (NVML, sampled every 50 ms) and the time a full COCO train2017 pass (~860k instances) would take.

SAM3's two prompt paths are measured by ``bench/teacher_sam3.py`` (named here, or named as skipped without ``sam3``).
Nothing is asserted. The defaults depend on the device: on a GPU 25 images x 20 with SAM2.1 tiny and large (as measured
for the README); on a CPU 2 images x 2 with tiny, small enough for CI to smoke-test (``tests/test_benchmarks.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from logit_storage import DEFAULT_COCO  # noqa: E402
from teacher_logits import subset_annotations  # noqa: E402

from picosam_pipeline.config import load_config  # noqa: E402
from picosam_pipeline.device import resolve_runtime  # noqa: E402
from picosam_pipeline.reports import last_run  # noqa: E402
from picosam_pipeline.stages import prepare, teacher_logits  # noqa: E402
from picosam_pipeline.teacher import runner  # noqa: E402
from picosam_pipeline.teacher.base import RandomWeightsWarning  # noqa: E402
from picosam_pipeline.teacher.executors import compute_threads  # noqa: E402
from picosam_pipeline.teacher.sam2_batched import INPUT_SIZE  # noqa: E402
from picosam_pipeline.teacher.sam2_predictor import Sam2PredictorTeacher  # noqa: E402
from picosam_pipeline.teacher.store import open_store  # noqa: E402

COCO_TRAIN_INSTANCES = 860_001  # COCO train2017 non-crowd instances (ecosystem notes)


def repeated_annotations(coco: Path, n_images: int, repeat: int, out: Path) -> Path:
    """The first ``n_images`` annotated val2017 images, listed ``repeat`` times under new image and annotation ids."""
    data = json.loads(subset_annotations(coco, n_images, out).read_text())
    images, anns = data["images"], data["annotations"]
    step = 10 ** len(str(max(x["id"] for x in images + anns)))  # new ids never collide with the originals
    data["images"] = [{**img, "id": img["id"] + r * step} for r in range(repeat) for img in images]
    data["annotations"] = [
        {**a, "id": a["id"] + r * step, "image_id": a["image_id"] + r * step} for r in range(repeat) for a in anns
    ]
    out.write_text(json.dumps(data))
    return out


def prepared_sets(coco: Path, n_images: int, repeat: int, tmp: Path, name: str) -> list[str]:
    """``--set`` overrides for a pass over the prepared val split ``name``; runs ``prepare`` for it."""
    ann = repeated_annotations(coco, n_images, repeat, tmp / f"{name}.json")
    sets = [
        f"prepare.splits=[{{name: val, annotations: {ann}, images: {coco / 'val2017'}}}]",
        f"prepare.out_dir={tmp / name}",
        f"teacher.index={tmp / name / 'index.parquet'}",
        "teacher.splits=[val]",
        "teacher.executor=local",
        "teacher.checkpoint=null",
        "teacher.allow_random_weights=true",
        f"runtime.metrics_dir={tmp / 'metrics'}",
    ]
    cfg = load_config(REPO / "params.yaml", sets)
    with contextlib.redirect_stderr(io.StringIO()):
        prepare.run(cfg, resolve_runtime(cfg.runtime))
    return sets


class Utilisation:
    """Mean GPU utilisation (NVML) over a ``with`` block, sampled every 50 ms; None without NVML or a GPU."""

    def __init__(self, device: torch.device):
        self.samples: list[int] = []
        self.handle = None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml = pynvml
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            except Exception:  # noqa: BLE001 -- no NVML: the figure is simply not reported
                self.handle = None

    def __enter__(self) -> Utilisation:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _sample(self) -> None:
        while self.handle is not None and not self.stop.wait(0.05):
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encoder_rate(teacher, batch: int, iters: int) -> float:
    """Images/s of the encoder alone on a resident ``(batch, 3, 1024, 1024)`` input."""
    pixels = torch.randn(batch, 3, INPUT_SIZE, INPUT_SIZE, device=teacher.device)
    teacher.encode(pixels)  # warm-up: kernel selection, allocator
    sync(teacher.device)
    start = time.perf_counter()
    for _ in range(iters):
        teacher.encode(pixels)
    sync(teacher.device)
    return batch * iters / (time.perf_counter() - start)


def stage_rate(sets: list[str], out: Path, *more: str) -> dict:
    """Run the stage (teacher already built in this process) and return its figures; timed by the stage."""
    cfg = load_config(REPO / "params.yaml", [*sets, f"teacher.out={out}", *more])
    with contextlib.redirect_stderr(io.StringIO()):
        teacher_logits.run(cfg, resolve_runtime(cfg.runtime))
    images = open_store(out).attrs["rows"]["images"]  # not a headline metric: the store's own description
    return {
        **json.loads((Path(cfg.runtime.metrics_dir) / "teacher-logits.json").read_text()),
        **last_run(cfg.runtime.metrics_dir, "teacher-logits"),
        "images": images,
    }


def store_agreement(a: Path, b: Path) -> tuple[float, float]:
    """Share of equal mask decisions (logit > 0) and the largest sigmoid difference between two stores' logits."""
    first, second = open_store(a), open_store(b)
    x, y = first.read_logits(slice(None)), second.read_logits(slice(None))
    sigmoid = lambda v: 1.0 / (1.0 + np.exp(-v.astype(np.float64)))  # noqa: E731
    return float(((x > 0) == (y > 0)).mean()), float(np.abs(sigmoid(x) - sigmoid(y)).max())


def bench_sam2(model: str, small: list[str], big: list[str], tmp: Path, args) -> list[str]:
    cfg = load_config(REPO / "params.yaml", [*big, f"teacher.model={model}"])
    runtime = resolve_runtime(cfg.runtime)
    spec = runner.TeacherSpec.of(cfg.teacher, runtime, threads=compute_threads())
    start = time.perf_counter()
    session = runner.teacher_session(spec)  # the stage below finds this teacher built
    build_s = time.perf_counter() - start
    teacher, device = session.teacher, runtime.device
    gpu = device.type == "cuda"
    encoder_batch = args.encoder_batch or (64 if gpu else 1)
    enc = encoder_rate(teacher, encoder_batch, iters=args.encoder_iters or (5 if gpu else 1))

    # The stage before the batched path: SAM2ImagePredictor, one image at a time (same model object).
    session.teacher = Sam2PredictorTeacher(teacher.model, runtime, cfg.teacher.multimask_output, teacher.metadata)
    try:
        if gpu:  # a warm-up pass first (the first CUDA calls select kernels); on a CPU there is nothing to warm
            stage_rate(
                small, tmp / f"{model}-predictor-warmup.zarr", f"teacher.model={model}", "teacher.images_per_batch=1"
            )
        old = stage_rate(small, tmp / f"{model}-predictor.zarr", f"teacher.model={model}", "teacher.images_per_batch=1")
    finally:
        session.teacher = teacher
    stage_rate(small, tmp / f"{model}-warmup.zarr", f"teacher.model={model}")  # warm-up at the stage's batch size
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    with Utilisation(device) as util:
        new = stage_rate(big, tmp / f"{model}.zarr", f"teacher.model={model}", *args.set)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if gpu else None
    per_image = new["instances"] / new["images"]
    rate = new["instances_per_s"]
    lines = [
        f"## {model}: random weights, {runtime.describe()}, teacher build {build_s:.1f} s",
        f"{'path':<46} {'img/s':>8} {'inst/s':>9} {'vs encoder':>11}",
        f"{f'encoder alone, batch {encoder_batch} (the limit)':<46} {enc:8.1f} {enc * per_image:9.1f} {1:10.2f}x",
    ]
    for name, figures in (
        (f"stage, predictor path ({old['instances']} inst)", old),
        (f"stage, batched x{new['images_per_batch']} ({new['instances']} inst)", new),
    ):
        r = figures["instances_per_s"]
        lines.append(f"{name:<46} {r / per_image:8.1f} {r:9.1f} {r / (enc * per_image):10.2f}x")
    lines.append(
        f"batched over predictor path: {rate / old['instances_per_s']:.2f}x; peak device memory "
        + (f"{peak:.1f} GiB" if peak is not None else "n/a (CPU)")
        + "; GPU utilisation "
        + (f"{util.mean:.0f} %" if util.mean is not None else "n/a")
        + f"; batch splits {new['batch_splits']}; JPEGs decoded on the device {new['images_decoded_on_device']}; "
        f"teacher calls {new['teacher_seconds'] / new['seconds'] * 100:.0f} % of the stage's time"
    )
    if args.dask:
        dask = stage_rate(big, tmp / f"{model}-dask.zarr", f"teacher.model={model}", "teacher.executor=dask", *args.set)
        lines.append(
            f"stage on a dask LocalCluster ({dask['workers']} worker(s), one per GPU; worker start and teacher "
            f"build included): {dask['instances_per_s']:.1f} inst/s, {dask['encoder_passes']} encoder passes "
            f"for {dask['images']} images"
        )
    agree, max_dsig = store_agreement(tmp / f"{model}-predictor.zarr", tmp / f"{model}-warmup.zarr")
    lines.append(
        f"batched vs predictor path on the same {old['instances']} instances: {agree * 100:.3f} % of stored mask "
        f"decisions agree, max |sigmoid difference| {max_dsig:.4f}"
    )
    lines.append(
        f"full COCO train2017 ({COCO_TRAIN_INSTANCES:,} instances) at this rate: "
        f"{COCO_TRAIN_INSTANCES / rate / 3600:.2f} h "
        f"(predictor path {COCO_TRAIN_INSTANCES / old['instances_per_s'] / 3600:.2f} h)"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco", default=str(DEFAULT_COCO), help="COCO folder with annotations/ and val2017/")
    parser.add_argument("--images", type=int, default=None, help="first N annotated val2017 images (GPU 25, CPU 2)")
    parser.add_argument(
        "--repeat", type=int, default=None, help="list the images this many times for the batched stage (GPU 20, CPU 2)"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="SAM2 models (GPU: sam2.1_hiera_tiny sam2.1_hiera_large; CPU: the tiny one)",
    )
    parser.add_argument("--encoder-batch", type=int, default=0, help="encoder-alone batch (0: 64 on a GPU, 1 on a CPU)")
    parser.add_argument(
        "--encoder-iters", type=int, default=0, help="encoder-alone iterations (0: 5 on a GPU, 1 on a CPU)"
    )
    parser.add_argument("--dask", action="store_true", help="also run the batched stage on a dask LocalCluster")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="extra params for the batched stage, e.g. teacher.images_per_batch=32",
    )
    args = parser.parse_args()
    coco = Path(args.coco)
    if not (coco / "val2017").is_dir():
        sys.exit(f"{coco}/val2017 not found: pass --coco DIR (the coco-sample of ../shared/data)")
    warnings.simplefilter("ignore", RandomWeightsWarning)
    gpu = torch.cuda.is_available()
    args.images = args.images or (25 if gpu else 2)
    args.repeat = args.repeat or (20 if gpu else 2)
    args.models = args.models or (["sam2.1_hiera_tiny", "sam2.1_hiera_large"] if gpu else ["sam2.1_hiera_tiny"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = prepared_sets(coco, args.images, 1, tmp, "small")
        big = prepared_sets(coco, args.images, args.repeat, tmp, "big")
        device = resolve_runtime(load_config(REPO / "params.yaml", small).runtime).device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
        print(
            f"# teacher-logits throughput on {device} ({name}); torch {torch.__version__}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}; {args.images} coco-sample val2017 images, x{args.repeat} for the "
            "batched stage",
            flush=True,
        )
        for model in args.models:
            print("\n".join(bench_sam2(model, small, big, tmp, args)), flush=True)
        if importlib.util.find_spec("sam3") is None:
            print("## sam3: the sam3 package is not installed here; its geometric and instance paths were not run")
        else:  # minutes per image on a CPU: its own benchmark, each teacher in a child process of its own
            print(
                "## sam3: its geometric and instance paths are measured by bench/teacher_sam3.py (build, encode, "
                "s/prompt, peak memory, COCO time, next to SAM2.1-tiny)"
            )


if __name__ == "__main__":
    main()
