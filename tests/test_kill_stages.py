"""Atomic outputs, for real: kill each stage at random moments (SIGKILL and SIGINT), then rerun it.

For every stage tested: the output folder first holds a previous complete output ``P`` (the stage run with other
params); the stage is then started with the params of the reference ``R`` as ``picosam-pipeline run-stage`` in its
own process group and killed twice, once with SIGKILL and once with SIGINT (random order), at random moments of its
work: one in each half of 1.2x its measured duration, counted from the moment it holds its output's lock (the plan
is printed; ``PICOSAM_KILL_SEED`` draws another). After every kill
the output folder must be exactly ``P`` or exactly ``R``, never anything else. The rerun (in this process: it takes
over the killed runs' lock) must end with exactly ``R`` and leave nothing beside the output (no ``.partial``,
``.replaced`` or lock file); the trainer's resumable state is the one thing kept, and its rerun resumes from it.

Stages: sample, prepare, pack, train and evaluate on the tiny inputs of ``pipeline_inputs.build_inputs``, and
export as the representative of the deploy stages (it writes through the same ``StageOutput`` as quantize and
package; quantize's MCT run and package's Java converter take minutes on a CPU). The teacher's kill test
(SIGKILL, dask) is ``tests/teacher/test_teacher_crash.py``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from picosam_pipeline.config import load_config
from picosam_pipeline.device import resolve_runtime
from picosam_pipeline.stages import STAGES
from tests.helpers.paths import REPO

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).parent / "picosam-pipeline")
PARAMS = REPO / "params.yaml"
STAGES_KILLED = ("sample", "prepare", "pack", "train", "evaluate", "export")


@pytest.fixture(scope="module")
def inputs(sample_student) -> Path:
    """The session's build_inputs folder (read-only): ``sample/``, ``prepared/``, ``stores/`` (GT-mask store),
    ``shards/`` and a student checkpoint ``student.pt``."""
    root = sample_student.parent
    assert all((root / name).exists() for name in ("sample", "prepared", "stores", "shards", "student.pt"))
    return root


def _quantize_folder(folder: Path) -> None:
    """A folder laid out as the quantize stage writes it, for a tiny model MCT quantises in seconds."""
    from picosam_pipeline.data.crops import crop_convention
    from picosam_pipeline.deploy.onnx_export import (
        QUANTIZE_FAKEQUANT_FILE,
        QUANTIZE_MCTQ_FILE,
        QUANTIZE_PROBE_FILE,
        QUANTIZE_REPORT_FILE,
        export_quantized,
    )
    from picosam_pipeline.deploy.quantize import RgbModel, quantize
    from picosam_pipeline.train.students import NORMALIZATION
    from tests.helpers.tiny_models import SIZE, tiny_camera_model

    torch.manual_seed(0)
    int8 = quantize(tiny_camera_model(), [torch.rand(8, 3, SIZE, SIZE) for _ in range(2)])
    folder.mkdir()
    for fmt, name in (("mctq", QUANTIZE_MCTQ_FILE), ("fakequant", QUANTIZE_FAKEQUANT_FILE)):
        export_quantized(int8, folder / name, fmt=fmt, input_size=SIZE, metadata={"input_normalization": "in_graph"})
    rgb = torch.rand(4, 3, SIZE, SIZE).numpy()
    logits = RgbModel(int8, "int8", SIZE)(rgb)
    np.savez(folder / QUANTIZE_PROBE_FILE, rgb=rgb, int8_logits=logits, float_logits=logits)
    meta = {
        "student": "picosam2",
        "input_size": SIZE,
        "normalization": {"mean": list(NORMALIZATION.mean), "std": list(NORMALIZATION.std)},
    }
    crop = crop_convention("roi", roi_padding=0.1, window=96, input_size=SIZE)  # what the quantize stage records
    (folder / QUANTIZE_REPORT_FILE).write_text(
        json.dumps({"student_meta": meta, "tpc_version": "4.0", "method": "ptq", "crop": crop})
    )


def stage_sets(stage: str, root: Path, out: Path) -> tuple[list[str], list[str]]:
    """``--set`` overrides of the reference run R and the extra ones of the previous output P."""
    common = ["runtime.device=cpu", f"runtime.metrics_dir={out.parent / 'metrics'}", "runtime.num_threads=1"]
    if stage == "sample":
        return [
            *common,
            f"sample.out_dir={out}",
            "dataset.name=coco2017",
            "sample.plant_bad_inputs=false",
            "sample.train_images=4",
            "sample.val_images=2",
        ], ["sample.seed=1"]
    if stage == "prepare":
        splits = [
            {
                "name": s,
                "annotations": str(root / f"sample/annotations/instances_{s}.json"),
                "images": str(root / "sample" / s),
            }
            for s in ("train", "val")
        ]
        return [*common, f"prepare.out_dir={out}", f"prepare.splits={json.dumps(splits)}"], ["prepare.min_area=2000"]
    if stage == "pack":
        return [
            *common,
            f"pack.out_dir={out}",
            f"pack.index={root / 'prepared/index.parquet'}",
            f"pack.stores_dir={root / 'stores'}",
            "pack.teachers=[gt]",
            "pack.samples_per_shard=8",
        ], ["pack.seed=1"]
    if stage == "train":
        return [
            *common,
            f"train.out_dir={out}",
            f"train.state_dir={out}.state",
            f"train.shards={root / 'shards'}",
            "train.student=picosam3",
            "train.steps=4",
            "train.batch_size=4",
            "train.checkpoint_every=2",
            "train.eval_every=4",
            "train.log_every=2",
            "train.warmup_steps=2",
        ], ["runtime.seed=1", "train.steps=2"]
    if stage == "evaluate":
        return [
            *common,
            f"evaluate.out_dir={out}",
            f"evaluate.shards={root / 'shards/val'}",
            f"evaluate.checkpoint={root / 'student.pt'}",
            f"evaluate.index={root / 'prepared/index.parquet'}",
            "evaluate.grid_samples=4",
            "evaluate.batch_size=4",
        ], ["evaluate.grid_samples=0"]
    if stage == "export":
        return [
            *common,
            f"export.out_dir={out}",
            f"export.quantized_dir={out.parent / 'quantize'}",  # the test's own (_quantize_folder)
            "export.mctq_check_samples=2",
            "export.min_mask_agreement=0.9",
        ], ["export.mctq_check_samples=1"]
    raise AssertionError(stage)


def contents(folder: Path) -> dict[str, object] | None:
    """What a complete output is made of (None when missing): its files' bytes (no stage writes a timing into them)."""
    if not folder.exists():
        return None
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def run_in_process(stage: str, sets: list[str]) -> float:
    """Run the stage in this process as the CLI would (same config, same torch threads); returns its seconds."""
    cfg = load_config(PARAMS, sets)
    threads = torch.get_num_threads()
    try:
        runtime = resolve_runtime(cfg.runtime)
        start = time.perf_counter()
        STAGES[stage].load()(cfg, runtime)
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def start_cli(stage: str, sets: list[str], cwd: Path) -> tuple[subprocess.Popen, list[bytes]]:
    """The stage as a person runs it, in its own process group; its stderr collected in the background."""
    args = [CLI, "run-stage", stage, "--params", str(PARAMS), *(a for s in sets for a in ("--set", s))]
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    log: list[bytes] = []
    threading.Thread(target=lambda: log.extend(iter(lambda: proc.stderr.read1(4096), b"")), daemon=True).start()
    return proc, log


