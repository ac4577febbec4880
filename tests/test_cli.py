"""CLI: help texts, stage listing, exit codes and one-paragraph errors (no tracebacks) on bad input."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from conftest import REPO
from picosam_pipeline.cli import cli
from picosam_pipeline.stages import STAGES


def test_help_lists_commands_and_every_option_is_explained():
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert top.exit_code == 0 and "run-stage" in top.output and "stages" in top.output
    for name, command in cli.commands.items():
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, name
        assert command.help, f"command {name} has no help text"
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert param.help, f"option {param.opts} of {name} has no help text"


def test_stages_lists_every_stage_in_order():
    result = CliRunner().invoke(cli, ["stages"])
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(STAGES)
    assert all("reads:" in line and "writes:" in line for line in lines)


def test_unknown_stage_and_bad_params_exit_non_zero_with_a_message(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["run-stage", "nosuchstage"])
    assert result.exit_code == 1 and "unknown stage 'nosuchstage'" in result.output
    result = runner.invoke(cli, ["run-stage", "prepare", "--params", str(REPO / "params.yaml"), "--set", "prepare.min_area=-3"])
    assert result.exit_code == 1 and "prepare.min_area: expected a number >= 0, got -3" in result.output
    result = runner.invoke(cli, ["run-stage", "prepare", "--params", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_console_script_prints_no_traceback_on_bad_input(tmp_path):
    exe = REPO / ".venv" / "bin" / "picosam-pipeline"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "picosam_pipeline.cli"]
    args = ["run-stage", "prepare", "--params", str(REPO / "params.yaml"), "--set", "teacher.nokey=1"]
    proc = subprocess.run(cmd + args, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "teacher.nokey: unknown key" in proc.stderr


def test_a_missing_extra_is_one_line_naming_it(monkeypatch, tmp_path):
    """A stage whose optional packages are absent stops before any work with the `pip install` line to run."""
    from picosam_pipeline import errors

    monkeypatch.setitem(errors.EXTRAS, "imx500", ("model_compression_toolkit", "no_such_module_for_picosam"))
    result = CliRunner().invoke(cli, ["run-stage", "quantize", "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 1 and result.exception.__class__ is SystemExit
    message = result.output.strip()
    assert "stage quantize needs the optional package(s) no_such_module_for_picosam" in message
    assert "pip install 'picosam-pipeline[imx500]'" in message and "Traceback" not in message


def test_python_dash_m_runs_the_cli(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "picosam_pipeline", "stages"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.strip().splitlines()] == list(STAGES)
