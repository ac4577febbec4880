"""A student that did not train is said so, loudly, from the trainer to the camera package.

``recipe.size: auto`` picks the run by the train split's size (a small copy of COCO gets the sample run, which
trains, not the papers' full run, which ends inside its warm-up); the trainer warns before and after a run too short
to train or one whose val IoU did not improve, and records ``untrained`` in its metrics, report and checkpoints;
quantize, export and package read the flag and say so again. The teacher pass's bar moves per image.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tqdm import tqdm

from picosam_pipeline.config import TrainConfig, load_config
from picosam_pipeline.device import Runtime
from picosam_pipeline.recipes import FULL_RUN, SAMPLE_RUN, full_run_min_samples, settle_auto_size, size_for_samples
from picosam_pipeline.teacher.base import OneImageAtATime, TeacherOutput
from picosam_pipeline.train.shard_training import read_pack_shards, resolve_train_config, settle_recipe_size
from picosam_pipeline.train.trainer import MIN_IOU_GAIN, no_gain_warning, short_run_warning, untrained_paragraph
from tests.helpers.paths import REPO
from tests.helpers.pipeline_inputs import elsewhere

PARAMS = REPO / "params.yaml"
CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None, seed=0)
SIZE_KEYS = tuple(k.removeprefix("train.") for k in SAMPLE_RUN)


def _size_keys(t: TrainConfig) -> dict[str, object]:
    return {f"train.{k}": getattr(t, k) for k in SIZE_KEYS}


# --------------------------------------------------------------------------------------------------
# recipe.size auto: by the dataset's size


def test_auto_size_is_full_only_when_an_epoch_of_the_full_run_outlasts_its_warm_up_twice():
    assert full_run_min_samples("picosam3") == 2 * 1000 * 64 and full_run_min_samples("picosam2") == 2 * 1000 * 8
    assert size_for_samples("picosam3", 29) == "sample" and size_for_samples("picosam3", 127_999) == "sample"
    assert size_for_samples("picosam3", 128_000) == "full" and size_for_samples("picosam2", 16_000) == "full"
    assert size_for_samples("picosam3", 860_000) == "full"  # COCO 2017's train instances


def test_a_small_copy_of_coco_gets_the_sample_run_and_keeps_the_keys_the_params_set():
    cfg = load_config(PARAMS, ["dataset.name=coco11"])
    assert _size_keys(cfg.train) == FULL_RUN["picosam3"]  # provisional, before the shards are known
    settled = settle_recipe_size(cfg.train, cfg.recipe, "coco11", train_samples=29)
    assert _size_keys(settled) == SAMPLE_RUN
    own = load_config(PARAMS, ["dataset.name=coco11", "train.steps=500"])
    settled = settle_recipe_size(own.train, own.recipe, "coco11", train_samples=29)
    assert settled.steps == 500 and (settled.batch_size, settled.warmup_steps) == (8, 30)
    # sized by the params: nothing to settle
    fixed = load_config(PARAMS, ["dataset.name=coco11", "recipe.size=full"])
    assert settle_recipe_size(fixed.train, fixed.recipe, "coco11", train_samples=29) == fixed.train


def test_the_sample_resolves_as_before_and_a_big_sample_gets_the_full_run():
    cfg = load_config(PARAMS)
    assert settle_recipe_size(cfg.train, cfg.recipe, "sample", train_samples=48) == cfg.train  # identical
    size, changes = settle_auto_size("picosam3", "sample", 200_000, _size_keys(cfg.train))
    assert size == "full" and changes == {k: v for k, v in FULL_RUN["picosam3"].items() if SAMPLE_RUN[k] != v}


def test_the_train_stage_settles_auto_on_the_train_shards(sample_shards, capsys):
    shards = read_pack_shards(sample_shards)
    cfg = load_config(PARAMS, ["dataset.name=coco11"])
    t = resolve_train_config(cfg.train, "cpu", shards, cfg.recipe, "coco11")
    assert (t.steps, t.batch_size, t.warmup_steps) == (300, 8, 30)
    said = capsys.readouterr().out
    assert f"recipe.size: auto = sample ({shards.train.samples} train samples" in said and "128000" in said


# --------------------------------------------------------------------------------------------------
# the trainer's warnings


def test_a_run_inside_its_warm_up_or_under_the_minimum_is_named_with_the_fix():
    inside = short_run_warning(TrainConfig(steps=20, warmup_steps=30))  # the sample run with train.steps=20
    assert "train.steps=20 ends inside" in inside and "train.warmup_steps=30" in inside
    assert "Set train.steps=100 or more." in inside
    epoch = short_run_warning(TrainConfig(steps=1, batch_size=64, warmup_steps=1000))  # the full run, 29 samples
    assert "Set train.steps=2000 or more, or recipe.size=sample for a dataset this small (300 steps" in epoch
    short = short_run_warning(TrainConfig(steps=50, warmup_steps=30))
    assert "train.steps=50 is under the 100 steps" in short
    assert short_run_warning(TrainConfig(steps=300, warmup_steps=30)) is None


def test_no_val_iou_gain_is_named_with_the_numbers():
    stuck = no_gain_warning([[0, 0.3943], [20, 0.3944]], best_step=20)
    assert "0.3943 untrained (step 0), 0.3944 at best (step 20), 0.3944 at the end" in stuck
    assert str(MIN_IOU_GAIN) in stuck
    assert no_gain_warning([[0, 0.39], [100, 0.54], [200, 0.50]], best_step=100) is None
    paragraph = untrained_paragraph([stuck], before_training=False)
    assert paragraph.startswith("\nWARNING: the student is UNTRAINED.") and "untrained: true" in paragraph


@pytest.fixture(scope="module")
def short_run(sample_inputs, sample_shards, tmp_path_factory):
    """The train stage, 4 steps on the session's sample shards (inside its 30 warm-up steps): ``(cfg, stderr)``."""
    from picosam_pipeline.stages import train as train_stage

    root = tmp_path_factory.mktemp("untrained")
    cfg = elsewhere(sample_inputs, root)
    section = dataclasses.replace(
        cfg.train,
        student="picosam2",
        steps=4,
        batch_size=4,
        warmup_steps=30,
        eval_every=4,
        checkpoint_every=4,
        log_every=2,
        shards=str(sample_shards),
        out_dir=str(root / "train"),
    )
    cfg = dataclasses.replace(cfg, train=section)
    with pytest.MonkeyPatch.context() as mp:
        err = io.StringIO()
        mp.setattr("sys.stderr", err)
        train_stage.run(cfg, CPU)
    return cfg, err.getvalue()


