"""Issue 31 items 4-5: every size or count in params.yaml has a range, and the launcher's environment variables
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) are checked; a bad value stops with one paragraph naming it, its value
and what is allowed, before any work."""

from __future__ import annotations

import pytest
import torch

from picosam_pipeline.config import ConfigError, load_config, params_schema
from picosam_pipeline.device import Runtime
from picosam_pipeline.environment import (
    DistributedRanks,
    EnvironmentVariableError,
    check_local_device,
    distributed_ranks,
    env_int,
)
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.train.trainer import init_distributed
from tests.helpers.paths import REPO

PARAMS = REPO / "params.yaml"
LAUNCHER = ("WORLD_SIZE", "RANK", "LOCAL_RANK")

# --------------------------------------------------------------------------------------------------
# sizes and counts in params.yaml


@pytest.mark.parametrize(
    "key, low, high",
    [
        ("teacher.store_size", 1, 1024),
        ("teacher.instances_per_shard", 1, 65536),
        ("teacher.images_per_batch", 1, 256),
        ("teacher.n_workers", 0, 1024),
        ("teacher.threads_per_worker", 0, 1024),
        ("teacher.compression_level", 1, 9),
        ("train.batch_size", 1, 4096),
        ("train.steps", 1, 100_000_000),
        ("train.warmup_steps", 0, 100_000_000),
        ("train.log_every", 1, 100_000_000),
        ("train.eval_every", 1, 100_000_000),
        ("train.checkpoint_every", 1, 100_000_000),
        ("train.shuffle_buffer", 1, 1_000_000),
        ("train.num_workers", 0, 256),
        ("evaluate.batch_size", 1, 4096),
        ("evaluate.grid_samples", 0, 1024),
        ("quantize.batch_size", 1, 4096),
        ("quantize.eval_batch_size", 1, 4096),
        ("quantize.representative_batches", 1, 10_000),
        ("quantize.shuffle_buffer", 0, 1_000_000),
        ("quantize.probe_samples", 1, 4096),
        ("quantize.gptq_epochs", 0, 10_000),
        ("pack.samples_per_shard", 1, 100_000),
        ("pack.jpeg_quality", 1, 100),
        ("prepare.point_crop_size", 1, 4096),
        ("sample.train_images", 9, 99_999),  # the planted bad inputs need 9
        ("sample.val_images", 1, 99_999),
        ("export.mctq_check_samples", 1, 4096),
        ("package.timeout_s", 1, 604_800),
        ("runtime.num_threads", 0, 1024),
    ],
)
def test_an_integer_past_its_maximum_stops_with_key_value_and_range(key, low, high):
    """Before: `train.batch_size=100000` and the like were accepted and failed (or swapped) deep in a stage."""
    load_config(PARAMS, [f"{key}={high}"])  # both ends are allowed
    load_config(PARAMS, [f"{key}={low}"])
    with pytest.raises(ConfigError) as err:
        load_config(PARAMS, [f"{key}={high + 1}"])
    lowest = 0 if low == 0 else 1  # sample.train_images' 9 is a check of its own
    assert str(err.value) == f"{key}: expected an integer {lowest}..{high}, got {high + 1}"


@pytest.mark.parametrize(
    "override, message",
    [
        ("teacher.store_size=0", "teacher.store_size: expected a positive number, got 0"),
        ("train.num_workers=-1", "train.num_workers: expected a number >= 0, got -1"),
        ("teacher.compression_level=0", "teacher.compression_level: expected an integer 1..9, got 0"),
        ("pack.jpeg_quality=0", "pack.jpeg_quality: expected an integer 1..100, got 0"),
        ("runtime.seed=-1", "runtime.seed: expected a number >= 0, got -1"),  # numpy refuses negative seeds
        ("pack.seed=-3", "pack.seed: expected a number >= 0, got -3"),
        ("prepare.min_area=1e11", "prepare.min_area: expected a number, got '1e11'"),  # YAML 1.1: a string
        ("prepare.min_area=1.0e+11", "prepare.min_area: expected a number in [0, 1e+10], got 100000000000.0"),
        ("prepare.min_roi_side=200000.0", "prepare.min_roi_side: expected a number in [0, 100000], got 200000.0"),
        ("export.max_diff_steps=256", "export.max_diff_steps: expected a number in [0, 255], got 256"),
        ("quantize.max_miou_drop=1.5", "quantize.max_miou_drop: expected a number in [0, 1], got 1.5"),
        ("train.steps=" + str(2**70), f"train.steps: expected an integer 1..100000000, got {2**70}"),
        ("teachers.sam2={store_size: 5000}", "teachers.sam2.store_size: expected an integer 1..1024, got 5000"),
        ("teacher.images_per_batch=many", "teacher.images_per_batch: expected an integer or auto, got 'many'"),
        ("train.steps=0", "train.steps: expected a positive number, got 0"),
    ],
)
def test_out_of_range_values_name_key_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(PARAMS, [override])
    assert str(err.value) == message and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override",
    [
        "teacher.images_per_batch=auto",
        "teacher.instances_per_shard=auto",
        "train.num_workers=auto",
        "train.steps=epoch",
    ],
)
def test_auto_keys_still_take_auto(override):
    key, _, value = override.partition("=")
    section, name = key.split(".")
    assert getattr(getattr(load_config(PARAMS, [override]), section), name) == value


def test_the_recipe_values_are_within_the_ranges():
    for overrides in ([], ["recipe.size=full"], ["recipe.name=picosam2", "recipe.size=full"]):
        load_config(PARAMS, overrides)