def wait_until_working(proc: subprocess.Popen, out: Path) -> None:
    """Until ``proc`` holds the output's lock (it starts writing right after): kills land in the stage's work, not
    in the imports before it."""
    holder = out.with_name(out.name + ".stage-lock.holder")
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if json.loads(holder.read_text()).get("pid") == proc.pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.02)


@pytest.mark.parametrize("stage", STAGES_KILLED)
def test_kills_at_random_moments_leave_the_previous_or_the_new_output_and_the_rerun_ends_as_an_uninterrupted_run(
    stage, inputs, tmp_path
):
    if stage == "export":
        _quantize_folder(tmp_path / "quantize")
    out = tmp_path / stage
    sets, previous = stage_sets(stage, inputs, out)
    seconds = run_in_process(stage, sets)
    reference = contents(out)
    if (tmp_path / f"{stage}.state").exists():  # train's resumable state of the reference run: start afresh
        shutil.rmtree(tmp_path / f"{stage}.state")
    run_in_process(stage, [*sets, *previous])  # the previous complete output P, replaced by R below
    before = contents(out)
    assert before != reference and reference is not None

    # One kill in each half of the run (1.2x its measured time, the publish included), in random order of signals.
    rng = random.Random(f"{stage}-{os.environ.get('PICOSAM_KILL_SEED', '0')}")
    signals = rng.sample([signal.SIGKILL, signal.SIGINT], 2)
    plan = [(rng.uniform(i * 0.6 * seconds, (i + 1) * 0.6 * seconds), sig) for i, sig in enumerate(signals)]
    print(f"{stage}: {seconds:.1f} s in process; kills at {[(round(d, 2), s.name) for d, s in plan]}")
    for delay, sig in plan:
        proc, log = start_cli(stage, sets, tmp_path)
        wait_until_working(proc, out)
        time.sleep(delay)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # a short stage (export: ~0.05 s) ended, and was reaped, before the kill
            pass
        proc.wait(timeout=300)
        now = contents(out)
        assert now in (before, reference), f"after {sig.name} at {delay:.2f} s the output is neither P nor R"
        text = b"".join(log).decode(errors="replace")
        finished = "] done in " in text  # the signal came after the stage, while the interpreter shut down
        # A Ctrl-C landing inside onnxruntime's custom-op callback (MCT's INT8 ops, export's checks) makes pybind11
        # abort the process (SIGABRT) instead of raising: a hard stop like SIGKILL, which the output survives too.
        aborted_in_ort = stage == "export" and proc.returncode == -signal.SIGABRT and "pybind11" in text
        if (
            proc.returncode not in (0, -signal.SIGKILL)
            and not (finished and proc.returncode == -signal.SIGINT)
            and not aborted_in_ort
        ):
            assert proc.returncode == 130 and "Traceback" not in text, text[-3000:]  # Ctrl-C: one line, exit 130

    run_in_process(stage, sets)  # the rerun: takes over a killed run's lock, tidies, resumes where it can
    assert contents(out) == reference
    own = ("metrics", stage, f"{stage}.state", *(["quantize"] if stage == "export" else []))  # quantize: its input
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in own)
    assert left == [], f"left beside the output: {left}"