def test_a_short_run_is_warned_before_and_after_and_flagged_everywhere(short_run):
    from picosam_pipeline.train.checkpoints import load_checkpoint

    cfg, stderr = short_run
    before = stderr.index("WARNING: this run will not train the student. train.steps=4 ends inside")
    after = stderr.index("WARNING: the student is UNTRAINED.")
    assert before < stderr.index("untrained picosam2: val IoU") < after  # the first one before any training
    headline = json.loads((Path(cfg.runtime.metrics_dir) / "train.json").read_text())
    assert headline == {"val_iou_before": headline["val_iou_before"], "val_iou_after": headline["val_iou_after"]} | {
        "untrained": True
    }
    report = json.loads((Path(cfg.train.out_dir) / "report.json").read_text())
    assert report["untrained"] is True and "train.warmup_steps=30" in report["warnings"][0]
    for name in ("student.pt", "student_best.pt"):
        _, meta = load_checkpoint(Path(cfg.train.out_dir) / name, kind="student")
        assert meta["untrained"] is True and meta["training_warnings"] == report["warnings"]


# --------------------------------------------------------------------------------------------------
# quantize, export and package of an untrained student


def test_quantize_flags_an_untrained_student_in_its_metrics_and_on_stderr(capsys):
    from picosam_pipeline.deploy.quantized_student import QuantizeResult
    from picosam_pipeline.untrained import training_warnings

    assert training_warnings({"untrained": False, "training_warnings": []}) is None
    assert training_warnings({"student": "picosam3"}) is None  # a checkpoint of an older trainer: not flagged
    warnings = training_warnings({"untrained": True, "training_warnings": ["train.steps=4 ends inside ..."]})
    report = {"student": {"crop_miou": 0.3}, "student_int8": {"crop_miou": 0.29}}
    result = QuantizeResult("picosam3", report, {}, {"seconds": {"total": 1.0}}, 0.02, warnings, "s.pt")
    assert result.headline()["untrained_student"] is True
    assert "untrained_student" not in dataclasses.replace(result, training_warnings=None).headline()
    result.warn()
    err = capsys.readouterr().err
    assert "WARNING: quantize is working on an UNTRAINED student (s.pt)" in err and "train.steps=4 ends" in err