def _integer_keys(schema: dict) -> dict[str, dict]:
    """``Section.key`` -> its schema (the integer member of an ``anyOf``) for every integer key of every section."""
    keys = {}
    for section, definition in schema["$defs"].items():
        for key, prop in definition.get("properties", {}).items():
            integer = next((m for m in prop.get("anyOf", [prop]) if m.get("type") == "integer"), None)
            if integer is not None:
                keys[f"{section}.{key}"] = integer
    return keys


def test_every_integer_key_has_a_maximum_in_the_schema():
    """A new size or count key without an upper bound fails here; seeds only need to fit 64 bits."""
    keys = _integer_keys(params_schema())
    assert len(keys) > 30
    unbounded = sorted(k for k, prop in keys.items() if "maximum" not in prop and not k.endswith(".seed"))
    assert unbounded == []
    assert keys["TrainConfig.batch_size"] == {"type": "integer", "minimum": 1, "maximum": 4096}
    assert keys["TeacherConfig.images_per_batch"] == {"type": "integer", "minimum": 1, "maximum": 256}  # or auto
    assert keys["LvisEvalConfig.max_annotations"]["maximum"] == 100_000_000


# --------------------------------------------------------------------------------------------------
# the launcher's environment variables


@pytest.fixture
def launcher_env(monkeypatch):
    """No launcher variable set; the test sets the ones it needs."""
    for name in LAUNCHER:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_single_process_is_rank_0_of_1(launcher_env):
    assert distributed_ranks() == DistributedRanks(rank=0, world_size=1, local_rank=0)


def test_torchrun_values_are_read(launcher_env):
    launcher_env.setenv("WORLD_SIZE", "4")
    launcher_env.setenv("RANK", "3")
    assert distributed_ranks() == (3, 4, 3)  # LOCAL_RANK defaults to RANK
    launcher_env.setenv("LOCAL_RANK", " 1 ")
    assert distributed_ranks() == (3, 4, 1)


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"RANK": "abc"},
            "environment variable RANK='abc': expected 0, this process's number in the job, below "
            "WORLD_SIZE (not set: a single process); torchrun sets it",
        ),
        ({"RANK": "1"}, "environment variable RANK=1: expected 0,"),
        ({"RANK": ""}, "environment variable RANK='': expected 0,"),
        ({"WORLD_SIZE": "2", "RANK": "-1"}, "environment variable RANK=-1: expected an integer 0..1,"),
        (
            {"WORLD_SIZE": "2", "RANK": "2"},
            "RANK=2: expected an integer 0..1, this process's number in the job, below WORLD_SIZE=2",
        ),
        ({"WORLD_SIZE": "2"}, "environment variable RANK is not set but WORLD_SIZE=2"),
        ({"WORLD_SIZE": "0"}, "environment variable WORLD_SIZE=0: expected an integer 1..65536"),
        ({"WORLD_SIZE": "two"}, "environment variable WORLD_SIZE='two': expected an integer 1..65536"),
        ({"WORLD_SIZE": "1.5"}, "environment variable WORLD_SIZE='1.5': expected an integer 1..65536"),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "2"}, "LOCAL_RANK=2: expected an integer 0..1"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x"}, "LOCAL_RANK='x': expected an integer 0..1"),
    ],
)
def test_bad_launcher_values_stop_with_one_paragraph(launcher_env, env, message):
    """Before: `RANK=abc` was a ValueError traceback; `RANK=2` of 2 and negatives went unchecked."""
    for name, value in env.items():
        launcher_env.setenv(name, value)
    with pytest.raises(EnvironmentVariableError) as err:
        distributed_ranks()
    text = str(err.value)
    assert message in text and "\n" not in text
    assert isinstance(err.value, PipelineError) and isinstance(err.value, ConfigError)
    assert "unset WORLD_SIZE, RANK and LOCAL_RANK" in text  # the fix


def test_env_int_reads_defaults_and_ranges(monkeypatch):
    monkeypatch.delenv("PICOSAM_TEST_COUNT", raising=False)
    assert env_int("PICOSAM_TEST_COUNT", 7, 1, 10, "a count") == 7
    monkeypatch.setenv("PICOSAM_TEST_COUNT", "+10")
    assert env_int("PICOSAM_TEST_COUNT", 7, 1, 10, "a count") == 10
    monkeypatch.setenv("PICOSAM_TEST_COUNT", "11")
    with pytest.raises(
        EnvironmentVariableError,
        match=r"^environment variable PICOSAM_TEST_COUNT=11: expected an "
        r"integer 1\.\.10, a count$",
    ):
        env_int("PICOSAM_TEST_COUNT", 7, 1, 10, "a count")


def test_local_rank_must_name_a_visible_gpu():
    check_local_device(1, 2)
    with pytest.raises(
        EnvironmentVariableError,
        match=r"LOCAL_RANK=2: this machine has 2 CUDA device\(s\), "
        r"numbered 0\.\.1.*--nproc_per_node 2",
    ):
        check_local_device(2, 2)


def test_the_trainer_and_the_train_stage_check_the_launcher_first(launcher_env):
    from picosam_pipeline.stages import train as train_stage

    launcher_env.setenv("RANK", "abc")
    with pytest.raises(EnvironmentVariableError, match="RANK='abc'"):
        init_distributed(Runtime(device=torch.device("cpu"), autocast_dtype=None, seed=0))
    with pytest.raises(EnvironmentVariableError, match="RANK='abc'"):
        train_stage.output(load_config(PARAMS))  # the stage's first step, before any file is touched
