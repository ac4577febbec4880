"""Recipes: one switch per paper in params.yaml, incoherent params refused, the crop convention carried from the
shards into the student checkpoints (best and last) and checked by pack, train, evaluate and predict."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from picosam_pipeline.config import ConfigError, RecipeConfig, TrainConfig, load_config
from picosam_pipeline.data.crop_convention import CropMismatch
from picosam_pipeline.data.crops import crop_convention
from picosam_pipeline.device import Runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.recipes import FULL_RUN, RECIPE_KEYS, RECIPES, SAMPLE_RUN
from picosam_pipeline.train.checkpoints import load_checkpoint
from picosam_pipeline.train.losses import PRESETS
from tests.helpers.paths import REPO

PARAMS = REPO / "params.yaml"
CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None, seed=0)


def test_every_recipe_key_is_auto_in_params_yaml_so_the_recipe_decides_it():
    import yaml

    raw = yaml.safe_load(PARAMS.read_text())
    for dotted in RECIPE_KEYS:
        section, key = dotted.split(".")
        assert raw[section][key] == "auto", dotted
    for name, values in RECIPES.items():  # the loss keys agree with the loss module's own table of the papers
        assert {
            k.removeprefix("train."): v for k, v in values.items() if k.removeprefix("train.") in PRESETS[name]
        } == {k: v for k, v in PRESETS[name].items() if k != "area_min_ratio"}


def test_one_switch_turns_picosam3_into_picosam2_and_the_sample_keeps_its_short_run():
    p3 = load_config(PARAMS)
    p2 = load_config(PARAMS, ["recipe.name=picosam2"])
    assert (p3.teacher.prompt, p3.train.student, p3.train.temperature, p3.train.area_weight) == (
        "roi",
        "picosam3",
        0.2,
        0.4,
    )
    assert (p2.teacher.prompt, p2.train.student, p2.train.temperature, p2.train.area_weight) == (
        "point",
        "picosam2",
        1.0,
        0.0,
    )
    for cfg in (p3, p2):
        assert cfg.train.lambda_mode == "confidence_batch_mean"
        assert {
            f"train.{k}": getattr(cfg.train, k)
            for k in ("steps", "batch_size", "warmup_steps", "grad_clip", "eval_every", "checkpoint_every")
        } == SAMPLE_RUN


@pytest.mark.parametrize("recipe, batch", [("picosam3", 64), ("picosam2", 8)])
def test_a_real_dataset_gets_the_papers_full_run(recipe, batch):
    cfg = load_config(PARAMS, [f"recipe.name={recipe}", "dataset.name=coco2017"])
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.warmup_steps, cfg.train.grad_clip) == (
        "epoch",
        batch,
        1000,
        0.0,
    )
    assert cfg.train.lr == 3e-4 and cfg.train.weight_decay == 0.01 and cfg.train.schedule == "constant"
    assert cfg.train.eval_every * batch == 64_000 and cfg.train.eval_every == FULL_RUN[recipe]["train.eval_every"]
    sample_size = load_config(PARAMS, [f"recipe.name={recipe}", "dataset.name=coco2017", "recipe.size=sample"])
    assert sample_size.train.steps == 300


def test_an_individual_key_overrides_its_recipe():
    cfg = load_config(
        PARAMS, ["recipe.name=picosam2", "train.temperature=0.5", "train.batch_size=16", "train.steps=epoch"]
    )
    assert (cfg.train.temperature, cfg.train.batch_size, cfg.train.steps) == (0.5, 16, "epoch")
    assert cfg.train.area_weight == 0.0 and cfg.teacher.prompt == "point"  # the rest still from the recipe


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["train.student=picosam2"], "train.student=picosam2 (params) and teacher.prompt=roi (recipe picosam3)"),
        (
            ["recipe.name=picosam2", "teacher.prompt=roi"],
            "train.student=picosam2 (recipe picosam2) and teacher.prompt=roi (params)",
        ),
        (["recipe.name=picosam2", "+teachers.sam2={prompt: roi}"], "teachers.sam2.prompt=roi (params)"),
    ],
)
def test_a_student_on_the_other_papers_crops_is_refused_naming_the_keys(overrides, named):
    overrides = [o.lstrip("+") for o in overrides]
    with pytest.raises(ConfigError) as err:
        load_config(PARAMS, overrides)
    assert named in str(err.value) and "recipe.name=custom" in str(err.value)


def test_custom_takes_any_pairing_but_no_auto():
    with pytest.raises(
        ConfigError, match="teacher.prompt: auto takes its value from the recipe, but recipe.name is custom"
    ):
        load_config(PARAMS, ["recipe.name=custom"])
    sets = [
        "recipe.name=custom",
        "teacher.prompt=roi",
        "train.student=picosam2",
        "train.temperature=1",
        "train.area_weight=0",
        "train.lambda_mode=fixed",
        "train.steps=3",
        "train.batch_size=2",
        "train.warmup_steps=1",
        "train.grad_clip=0",
        "train.eval_every=1",
        "train.checkpoint_every=1",
    ]
    assert load_config(PARAMS, sets).train.student == "picosam2"
    with pytest.raises(ConfigError, match="recipe.name: expected one of"):
        load_config(PARAMS, ["recipe.name=picosam4"])


# --------------------------------------------------------------------------------------------------
# the convention through pack, train (best and last) and predict, on the GT-mask stand-in teacher


@pytest.fixture(scope="module")
def point_shards(sample_inputs, tmp_path_factory):
    """PicoSAM2 on the sample: a point-convention store, packed; the config trains for one epoch
    (``train.steps: epoch``) and :func:`point_run` runs it."""
    from picosam_pipeline.stages import pack
    from tests.helpers.pipeline_inputs import elsewhere, own_store

    root = tmp_path_factory.mktemp("recipes")
    cfg = elsewhere(sample_inputs, root)  # the session's index (and a roi store named gt), read-only
    cfg = own_store(cfg, root / "point", prompt="point")  # packs from root/point into root/shards
    cfg = dataclasses.replace(
        cfg,
        recipe=RecipeConfig("picosam2"),
        teacher=dataclasses.replace(cfg.teacher, prompt="point"),
        train=TrainConfig(
            shards=cfg.pack.out_dir,
            student="picosam2",
            steps="epoch",
            batch_size=16,
            warmup_steps=1,
            temperature=1.0,
            area_weight=0.0,
            eval_every=1,
            checkpoint_every=100,
            log_every=1,
            out_dir=str(root / "train"),
        ),
    )
    pack.run(cfg, None)
    return cfg


@pytest.fixture(scope="module")
def point_run(point_shards):
    """:func:`point_shards` trained for one epoch: ``(cfg, the train stage's summary)``."""
    from picosam_pipeline.stages import train as train_stage

    return point_shards, train_stage.run(point_shards, CPU)


@pytest.mark.slow  # trains an epoch
def test_shards_and_both_checkpoints_record_the_point_convention(point_run):
    from picosam_pipeline.train.shards import read_shard_index

    cfg, summary = point_run
    expected = crop_convention("point", roi_padding=0.1, window=96, input_size=96)
    train_index = read_shard_index(Path(cfg.pack.out_dir) / "train")
    assert train_index.crop == expected and read_shard_index(Path(cfg.pack.out_dir) / "val").crop == expected
    # one epoch: every train sample once, in batches of 16
    assert summary["steps"] == -(-train_index.samples // 16) > 1
    _, last = load_checkpoint(Path(cfg.train.out_dir) / "student.pt", kind="student")
    _, best = load_checkpoint(Path(cfg.train.out_dir) / "student_best.pt", kind="student")
    assert last["crop"] == best["crop"] == expected and (last["which"], best["which"]) == ("last", "best")
    report = json.loads((Path(cfg.train.out_dir) / "report.json").read_text())  # train.json holds the headline only
    val_log = Path(cfg.runtime.metrics_dir) / "train" / "plots" / "metrics" / "val" / "iou.tsv"  # dvclive's
    val = {int(step): float(iou) for step, iou in (row.split("\t") for row in val_log.read_text().splitlines()[1:])}
    best_step = max((s for s in val if s > 0), key=lambda s: (val[s], -s))  # the earliest of the best
    assert best["step"] == report["best_step"] == best_step and best["val_iou"] == pytest.approx(val[best_step])
    assert last["step"] == summary["steps"] and report["crop"] == expected


def test_pack_refuses_a_store_of_the_other_convention(point_shards, tmp_path):
    from picosam_pipeline.stages import pack

    cfg = point_shards
    roi = dataclasses.replace(
        cfg,
        recipe=RecipeConfig("picosam3"),
        teacher=dataclasses.replace(cfg.teacher, prompt="roi"),
        pack=dataclasses.replace(cfg.pack, out_dir=str(tmp_path / "shards")),
    )
    with pytest.raises(
        PipelineError,
        match=r"holds point crops, but pack \(teacher.prompt=roi, recipe.name=picosam3\) needs roi crops "
        r"\(convention 'point' != 'roi'\); rerun the teacher pass",
    ):
        pack.run(roi, None)
    assert not (tmp_path / "shards").exists()


def test_train_refuses_shards_of_the_other_convention_before_any_work(point_shards, tmp_path):
    from picosam_pipeline.stages import train as train_stage

    cfg = point_shards
    p3 = dataclasses.replace(
        cfg,
        recipe=RecipeConfig("picosam3"),
        train=dataclasses.replace(cfg.train, student="picosam3", out_dir=str(tmp_path / "t")),
    )
    with pytest.raises(
        CropMismatch,
        match=r"holds point crops, but train.student=picosam3 \(recipe.name=picosam3\) needs roi crops "
        r"\(convention 'point' != 'roi'\); repack",
    ):
        train_stage.run(p3, CPU)
    assert not (tmp_path / "t").exists()


@pytest.mark.slow  # trains an epoch (point_run)
def test_predict_takes_the_prompt_the_model_was_trained_with(point_run):
    from picosam_pipeline.evaluate.predict import load_crop_model, prompt_settings

    cfg, _ = point_run
    model = load_crop_model(Path(cfg.train.out_dir) / "student_best.pt", CPU)
    assert model.crop["convention"] == "point"
    assert prompt_settings(model, box=None, point=(10, 10)) == (0.1, 96, [])
    with pytest.raises(
        PipelineError, match="trained on PicoSAM2 point crops, which take a point prompt; give --point X,Y"
    ):
        prompt_settings(model, box=(1, 2, 30, 40), point=None)
    with pytest.raises(PipelineError, match="--window 64: .* trained with window 96"):
        prompt_settings(model, box=None, point=(10, 10), window=64)
    model.crop = None  # a model from elsewhere: either prompt, with a note
    padding, window, notes = prompt_settings(model, box=(1, 2, 30, 40), point=None, roi_padding=0.2)
    assert (padding, window) == (0.2, 96) and "does not record its crop convention" in notes[0]


def test_evaluate_refuses_a_model_trained_on_other_crops(point_shards):
    from picosam_pipeline.evaluate.shard_evaluation import check_models_crops
    from picosam_pipeline.train.shards import read_shard_index

    cfg = point_shards
    val = read_shard_index(Path(cfg.pack.out_dir) / "val")

    class Model:
        name = "onnx int8.onnx"
        crop = crop_convention("roi", roi_padding=0.1, window=96, input_size=96)

    check_models_crops({"student": type("Unrecorded", (), {"name": "x", "crop": None})()}, val)
    with pytest.raises(
        PipelineError,
        match=r"holds point crops, but evaluate.int8_model \(onnx int8.onnx\) needs roi crops .*; score it on shards",
    ):
        check_models_crops({"student_int8": Model()}, val)
