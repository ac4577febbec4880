"""Every command the README shows parses as written: each `picosam-pipeline` line against the CLI (command, options,
values), each `dvc` line against DVC's own argument parser, each `make` line against the Makefile's targets. Running
them is what the end-to-end tests do (`make repro`'s pipeline in tests/test_dvc_experiments.py and the sharing recipe
in tests/test_dvc_sharing.py); this catches a renamed command, option or target, or a flag DVC does not have."""

from __future__ import annotations

import re
import shlex

import click
import pytest

from picosam_pipeline.cli import cli
from tests.helpers.paths import REPO


def readme_commands() -> list[str]:
    """The shell commands of README.md's bash blocks, continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(words)
    return lines


COMMANDS = readme_commands()


def test_the_readme_shows_commands_of_each_kind():
    tools = {words[0].rsplit("/", 1)[-1] for words in COMMANDS}
    assert {"make", "picosam-pipeline", "dvc", "git"} <= tools, tools


@pytest.mark.parametrize("words", [w for w in COMMANDS if w[0].endswith("picosam-pipeline")], ids=" ".join)
def test_each_picosam_pipeline_command_parses(words):
    try:  # the group's options, then the command's: every option and argument parsed, nothing run
        ctx = cli.make_context("picosam-pipeline", words[1:])
        name, command, rest = cli.resolve_command(ctx, [*getattr(ctx, "_protected_args", []), *ctx.args])
        command.make_context(name, rest, parent=ctx)
    except click.exceptions.Exit:
        pass
    except click.UsageError as err:
        pytest.fail(f"README: `{' '.join(words)}`: {err.format_message()}")


@pytest.mark.parametrize("words", [w for w in COMMANDS if w[0] == "dvc"], ids=" ".join)
def test_each_dvc_command_parses(words):
    from dvc.cli import DvcParserError, parse_args

    try:
        parse_args(words[1:])
    except (SystemExit, DvcParserError) as err:  # how DVC's parser refuses
        pytest.fail(f"README: `{' '.join(words)}`: dvc refuses it ({type(err).__name__})")


def test_each_make_target_exists():
    targets = set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), re.MULTILINE))
    for words in (w for w in COMMANDS if w[0] == "make"):
        assert set(words[1:]) <= targets, words
