"""Trainer throughput on whatever device this machine has: the bare training step against the ``train`` stage.

Run from the repository root:  ``python bench/train_gpu.py [--train-images 600] [--steps 150] [--batch 64]``

In one run, PicoSAM3 (or ``--student``) at ``--batch``, for each ``train.compile`` setting in ``--compile``:

* **bare step**: the stage's own optimizer step (``trainer.TrainStep``: target, forward, distillation loss,
  backward, gradient clipping, AdamW) on one batch resident on the device (no loader), under the stage's
  autocast, compiled or not (compile time excluded: warm-up steps first). The limit of any trainer.
* **stage**: ``stages.train.run`` on shards packed from the built-in sample (``--train-images`` synthetic images,
  GT masks as teacher logits via ``teacher/gt_mask.py``: the loader's work is the same as with real logits),
  ``train.num_workers`` at its default (``auto``) unless ``--set`` says otherwise; its rate is the trainer's own
  ``samples_per_s`` (after the first step; evaluation and checkpoints excluded, epoch restarts included), and
  the share of that time its host spent waiting for the loader.

Prints both rates and their ratio (target on a GPU: stage >= 80 % of the bare step). Nothing is asserted. The
defaults depend on the device: on a GPU as measured for the README; on a CPU a smoke test (8 images, 4 steps of
8, eager only) that CI runs (``tests/test_benchmarks.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import torch  # noqa: E402

from picosam_pipeline.config import TrainConfig, load_config  # noqa: E402
from picosam_pipeline.device import Runtime, resolve_runtime  # noqa: E402
from picosam_pipeline.recipes import recipe_values  # noqa: E402
from picosam_pipeline.reports import last_run  # noqa: E402
from picosam_pipeline.stages import pack, prepare, sample, train  # noqa: E402
from picosam_pipeline.teacher.gt_mask import write_mask_teacher_store  # noqa: E402
from picosam_pipeline.train.losses import DistillationLoss  # noqa: E402
from picosam_pipeline.train.students import build_student  # noqa: E402
from picosam_pipeline.train.targets import resolve_target  # noqa: E402
from picosam_pipeline.train.trainer import TrainStep, build_optimizer  # noqa: E402


def packed_sets(tmp: Path, train_images: int, samples_per_shard: int) -> list[str]:
    """``--set`` overrides of a project in ``tmp``: the sample generated, prepared, GT-mask store, packed."""
    root = tmp / "sample"
    splits = ", ".join(
        f"{{name: {s}, annotations: {root / f'annotations/instances_{s}.json'}, images: {root / s}}}"
        for s in ("train", "val")
    )
    sets = [
        f"sample.train_images={train_images}",
        "sample.plant_bad_inputs=false",
        f"sample.out_dir={root}",
        f"prepare.splits=[{splits}]",
        f"prepare.out_dir={tmp / 'prepared'}",
        f"pack.index={tmp / 'prepared/index.parquet'}",
        f"pack.stores_dir={tmp / 'stores'}",
        "pack.teachers=[gt]",
        f"pack.out_dir={tmp / 'shards'}",
        f"pack.samples_per_shard={samples_per_shard}",
        f"train.shards={tmp / 'shards'}",
        f"train.out_dir={tmp / 'train'}",
        f"runtime.metrics_dir={tmp / 'metrics'}",
    ]
    cfg = load_config(REPO / "params.yaml", sets)
    with contextlib.redirect_stderr(io.StringIO()):
        sample.run(cfg, None)
        prepare.run(cfg, None)
        write_mask_teacher_store(cfg.pack.index, cfg.pack.store_paths()["gt"], splits=cfg.pack.splits)
        pack.run(cfg, None)
    return sets


def bare_step_rate(cfg: TrainConfig, steps: int, runtime: Runtime, compiled: bool) -> float:
    """Samples/s of the stage's own optimizer step (``trainer.TrainStep``: target, forward, loss, backward, gradient
    clipping, AdamW) on one batch resident on the device."""
    torch.manual_seed(0)
    device, batch = runtime.device, cfg.batch_size
    model = build_student(cfg.student).to(device).train()
    step = TrainStep(
        model,
        model,
        build_optimizer(model, cfg, device),
        DistillationLoss(**cfg.loss_kwargs()),
        resolve_target(cfg.target, cfg.target_weights, ("gt",)),
        runtime,
        cfg.grad_clip,
        compile_batch=batch if compiled else None,
    )
    image = torch.rand(batch, 3, 96, 96, device=device)
    gt = (torch.rand(batch, 1, 96, 96, device=device) > 0.5).float()
    teacher = torch.randn(batch, 1, 96, 96, device=device) * 4
    confidence = torch.rand(batch, 1, device=device)

    for _ in range(3):  # compile, allocator, kernel selection
        step(image, gt, teacher, confidence, cfg.lr)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(image, gt, teacher, confidence, cfg.lr)
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--train-images", type=int, default=None, help="synthetic sample images to pack (GPU 600, CPU 8)"
    )
    parser.add_argument(
        "--samples-per-shard", type=int, default=256, help="pack.samples_per_shard (enough shards for every worker)"
    )
    parser.add_argument("--student", default="picosam3", choices=["picosam2", "picosam3"])
    parser.add_argument("--batch", type=int, default=None, help="batch size (GPU 64, CPU 8)")
    parser.add_argument("--steps", type=int, default=None, help="stage steps and bare steps timed (GPU 150, CPU 4)")
    parser.add_argument(
        "--compile",
        nargs="+",
        default=None,
        choices=["false", "true"],
        help="train.compile settings to run the bare step and the stage with (GPU both, CPU false)",
    )
    parser.add_argument(
        "--set", action="append", default=[], help="extra params for the stage, e.g. train.num_workers=4"
    )
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    args.train_images = args.train_images or (600 if gpu else 8)
    args.batch, args.steps = args.batch or (64 if gpu else 8), args.steps or (150 if gpu else 4)
    args.compile = args.compile or (["false", "true"] if gpu else ["false"])
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        # The student's own recipe (loss, schedule), on the ROI crops packed here: recipe custom allows that pairing.
        recipe = [f"{k}={v}" for k, v in recipe_values(args.student, "sample", "sample").items()]
        sets = [
            *packed_sets(tmp, args.train_images, args.samples_per_shard),
            "recipe.name=custom",
            *recipe,
            "teacher.prompt=roi",
            f"train.batch_size={args.batch}",
            f"train.steps={args.steps}",
            f"train.eval_every={args.steps}",
            f"train.checkpoint_every={args.steps}",
            *args.set,
        ]
        runtime = resolve_runtime(load_config(REPO / "params.yaml", sets).runtime)
        device = runtime.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
        print(
            f"# training throughput on {device} ({name}), {runtime.describe()}; torch {torch.__version__}, "
            f"{os.cpu_count()} CPUs; {args.student}, batch {args.batch}",
            flush=True,
        )
        for setting in args.compile:
            cfg = load_config(
                REPO / "params.yaml", [*sets, f"train.compile={setting}", f"train.out_dir={tmp / f'train-{setting}'}"]
            )
            bare = bare_step_rate(cfg.train, args.steps, runtime, compiled=setting == "true")
            with contextlib.redirect_stderr(io.StringIO()):
                train.run(cfg, runtime)
            facts = last_run(cfg.runtime.metrics_dir, "train")
            stage = facts["samples_per_s"]
            print(
                f"compile {setting:<5}: bare step {bare:9.1f} samples/s; train stage ({args.steps} steps, "
                f"{facts['loader_workers']} loader workers) {stage:9.1f} samples/s = {stage / bare * 100:.0f} % of "
                f"the bare step; {facts['loader_wait_share'] * 100:.0f} % of its time waiting for batches",
                flush=True,
            )


if __name__ == "__main__":
    main()
