"""Typed config: defaults, params.yaml, overrides, and rejection of bad values with the key named."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from picosam_pipeline.cli import cli
from picosam_pipeline.config import Config, ConfigError, load_config, params_schema, require_inputs
from picosam_pipeline.outputs import save_resolved
from tests.helpers.paths import REPO


def test_repo_params_file_loads_and_matches_sections():
    cfg = load_config(REPO / "params.yaml")
    assert isinstance(cfg, Config)
    assert cfg.prepare.splits[0].name == "train"
    assert cfg.teacher.allow_random_weights is True  # the sample has no checkpoint


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg.runtime.device == "auto" and cfg.teacher.store_size == 96


@pytest.mark.parametrize(
    "override, message",
    [
        ("teacher.store_size=-1", "teacher.store_size: expected a positive number"),
        ("teacher.store_size=1.5", "teacher.store_size: expected an integer"),
        ("prepare.min_area=abc", "prepare.min_area: expected a number"),
        ("prepare.on_bad_input=ignore", "prepare.on_bad_input: expected one of ['skip', 'strict']"),
        ("teacher.allow_random_weights=1", "teacher.allow_random_weights: expected true or false"),
        ("teacher.colour=red", "teacher.colour: unknown key"),
        ("nosuchsection.x=1", "nosuchsection: unknown key"),
        ("runtime.device=tpu", "runtime.device: expected auto, cpu, cuda or cuda:N"),
        ("prepare.roi_padding=1.5", "prepare.roi_padding: expected a fraction"),
        ("prepare.splits=[]", "prepare.splits: expected auto or at least one"),
        ("prepare.splits=[{name: a, annotations: x}]", "prepare.splits[0].images: required key is missing"),
        ("teacher.model=sam9", "teacher.model: expected one of"),
        ("teacher.compression_level=0", "teacher.compression_level: expected an integer 1..9"),
        # NaN passed every bound (lr=.nan crashed in torch, temperature=.inf trained without learning)
        ("train.lr=.nan", "train.lr: expected a finite number, got nan"),
        ("train.temperature=.inf", "train.temperature: expected a finite number, got inf"),
        ("train.target_weights={a: -.inf}", "train.target_weights.a: expected a finite number"),
        ("prepare.min_area=-.inf", "prepare.min_area: expected a finite number"),
        ("prepare.min_area=" + "9" * 400, "prepare.min_area: expected a finite number"),  # overflows a float
        ("runtime.seed=" + str(2**64), "runtime.seed: expected an integer that fits 64 bits"),
        ("runtime.device=cuda:banana", "runtime.device: expected auto, cpu, cuda or cuda:N"),
        ("runtime.device=cuda:-1", "runtime.device: expected auto, cpu, cuda or cuda:N"),
        # a value that fits no member of a union names the alternatives in words, not Python types
        ("train.compile=maybe", "train.compile: expected true, false or auto, got 'maybe'"),
        ("train.num_workers=many", "train.num_workers: expected an integer or auto, got 'many'"),
        # a value of one member's kind with a wrong part: that part is named, not the union
        ("train.num_workers=-1", "train.num_workers: expected a number >= 0, got -1"),
        ("prepare.splits=automatic", "prepare.splits: expected a list or auto, got 'automatic'"),
        ("prepare.splits=[{name: a, annotations: x, images: y, imgs: z}]", "prepare.splits[0].imgs: unknown key"),
        # an unknown key: its full path and the closest valid key alone, else the keys its section accepts
        ("teacher.modle=sam3", "teacher.modle: unknown key; did you mean teacher.model?"),
        ("teacher.zzzzz=1", "teacher.zzzzz: unknown key; teacher accepts ['allow_random"),
        ("evaluate.lvis=5", "evaluate.lvis: expected a mapping with keys ['annotations', 'images', 'max_annotations']"),
        ("train.target_weights={sam2: -1}", "train.target_weights.sam2: expected a number >= 0, got -1"),
        ("teachers.sam3=5", "teachers.sam3: expected a mapping, got 5"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_override_parses_yaml_values():
    cfg = load_config(
        None, ["teacher.splits=[val]", "teacher.scheduler_address=tcp://127.0.0.1:8786", "teacher.checkpoint=null"]
    )
    assert cfg.teacher.splits == ["val"]
    assert cfg.teacher.scheduler_address == "tcp://127.0.0.1:8786"
    assert cfg.teacher.checkpoint is None


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        load_config(None, ["teacher.store_size"])


def test_malformed_and_missing_params_files(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("prepare: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(bad)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")  # a binary file given as --params
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(bad)
    bad.write_bytes(b"prepare: \x00\x01\x02")  # UTF-8, but control characters
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="is a folder; pass the params.yaml file inside it"):
        load_config(tmp_path)


def test_require_inputs_names_key_and_path(tmp_path):
    require_inputs({"prepare.splits[0].images": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"prepare.splits\[0\].annotations: path '.*missing.json' does not exist"):
        require_inputs({"prepare.splits[0].annotations": str(tmp_path / "missing.json")})


def test_save_resolved_writes_only_the_stage_sections(tmp_path):
    cfg = load_config(None, ["prepare.min_area=5"])
    path = save_resolved(cfg, tmp_path / "out", ["prepare"])
    saved = json.loads(path.read_text())
    assert list(saved) == ["prepare"] and saved["prepare"]["min_area"] == 5.0


def test_loaded_values_keep_their_declared_types():
    """A YAML integer for a float key is stored as a float, so config.resolved.json (a DVC output) writes 5.0."""
    cfg = load_config(None, ["prepare.min_area=5", "quantize.tpc_version=4", "train.steps=epoch"])
    assert type(cfg.prepare.min_area) is float and cfg.quantize.tpc_version == "4.0" and cfg.train.steps == "epoch"
    assert load_config(None, ["train.compile=true"]).train.compile is True


def test_committed_params_schema_is_current_and_named_by_params_yaml():
    result = CliRunner().invoke(cli, ["params-schema", "--check", "--output", str(REPO / "params.schema.json")])
    assert result.exit_code == 0, result.output + " (run `picosam-pipeline params-schema` and commit the file)"
    first = (REPO / "params.yaml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=params.schema.json"


def test_params_schema_command_writes_checks_and_explains(tmp_path):
    runner = CliRunner()
    help_text = runner.invoke(cli, ["params-schema", "--help"])
    assert help_text.exit_code == 0 and "--output" in help_text.output and "--check" in help_text.output
    out = tmp_path / "schema.json"
    assert runner.invoke(cli, ["params-schema", "--output", str(out)]).exit_code == 0
    assert json.loads(out.read_text()) == params_schema()
    out.write_text(out.read_text().replace("sam2.1_hiera_tiny", "sam9"))
    stale = runner.invoke(cli, ["params-schema", "--check", "--output", str(out)])
    assert stale.exit_code == 1 and "differs from this version's schema" in stale.output


def test_params_schema_refuses_unknown_keys_and_allows_the_recipe_auto():
    schema = params_schema()
    cfg = Config()
    assert schema["additionalProperties"] is False and set(schema["properties"]) == set(cfg.to_dict())
    for name, section in schema["$defs"].items():  # every section, nested ones too: unknown keys refused
        assert section["additionalProperties"] is False, name
    train = schema["$defs"]["TrainConfig"]["properties"]
    assert set(train) == set(cfg.to_dict()["train"]) and "peak learning rate" in train["lr"]["description"]
    assert {"const": "auto", "type": "string"} in train["temperature"]["anyOf"]  # a recipe key
    assert "anyOf" not in train["lr"] and train["lr"]["exclusiveMinimum"] == 0
    passes = schema["properties"]["teachers"]["additionalProperties"]
    assert passes["additionalProperties"] is False and "model" in passes["properties"]
    assert "out" not in passes["properties"]  # set per pipeline, not per pass


def test_params_yaml_validates_against_the_schema():
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    validator = jsonschema.Draft202012Validator(params_schema())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert list(validator.iter_errors(params)) == []
    params["teacher"]["colour"] = "red"
    params["teachers"]["sam3"] = {"modle": "sam3"}
    assert sorted(e.json_path for e in validator.iter_errors(params)) == ["$.teacher", "$.teachers.sam3"]
