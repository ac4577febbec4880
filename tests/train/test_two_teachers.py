"""Two teachers in one pipeline (PicoSAM3 distils from SAM2 and SAM3): named passes, packing both stores into one
sample, the loader's teacher channels, every train.target rule, and evaluate scoring each teacher.

The second teacher is a stand-in: the GT-mask store again with a softer gain and a lower confidence, so the two
teachers' logits and confidences differ everywhere and every combination rule has something to combine.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from picosam_pipeline.config import ConfigError, EvaluateConfig, TrainConfig, load_config
from picosam_pipeline.device import resolve_runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.stages import evaluate, train
from picosam_pipeline.teacher.gt_mask import write_mask_teacher_store
from picosam_pipeline.train.loader import make_loader
from picosam_pipeline.train.shards import read_shard_index
from picosam_pipeline.train.targets import resolve_target
from tests.helpers.paths import REPO
from tests.helpers.pipeline_inputs import elsewhere, own_store, run_pack, split_samples


@pytest.fixture(scope="module")
def two(sample_inputs, tmp_path_factory):
    """The built-in sample with stores ``gt`` (gain 4, confidence 1) and ``soft`` (gain 1, confidence 0.5), packed
    once with both teachers and once with ``gt`` alone."""
    root = tmp_path_factory.mktemp("two_teachers")
    cfg = elsewhere(sample_inputs, root)  # the session's index and gt store, read-only
    shutil.copytree(Path(cfg.pack.stores_dir) / "gt.zarr", root / "stores" / "gt.zarr")
    cfg = own_store(cfg, root / "stores", "soft", gain=1.0, confidence=0.5)
    run_pack(cfg, root / "one")
    both = dataclasses.replace(cfg, pack=dataclasses.replace(cfg.pack, teachers=["gt", "soft"]))
    run_pack(both, root / "both")
    return both, root


# --------------------------------------------------------------------------------------------------
# targets


def test_target_rules_combine_channels_as_documented():
    logits = torch.tensor([[2.0, -1.0], [-3.0, 0.5]]).reshape(1, 2, 1, 2)  # 1 sample, K = 2, 1 x 2 pixels
    confidence = torch.tensor([[0.9, 0.3]])
    teachers = ("sam2", "sam3")

    one, c = resolve_target("sam3", {}, teachers)(logits, confidence)
    assert torch.equal(one, logits[:, 1:2]) and torch.equal(c, torch.tensor([0.3]))
    mean, c = resolve_target("mean", {}, teachers)(logits, confidence)
    assert torch.allclose(mean, torch.logit(torch.sigmoid(logits).mean(1, keepdim=True)), atol=1e-6)
    assert torch.allclose(c, torch.tensor([0.6]))
    sure, c = resolve_target("confident", {}, teachers)(logits, confidence)
    assert torch.equal(sure, torch.tensor([-3.0, -1.0]).reshape(1, 1, 1, 2))  # per pixel, the larger |logit|
    weighted, c = resolve_target("weighted", {"sam2": 3.0, "sam3": 1.0}, teachers)(logits, confidence)
    want = torch.logit(0.75 * torch.sigmoid(logits[:, :1]) + 0.25 * torch.sigmoid(logits[:, 1:]))
    assert torch.allclose(weighted, want, atol=1e-6) and torch.allclose(c, torch.tensor([0.75 * 0.9 + 0.25 * 0.3]))
    extreme, _ = resolve_target("mean", {}, teachers)(torch.full((1, 2, 1, 1), 40.0), confidence)
    assert 15.9 < extreme.item() < 16.2  # probabilities clamped to 1 - 1e-7 (in float32), not inf


def test_target_names_what_the_shards_do_not_hold():
    with pytest.raises(PipelineError, match="auto needs shards of one teacher; these hold sam2, sam3"):
        resolve_target("auto", {}, ("sam2", "sam3"))
    with pytest.raises(PipelineError, match="no teacher 'sam3'.*pack.teachers"):
        resolve_target("sam3", {}, ("sam2",))
    with pytest.raises(PipelineError, match=r"every teacher.*missing \['sam3'\]"):
        resolve_target("weighted", {"sam2": 1.0}, ("sam2", "sam3"))
    assert resolve_target("auto", {}, ("sam2",)).describe() == "sam2"
    with pytest.raises(ConfigError, match="target_weights: set it"):
        load_config(None, ["train.target=weighted"])
    with pytest.raises(ConfigError, match="train.target: expected auto"):
        load_config(None, ["train.target=Not-A-Name"])


# --------------------------------------------------------------------------------------------------
# passes and packing


def test_teacher_passes_resolve_to_their_own_store_and_metrics(tmp_path):
    cfg = load_config(REPO / "params.yaml", ["teachers.sam3={model: sam3, checkpoint: data/checkpoints/sam3.pt}"])
    assert list(cfg.teachers) == ["sam2", "sam3"]
    sam2, sam3 = cfg.teacher_pass("sam2").teacher, cfg.teacher_pass("sam3").teacher
    assert (sam2.model, sam2.out, sam2.name) == ("sam2.1_hiera_tiny", "data/teacher/stores/sam2.zarr", "sam2")
    assert (sam3.model, sam3.checkpoint, sam3.out) == (
        "sam3",
        "data/checkpoints/sam3.pt",
        "data/teacher/stores/sam3.zarr",
    )
    assert sam3.prompt == cfg.teacher.prompt  # everything else comes from the teacher section
    with pytest.raises(ConfigError, match="teachers.sam3.modle: unknown key"):
        load_config(REPO / "params.yaml", ["teachers.sam3={modle: sam3}"])
    with pytest.raises(ConfigError, match="teachers.sam3.out: set per pipeline"):
        load_config(REPO / "params.yaml", ["teachers.sam3={out: elsewhere.zarr}"])
    with pytest.raises(ConfigError, match="no such teacher pass"):
        cfg.teacher_pass("sam4")


def test_pack_writes_a_member_per_teacher_and_the_loader_a_channel_per_teacher(two):
    cfg, root = two
    index = read_shard_index(root / "both" / "val")
    assert index.teachers == {"gt": "sigmoid_uint8", "soft": "sigmoid_uint8"}
    assert index.members == ("jpg", "mask.png", "logits.gt.png", "logits.soft.png", "json")
    sample = split_samples(root / "both" / "val")[0]
    record = json.loads(sample["json"])
    assert record["confidence"] == {"gt": 1.0, "soft": 0.5} and set(record["logits"]) == {"gt", "soft"}

    both = make_loader(root / "both" / "val", batch_size=64, shuffle_buffer=0, num_workers=0, seed=0)
    one = make_loader(root / "one" / "val", batch_size=64, shuffle_buffer=0, num_workers=0, seed=0)
    assert both.teachers == ["gt", "soft"] and one.teachers == ["gt"]
    for b2, b1 in zip(both, one):
        assert b2["teacher_logits"].shape[1] == 2 and torch.equal(b2["teacher_logits"][:, :1], b1["teacher_logits"])
        assert torch.equal(b2["confidence"], torch.tensor([[1.0, 0.5]]).expand(len(b2["ann_id"]), 2))
        soft, hard = b2["teacher_logits"][:, 1].abs().mean(), b2["teacher_logits"][:, 0].abs().mean()
        assert soft < hard / 2  # gain 1 vs 4: the second channel really is the second store
        assert torch.equal(b2["image"], b1["image"]) and torch.equal(b2["gt_mask"], b1["gt_mask"])


def test_pack_refuses_teachers_with_different_crops_and_old_shards(two, tmp_path):
    cfg, root = two
    stores = tmp_path / "stores"
    shutil.copytree(Path(cfg.pack.stores_dir) / "gt.zarr", stores / "gt.zarr")
    write_mask_teacher_store(cfg.pack.index, stores / "wide.zarr", splits=cfg.pack.splits, context_margin=0.25)
    mixed = dataclasses.replace(
        cfg, pack=dataclasses.replace(cfg.pack, stores_dir=str(stores), teachers=["gt", "wide"])
    )
    with pytest.raises(PipelineError, match="teachers gt and wide cannot share samples"):
        run_pack(mixed, tmp_path / "mixed")
    missing = dataclasses.replace(cfg, pack=dataclasses.replace(cfg.pack, teachers=["gt", "sam3"]))
    with pytest.raises(PipelineError, match=r"pack.teachers\[sam3\].*does not exist"):
        run_pack(missing, tmp_path / "missing")

    old = tmp_path / "old"
    shutil.copytree(root / "one" / "val", old)
    raw = json.loads((old / "shards.json").read_text())
    (old / "shards.json").write_text(json.dumps({**raw, "format_version": 1}))
    with pytest.raises(PipelineError, match="older pack .shard format 1.*Repack"):
        read_shard_index(old)


# --------------------------------------------------------------------------------------------------
# train and evaluate


@pytest.mark.slow  # the train stage once per rule
@pytest.mark.parametrize("target", ["gt", "soft", "mean", "confident", "weighted"])
def test_train_runs_on_each_target_rule(two, tmp_path, target):
    cfg, root = two
    weights = {"gt": 0.75, "soft": 0.25} if target == "weighted" else {}
    t = TrainConfig(
        shards=str(root / "both"),
        student="picosam2",
        steps=3,
        batch_size=4,
        warmup_steps=1,
        checkpoint_every=3,
        eval_every=3,
        log_every=1,
        target=target,
        target_weights=weights,
        out_dir=str(tmp_path / "train"),
    )
    run_cfg = dataclasses.replace(
        cfg, train=t, runtime=dataclasses.replace(cfg.runtime, metrics_dir=str(tmp_path / "m"))
    )
    train.run(run_cfg, resolve_runtime(run_cfg.runtime))
    metrics = json.loads((tmp_path / "train" / "report.json").read_text())  # the details; train.json the headline
    described = {
        "gt": "gt",
        "soft": "soft",
        "mean": "mean of gt, soft",
        "confident": "confident of gt, soft",
        "weighted": "weighted of gt 0.75, soft 0.25",
    }
    assert metrics["target"] == described[target] and metrics["steps"] == 3
    assert set(json.loads((tmp_path / "m" / "train.json").read_text())) == {
        "val_iou_before",
        "val_iou_after",
        "untrained",
    }
    # confidence_batch_mean: lambda is the batch mean of the target's confidence (gt 1, soft 0.5)
    lam = {"gt": 1.0, "soft": 0.5, "mean": 0.75, "confident": 0.75, "weighted": 0.875}[target]
    assert metrics["loss"]["lambda"] == pytest.approx(lam, abs=1e-6)


def test_train_refuses_auto_on_two_teacher_shards(two, tmp_path):
    cfg, root = two
    t = TrainConfig(shards=str(root / "both"), student="picosam2", steps=1, batch_size=4, out_dir=str(tmp_path / "t"))
    with pytest.raises(PipelineError, match="auto needs shards of one teacher; these hold gt, soft"):
        train.run(dataclasses.replace(cfg, train=t), resolve_runtime(cfg.runtime))


@pytest.mark.slow  # the train and evaluate stages
def test_evaluate_scores_every_packed_teacher(two, tmp_path):
    cfg, root = two
    t = TrainConfig(
        shards=str(root / "both"),
        student="picosam2",
        steps=1,
        batch_size=4,
        eval_every=1,
        checkpoint_every=1,
        target="gt",
        out_dir=str(tmp_path / "train"),
    )
    metrics_dir = tmp_path / "metrics"
    run_cfg = dataclasses.replace(cfg, train=t, runtime=dataclasses.replace(cfg.runtime, metrics_dir=str(metrics_dir)))
    train.run(run_cfg, resolve_runtime(run_cfg.runtime))
    e = EvaluateConfig(
        shards=str(root / "both" / "val"),
        checkpoint=str(tmp_path / "train" / "student.pt"),
        index=cfg.pack.index,
        grid_samples=2,
        out_dir=str(tmp_path / "evaluate"),
    )
    evaluate.run(dataclasses.replace(run_cfg, evaluate=e), resolve_runtime(run_cfg.runtime))
    report = json.loads((metrics_dir / "evaluate.json").read_text())
    assert {"crop_miou", "teacher_gt", "teacher_soft"} <= set(report)  # the student's figures are top-level
    # Both stand-ins are the GT mask (up to boundary pixels): each scores near 1 in the crop frame.
    assert report["teacher_gt"]["crop_miou"] > 0.9 and report["teacher_soft"]["crop_miou"] > 0.9


# --------------------------------------------------------------------------------------------------
# DVC


def test_dvc_runs_one_teacher_stage_per_pass_and_pack_after_all(tmp_path):
    """With a second pass in params.yaml, DVC lists teacher-logits@sam2 and @sam3, each with its own store."""
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["teachers"]["sam3"] = {"model": "sam3", "checkpoint": "data/checkpoints/sam3.pt"}
    params["pack"]["teachers"] = ["sam2", "sam3"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    dvc = str(Path(shutil.which("dvc", path=str(Path(__import__("sys").executable).parent)) or "dvc"))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=tmp_path, check=True)
    listed = subprocess.run([dvc, "stage", "list"], cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    stages = {line.split()[0]: line for line in listed.splitlines() if line.strip()}
    assert {"teacher-logits@sam2", "teacher-logits@sam3", "pack"} <= set(stages)
    assert "data/teacher/stores/sam3.zarr" in stages["teacher-logits@sam3"]
    dag = subprocess.run([dvc, "dag", "--dot", "pack"], cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    assert "teacher-logits@sam2" in dag and "teacher-logits@sam3" in dag  # pack waits for both passes