DNN_PARAMS = """<?xml version="1.0"?><dnnParams><networks><network name="picosam_int8" ordinal="0"><inputTensors>
<inputTensor ordinal="0" name="in:0" bitsPerElement="8" scale="0.00390625" format="unsigned"><dimensions>
<dimension size="3" ordinal="0"/><dimension size="16" ordinal="1"/><dimension size="16" ordinal="2"/></dimensions>
</inputTensor></inputTensors><outputTensors><outputTensor ordinal="0" name="out:0" bitsPerElement="8" scale="0.125"
format="signed"><dimensions><dimension size="1" ordinal="0"/><dimension size="16" ordinal="1"/>
<dimension size="16" ordinal="2"/></dimensions></outputTensor></outputTensors></network></networks></dnnParams>"""


def _fake_converter(monkeypatch) -> None:
    """The Java check and the converter replaced by what they leave for a network that fits."""
    from picosam_pipeline.deploy import imx500

    java = imx500.JavaInfo("/usr/bin/java", "17.0.15", 17)

    def convert(onnx_path, out_dir, **kwargs):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "packerOut.zip").write_bytes(b"PK-packer")
        (out / "dnnParams.xml").write_text(DNN_PARAMS)
        report = imx500.MemoryReport("picosam_int8", 3844000, 8388480, 2403424, 1439552, 3844000 / 8388480, True, True)
        return imx500.Conversion(out / "packerOut.zip", report, 42.0, java, {"nodes": 7, "ops": {}})

    monkeypatch.setattr(imx500, "check_java", lambda: java)
    monkeypatch.setattr(imx500, "convert", convert)


def _onnx_warnings(path: Path) -> list[str] | None:
    from picosam_pipeline.deploy.onnx_export import METADATA_PREFIX, read_onnx_metadata
    from picosam_pipeline.untrained import metadata_training_warnings

    return metadata_training_warnings(read_onnx_metadata(path), METADATA_PREFIX)


def test_export_and_package_read_the_flag_from_the_onnx_files_and_say_so(tmp_path, monkeypatch, capsys):
    from picosam_pipeline.deploy import onnx_export as files
    from picosam_pipeline.stages import export, package
    from picosam_pipeline.untrained import untrained_metadata
    from tests.helpers.pipeline_inputs import tiny_export

    exported = tiny_export(tmp_path / "trained")
    assert _onnx_warnings(exported / files.EXPORT_MCTQ_FILE) is None  # a trained student: nothing added
    assert "untrained_student" not in json.loads((tmp_path / "trained" / "metrics" / "export.json").read_text())

    # the quantize stage of an untrained student stamps its files (write_quantized_files); export keeps the stamp
    warnings = ["val IoU did not improve: 0.2844 untrained (step 0), 0.2844 at best (step 1)."]
    quantized = tmp_path / "trained" / "quantize"
    for name in (files.QUANTIZE_MCTQ_FILE, files.QUANTIZE_FAKEQUANT_FILE):
        files.stamp_metadata(quantized / name, untrained_metadata(warnings))
    cfg = load_config(
        None,
        [
            f"export.quantized_dir={quantized}",
            f"export.out_dir={tmp_path / 'export'}",
            f"runtime.metrics_dir={tmp_path / 'metrics'}",
            "export.min_mask_agreement=0.9",
        ],
    )
    capsys.readouterr()
    assert export.run(cfg, None)["untrained_student"] is True
    assert json.loads((tmp_path / "metrics" / "export.json").read_text())["untrained_student"] is True
    assert _onnx_warnings(tmp_path / "export" / files.EXPORT_MCTQ_FILE) == warnings
    assert "WARNING: export is working on an UNTRAINED student" in capsys.readouterr().err

    _fake_converter(monkeypatch)
    sets = [f"package.export_dir={tmp_path / 'export'}", f"package.out_dir={tmp_path / 'package'}"]
    summary = package.run(load_config(None, [*sets, f"runtime.metrics_dir={tmp_path / 'metrics'}"]), None)
    assert summary["untrained_student"] is True
    assert json.loads((tmp_path / "metrics" / "package.json").read_text())["untrained_student"] is True
    err = capsys.readouterr().err
    assert "WARNING: package is working on an UNTRAINED student" in err and "0.2844 untrained (step 0)" in err


# --------------------------------------------------------------------------------------------------
# progress


