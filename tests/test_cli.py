"""CLI: help texts, stage listing, exit codes and one-paragraph errors (no tracebacks) on bad input."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from picosam_pipeline.cli import cli
from picosam_pipeline.stages import STAGES
from tests.helpers.paths import REPO


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
    assert [line.split()[0] for line in lines if not line.startswith(" ")] == list(STAGES)
    assert sum(line.startswith("  reads ") for line in lines) == len(STAGES)
    assert sum(line.startswith("  writes ") for line in lines) == len(STAGES)
    assert max(map(len, lines)) <= 100  # wrapped (the runner's terminal: 80 or the 100 fallback)


def test_unknown_stage_and_bad_params_exit_non_zero_with_a_message(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["run-stage", "nosuchstage"])
    assert result.exit_code == 1 and "unknown stage 'nosuchstage'" in result.output
    result = runner.invoke(
        cli, ["run-stage", "prepare", "--params", str(REPO / "params.yaml"), "--set", "prepare.min_area=-3"]
    )
    assert result.exit_code == 1 and "prepare.min_area: expected a number >= 0, got -3" in result.output
    result = runner.invoke(cli, ["run-stage", "prepare", "--params", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_hostile_params_and_devices_are_one_paragraph(tmp_path):
    runner = CliRunner()
    binary = tmp_path / "params.yaml"
    binary.write_bytes(bytes(range(256)))
    result = runner.invoke(cli, ["run-stage", "prepare", "--params", str(binary)])
    assert result.exit_code == 1 and "is not UTF-8 text" in result.output
    params = ["--params", str(REPO / "params.yaml")]
    for override, message in (
        ("train.lr=.nan", "train.lr: expected a finite number"),
        ("runtime.device=cuda:banana", "runtime.device: expected auto, cpu, cuda or cuda:N"),
    ):
        result = runner.invoke(cli, ["run-stage", "train", *params, "--set", override])
        assert result.exit_code == 1 and message in result.output and result.exception.__class__ is SystemExit
    # built in code, not from params: predict --device and verify-logits --device go through the same check
    from picosam_pipeline.config import ConfigError, RuntimeConfig
    from picosam_pipeline.device import resolve_runtime

    with pytest.raises(ConfigError, match="runtime.device: expected auto, cpu, cuda or cuda:N"):
        resolve_runtime(RuntimeConfig(device="cuda:banana"))


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


def test_a_missing_extra_that_has_no_build_for_this_python_says_which_pythons(monkeypatch):
    """On Python 3.13 the IMX500 extra is not installable (Sony ships its converter for 3.10-3.12): the message says
    so and names the Pythons to use, instead of a `pip install` that cannot work."""
    import types

    from picosam_pipeline import errors

    monkeypatch.setitem(errors.EXTRAS, "imx500", ("no_such_module_for_picosam",))
    monkeypatch.setattr(errors, "sys", types.SimpleNamespace(version_info=(3, 13, 0, "final", 0)))
    result = CliRunner().invoke(cli, ["run-stage", "quantize", "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 1
    message = result.output.strip()
    assert (
        "(the [imx500] extra), which are not published for Python 3.13; run this stage with Python 3.11, 3.12"
        in message
    ), message
    assert "make env PYTHON=python3.12" in message and "pip install" not in message


def _import_interrupted_by_ctrl_c(*args, **kwargs):
    """What onnxruntime's pybind11 import raises when Ctrl-C lands inside it."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as err:
        raise ImportError("initialization failed") from err