def test_the_instance_bar_follows_whichever_is_ahead_and_stops_at_its_total():
    from picosam_pipeline.teacher.teacher_pass import InstanceProgress

    bar = tqdm(total=10, file=io.StringIO())
    progress = InstanceProgress(bar)
    progress.computed(3)  # an image's instances, before its shard is written
    assert bar.n == 3
    progress.written(2)
    assert bar.n == 3
    progress.computed(9)  # a dask task run again counts its images twice
    assert bar.n == 10
    progress.close()
    progress.written(10)
    assert bar.n == 10


class _BoxTeacher(OneImageAtATime):
    """A stand-in for SAM2 in milliseconds: each prompt's box (a point's 40-px square) as the mask logits."""

    def __init__(self, cfg, runtime: Runtime) -> None:
        self.metadata = {"teacher": "box", "model": cfg.model, "weights": "random weights", "weights_sha256": "0" * 64}

    def set_image(self, rgb: np.ndarray) -> None:
        self.size = rgb.shape[1], rgb.shape[0]

    def predict_boxes(self, boxes: np.ndarray) -> TeacherOutput:
        (w, h), u = self.size, (np.arange(32) + 0.5) / 32
        xs, ys = u[None, None, :] * w, u[None, :, None] * h
        b = boxes[:, :, None, None]
        inside = (xs >= b[:, 0]) & (xs <= b[:, 2]) & (ys >= b[:, 1]) & (ys <= b[:, 3])
        logits = np.where(inside, 8.0, -8.0).astype(np.float32)
        return TeacherOutput(torch.from_numpy(logits), torch.full((len(boxes),), 0.75))

    def predict_points(self, points: np.ndarray) -> TeacherOutput:
        return self.predict_boxes(np.concatenate([points - 20.0, points + 20.0], axis=1))


def test_a_one_shard_pass_moves_the_bar_per_image(teacher_project, monkeypatch, tmp_path):
    from picosam_pipeline.device import resolve_runtime
    from picosam_pipeline.stages import teacher_logits
    from picosam_pipeline.teacher import runner as teacher_runner
    from picosam_pipeline.teacher.teacher_pass import InstanceProgress
    from tests.helpers.teacher_project import config

    monkeypatch.setattr(teacher_runner, "build_teacher", _BoxTeacher)
    monkeypatch.setattr(teacher_runner, "_session", None)
    monkeypatch.chdir(teacher_project[0])
    seen: list[tuple[int, int]] = []  # (instances computed, instances of shards written by then)
    computed = InstanceProgress.computed
    monkeypatch.setattr(
        InstanceProgress, "computed", lambda self, n: (seen.append((n, self.done["written"])), computed(self, n))
    )
    out = tmp_path / "logits.zarr"
    cfg = config(
        *teacher_project,
        f"teacher.out={out}",
        f"runtime.metrics_dir={tmp_path / 'metrics'}",
        "teacher.executor=local",
    )
    teacher_logits.run(cfg, resolve_runtime(cfg.runtime))
    figures = json.loads((tmp_path / "metrics" / "teacher-logits.json").read_text())
    assert len(seen) >= 2 and sum(n for n, _ in seen) == figures["instances"]  # one report per image (1 per batch)
    assert all(written == 0 for _, written in seen)  # all before the one shard was written


def test_dask_workers_report_their_images_to_the_bar_through_events(teacher_project, monkeypatch, tmp_path):
    """teacher.scheduler_address: a cluster started here, in-process, so that the stand-in teacher applies."""
    from distributed import LocalCluster

    from picosam_pipeline.device import resolve_runtime
    from picosam_pipeline.stages import teacher_logits
    from picosam_pipeline.teacher import runner as teacher_runner
    from picosam_pipeline.teacher.teacher_pass import InstanceProgress
    from tests.helpers.teacher_project import config

    monkeypatch.setattr(teacher_runner, "build_teacher", _BoxTeacher)
    monkeypatch.setattr(teacher_runner, "_session", None)
    monkeypatch.chdir(teacher_project[0])
    seen: list[int] = []
    computed = InstanceProgress.computed
    monkeypatch.setattr(InstanceProgress, "computed", lambda self, n: (seen.append(n), computed(self, n)))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        cfg = config(
            *teacher_project,
            f"teacher.out={tmp_path / 'logits.zarr'}",
            f"runtime.metrics_dir={tmp_path / 'metrics'}",
            "teacher.executor=dask",
            f"teacher.scheduler_address={cluster.scheduler_address}",
        )
        teacher_logits.run(cfg, resolve_runtime(cfg.runtime))
    figures = json.loads((tmp_path / "metrics" / "teacher-logits.json").read_text())
    assert seen and sum(seen) <= figures["instances"]  # per image, as the events arrived (a late one is dropped)