def test_ctrl_c_that_surfaces_as_another_exception_is_still_an_interrupt(monkeypatch):
    """A Ctrl-C inside a C extension's import comes out chained to an ImportError: exit 130 with one line, no
    traceback."""
    from picosam_pipeline import cli as cli_module
    from picosam_pipeline.stages import StageSpec

    monkeypatch.setattr(StageSpec, "load", lambda self: _import_interrupted_by_ctrl_c)
    result = CliRunner().invoke(cli, ["run-stage", "export", "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 130, result.output
    assert "[export] interrupted; its output is as it was before this run" in result.output

    monkeypatch.setattr(StageSpec, "load", lambda self: lambda *a: 1 / 0)  # a real bug still keeps its traceback
    result = CliRunner().invoke(cli, ["run-stage", "export", "--params", str(REPO / "params.yaml")])
    assert isinstance(result.exception, ZeroDivisionError)

    monkeypatch.setattr(cli_module, "cli", _import_interrupted_by_ctrl_c)  # any command, through the console script
    with pytest.raises(SystemExit) as stopped:
        cli_module.main()
    assert stopped.value.code == 130


def _ctrl_c_swallowed_by_an_extension(*args, **kwargs):
    """A real SIGINT that a C extension swallows and reports as another error, the interrupt not in its chain."""
    try:
        signal.raise_signal(signal.SIGINT)
    except KeyboardInterrupt:
        pass
    raise TypeError("__array__() got an unexpected keyword argument 'copy'")  # pycocotools' decode under numpy 2


def test_ctrl_c_swallowed_by_an_extension_is_still_an_interrupt(monkeypatch, capsys):
    """The console script records the SIGINT itself, so an error that lost the interrupt is still exit 130."""
    from picosam_pipeline import cli as cli_module
    from picosam_pipeline.stages import StageSpec

    monkeypatch.setattr(cli_module, "_ctrl_c_pressed", False)
    monkeypatch.setattr(StageSpec, "load", lambda self: _ctrl_c_swallowed_by_an_extension)
    monkeypatch.setattr(sys, "argv", ["picosam-pipeline", "run-stage", "sample", "--params", str(REPO / "params.yaml")])
    # Python's own SIGINT handler, as a console script starts with (an earlier test in this process may have left
    # another one installed; the CLI then leaves it alone, as it does under an embedding app).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as stopped:
            cli_module.main()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert "[sample] interrupted; its output is as it was before this run" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back

    monkeypatch.setattr(cli_module, "_ctrl_c_pressed", False)  # without a SIGINT the same error is a bug
    monkeypatch.setattr(StageSpec, "load", lambda self: lambda *a: int("x"))
    with pytest.raises(SystemExit) as stopped:
        cli_module.main()
    assert stopped.value.code == 2 and "Traceback" in capsys.readouterr().err


HALF_BUILT_BY_CTRL_C = """
import signal, sys
from picosam_pipeline import cli
from picosam_pipeline.stages import StageSpec

class Bar:  # as tqdm: __del__ reads what __init__ had not set yet when the Ctrl-C landed
    def __init__(self):
        signal.raise_signal(signal.SIGINT)
        self.disable = False

    def __del__(self):
        self.disable

StageSpec.load = lambda self: lambda cfg, runtime: Bar()
sys.argv = ["picosam-pipeline", "run-stage", "sample", "--params", sys.argv[1]]
cli.main()
"""


def test_ctrl_c_that_leaves_an_object_half_built_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", HALF_BUILT_BY_CTRL_C, str(REPO / "params.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 130, proc.stderr
    assert "[sample] interrupted" in proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr


def test_python_dash_m_runs_the_cli(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "picosam_pipeline", "stages"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.strip().splitlines() if not line.startswith(" ")] == list(STAGES)


def test_help_says_which_commands_read_params_and_those_commands_take_params():
    """The top-level help's --params claim holds: every command it names has --params, and only those say so."""
    text = " ".join(CliRunner().invoke(cli, ["--help"]).output.split())  # click rewraps the lines
    readers = ("run-stage", "export-teacher", "doctor", "summary", "check-params")
    assert "Every command reads params.yaml" not in text and f"({', '.join(readers)})" in text
    for name, command in cli.commands.items():
        takes = any("--params" in p.opts for p in command.params)
        assert takes == (name in readers), name


def test_shell_completion_completes_stage_names_and_teacher_passes(tmp_path, monkeypatch):
    from click.shell_completion import BashComplete

    (tmp_path / "params.yaml").write_text("teachers:\n  sam2: {}\n  sam3: {model: sam3}\n")
    monkeypatch.chdir(tmp_path)
    complete = BashComplete(cli, {}, "picosam-pipeline", "_PICOSAM_PIPELINE_COMPLETE")
    assert [c.value for c in complete.get_completions(["run-stage"], "te")] == [
        "teacher-logits",
        "teacher-logits@sam2",
        "teacher-logits@sam3",
    ]
    assert [c.value for c in complete.get_completions(["run-stage"], "")] == [
        *STAGES,
        "teacher-logits@sam2",
        "teacher-logits@sam3",
    ]
    assert "_PICOSAM_PIPELINE_COMPLETE=bash_complete" in CliRunner().invoke(cli, ["completion", "bash"]).output


def test_doctor_fails_on_a_missing_checkpoint_and_warns_on_random_weights(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(f"teacher:\n  checkpoint: {tmp_path / 'none.pt'}\n  allow_random_weights: false\n")
    result = CliRunner().invoke(cli, ["doctor", "--params", str(params)])
    assert result.exit_code == 1 and "FAIL" in result.output and "none.pt" in result.output, result.output
    checks = [line for line in result.output.splitlines() if not line.startswith(" ")]  # (details wrap, indented)
    assert all(line.split()[0] in ("OK", "WARN", "FAIL") for line in checks)
    assert "CUDA" in result.output and "extra [imx500]" in result.output
    result = CliRunner().invoke(cli, ["doctor", "--params", str(params), "--set", "teacher.allow_random_weights=true"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and "RANDOM weights" in text and "FAIL" not in result.output, result.output


def test_a_mistyped_stage_or_key_gets_the_likely_fix_alone():
    result = CliRunner().invoke(cli, ["run-stage", "trian"])
    assert result.exit_code == 1 and "did you mean train?" in result.output
    result = CliRunner().invoke(cli, ["run-stage", "train", "--set", "train.stepz=3"])
    assert result.exit_code == 1 and "train.stepz: unknown key; did you mean train.steps?" in result.output
    assert "accepts" not in result.output  # not the section's 28 keys


def test_doctor_checks_the_dataset_and_says_how_to_get_a_cuda_torch(tmp_path):
    result = CliRunner().invoke(cli, ["doctor", "--set", f"dataset.dir={tmp_path}", "--set", "dataset.name=coco2017"])
    assert "FAIL  dataset coco2017" in result.output and "picosam-pipeline fetch coco2017" in result.output
    import torch

    if not torch.cuda.is_available() and torch.version.cuda is None:
        assert "make env TORCH=cuda" in result.output


def test_warnings_are_one_line_without_source_and_tracer_noise_is_dropped():
    from picosam_pipeline.cli import _one_line_warning

    class TracerWarning(Warning):
        pass

    assert _one_line_warning("check the dataset", UserWarning, "/x/y.py", 3, "raise it") == (
        "warning: check the dataset (UserWarning)\n"
    )
    assert _one_line_warning("constant in the trace", TracerWarning, "/x/y.py", 3) == ""


def test_check_params_checks_the_whole_file_first_and_stamps_it_only_when_it_passes(tmp_path):
    """dvc.yaml's first stage: a later stage's mistake (the recipe's pairing, two stages writing one folder) stops
    the run before DVC removes any output; a passing file always gives the same stamp (no stage reruns for it)."""
    stamp = tmp_path / "params.checked"
    for bad, said in (
        ("train.student=picosam2", "do not go together under recipe.name=picosam3"),
        ("evaluate.int8_out_dir=data/evaluate", "two stages never write the same place"),
        ("evaluate.write_predictions=params.yaml", "is not inside evaluate.out_dir"),
    ):
        result = CliRunner().invoke(cli, ["check-params", "--set", bad, "--stamp", str(stamp)])
        assert result.exit_code == 1 and said in result.output and not stamp.exists(), result.output
    for _ in range(2):
        result = CliRunner().invoke(cli, ["check-params", "--stamp", str(stamp)])
        assert result.exit_code == 0 and stamp.read_bytes() == b"params checked by picosam-pipeline check-params\n"


def test_predict_names_a_missing_image_in_its_own_words():
    result = CliRunner().invoke(cli, ["predict", "--image", "nope.jpg", "--box", "1,1,5,5", "--model", "m.pt"])
    assert result.exit_code == 1 and "--image 'nope.jpg' does not exist" in result.output
    assert "split" not in result.output and "model" not in result.output  # checked before the model is looked at
