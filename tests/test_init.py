"""``picosam-pipeline init DIR``: a project made from the package alone (picosam_pipeline/project_init.py).

Fast: init from this checkout into a temporary folder (files, dvc.yaml without code deps, params.yaml the repo's,
git modes, refusals, the code stamps). Slow: the wheel installed into a fresh virtualenv, its `init`, then `dvc repro`
up to the teacher pass there, and an upgrade of one stage's code rerunning that stage only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from picosam_pipeline import __version__, project_init
from picosam_pipeline.cli import cli
from picosam_pipeline.errors import PipelineError
from tests.helpers.paths import REPO, run_checked

CODE_PREFIXES = ("picosam_pipeline/", "stages/")


def stages_of(dvc_yaml: Path) -> dict[str, dict]:
    """dvc.yaml's stages, a foreach stage by its template (``do``)."""
    return {name: s.get("do", s) for name, s in yaml.safe_load(dvc_yaml.read_text())["stages"].items()}


def check_project(project: Path) -> None:
    """What every made project has, whichever install made it."""
    for name in project_init.COPIED:
        assert (project / name).read_bytes() == (REPO / name).read_bytes(), name
    assert sorted(p.name for p in (project / ".dvc/plots").iterdir()) == sorted(
        p.name for p in (REPO / ".dvc/plots").glob("*.json")
    )
    assert (project / ".picosam/version").read_text() == f"{__version__}\n"
    assert "dvc repro" in (project / "README.md").read_text()

    repo, made = stages_of(REPO / "dvc.yaml"), stages_of(project / "dvc.yaml")
    assert list(made) == ["code-stamp", *repo]
    assert made["code-stamp"]["always_changed"] is True
    assert [next(iter(o)) for o in made["code-stamp"]["outs"]] == [f".picosam/code/{n}.sha256" for n in repo]
    for name, stage in repo.items():
        deps = made[name]["deps"]
        assert not [d for d in deps if d.startswith(CODE_PREFIXES)], f"{name}: code deps left"
        assert deps == [f".picosam/code/{name}.sha256"] + [d for d in stage["deps"] if not d.startswith(CODE_PREFIXES)]
        assert {k: v for k, v in made[name].items() if k != "deps"} == {k: v for k, v in stage.items() if k != "deps"}
    # The rest of the file (plots) as it is, and the repository's comments on the inputs kept
    text = (project / "dvc.yaml").read_text()
    assert yaml.safe_load(text)["plots"] == yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    assert "# the images the index points to" in text


def test_init_without_git_writes_the_project(tmp_path):
    result = CliRunner().invoke(cli, ["init", "--no-git", str(tmp_path / "proj")])
    assert result.exit_code == 0, result.output
    project = tmp_path / "proj"
    check_project(project)
    assert not (project / ".git").exists()
    assert "no_scm = True" in (project / ".dvc/config").read_text()
    assert "dvc repro" in result.output


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_init_makes_a_git_repository_or_joins_the_enclosing_one(tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, ["init", str(tmp_path / "alone")]).exit_code == 0
    assert (tmp_path / "alone/.git").is_dir() and "no_scm" not in (tmp_path / "alone/.dvc/config").read_text()
    check_project(tmp_path / "alone")
    # ... with the project as its first commit (dvclive in the train stage fails in a repository without one)
    git = ["git", "-C", str(tmp_path / "alone")]
    assert subprocess.run([*git, "rev-list", "--count", "HEAD"], capture_output=True, text=True).stdout == "1\n"
    assert subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True).stdout == ""
    # Below the top of a repository: DVC's --subdir, no second git repository
    (tmp_path / "alone/sub").mkdir()
    result = runner.invoke(cli, ["init", "--git", str(tmp_path / "alone/sub")])
    assert result.exit_code == 0, result.output
    assert "enclosing git repository" in result.output
    assert (tmp_path / "alone/sub/.dvc").is_dir() and not (tmp_path / "alone/sub/.git").exists()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_without_a_git_identity_init_says_to_commit(tmp_path, monkeypatch):
    for name in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "EMAIL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "user.useConfigOnly",
        "GIT_CONFIG_VALUE_0": "true",
    }.items():
        monkeypatch.setenv(name, value)
    result = project_init.init_project(tmp_path / "proj")
    assert result.scm == "a new git repository (git init)"
    assert any("no commit yet (git commit: " in n and "git add -A && git commit" in n for n in result.notes)


def test_without_git_installed_init_runs_dvc_without_git_and_git_is_refused(tmp_path, monkeypatch):
    which = shutil.which
    monkeypatch.setattr(
        project_init.shutil, "which", lambda name, *a, **k: None if name == "git" else which(name, *a, **k)
    )
    with pytest.raises(PipelineError, match="--git: git is not installed"):
        project_init.init_project(tmp_path / "wanted", git=True)
    assert not (tmp_path / "wanted").exists()
    result = project_init.init_project(tmp_path / "proj")
    assert result.scm == "none (dvc init --no-scm; git is not installed)"
    assert "no_scm = True" in (tmp_path / "proj/.dvc/config").read_text() and not (tmp_path / "proj/.git").exists()


def test_init_refuses_a_folder_that_is_not_empty_or_a_file(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used/notes.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["init", str(tmp_path / "used")])
    assert (
        result.exit_code == 1 and "is not empty (notes.txt)" in result.output and "overwrites nothing" in result.output
    )
    assert sorted(p.name for p in (tmp_path / "used").iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(cli, ["init", str(tmp_path / "file")])
    assert result.exit_code == 2 and "is a file" in result.output  # click's usage error (the path type)
    with pytest.raises(PipelineError, match="is a file"):  # the function says so too
        project_init.init_project(tmp_path / "file")
    # an empty folder is fine (e.g. `mkdir proj && cd proj && picosam-pipeline init`)
    (tmp_path / "empty").mkdir()
    assert CliRunner().invoke(cli, ["init", "--no-git", str(tmp_path / "empty")]).exit_code == 0


def test_a_failed_init_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    monkeypatch.setattr(project_init, "README", None)  # fails after dvc init and the copies
    with pytest.raises(AttributeError):
        project_init.init_project(tmp_path / "new", git=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(AttributeError):
        project_init.init_project(tmp_path / "empty", git=False)
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_dvc_yaml_layout_the_line_rules_miss_stops_init():
    flow = "stages:\n  sample:\n    cmd: picosam-pipeline run-stage sample\n    deps: [picosam_pipeline/config.py, x]\n"
    with pytest.raises(RuntimeError, match="layout"):
        project_init.project_dvc_yaml(flow)


def test_code_stamps_change_with_a_stages_code_only(tmp_path, monkeypatch):
    written, warning = project_init.write_code_stamps(tmp_path)
    assert warning is None
    stamps = {p.stem: p.read_text() for p in written}
    assert set(stamps) == set(stages_of(REPO / "dvc.yaml"))
    prepare_py = hashlib.sha256((REPO / "stages/prepare.py").read_bytes()).hexdigest()
    assert f"{prepare_py}  stages/prepare.py\n" in stamps["prepare"]
    # "upgrade" stages/prepare.py: only the prepare stamp changes
    changed = tmp_path / "prepare.py"
    changed.write_text((REPO / "stages/prepare.py").read_text() + "# changed\n")
    real = project_init._installed_file
    monkeypatch.setattr(
        project_init, "_installed_file", lambda dep: changed if dep == "stages/prepare.py" else real(dep)
    )
    (tmp_path / ".picosam/version").write_text("0.0.1\n")
    written, warning = project_init.write_code_stamps(tmp_path)
    assert [p.stem for p in written if p.read_text() != stamps[p.stem]] == ["prepare"]
    assert "made by picosam-pipeline 0.0.1" in warning


SMALL_SAMPLE = {"train_images": 2, "val_images": 1, "plant_bad_inputs": False}  # the teacher pass in ~40 s on 2 cores


@pytest.mark.slow
def test_wheel_init_then_dvc_repro_up_to_the_teacher(installed_wheel, tmp_path):
    venv, env = installed_wheel
    # The new venv's commands first; this environment's .venv/bin (our editable install's console script) not at all
    path = [p for p in env["PATH"].split(os.pathsep) if Path(p).resolve() != (REPO / ".venv/bin").resolve()]
    env = {**env, "PATH": os.pathsep.join([str(venv / "bin"), *path]), "DVC_NO_ANALYTICS": "1"}
    probe = (
        "import picosam_pipeline, picosam_pipeline.project_init as p; print(picosam_pipeline.__file__); "
        "print(p.template_root())"
    )
    where, template = run_checked([venv / "bin/python", "-c", probe], cwd=tmp_path, env=env).stdout.splitlines()
    assert where.startswith(str(venv)) and template == str(Path(where).parent / "project_template")
    # The wheel carries exactly the template files (the root mapped as a package: no module of the root slips in)
    names = zipfile.ZipFile(next((venv.parent / "dist").glob("*.whl"))).namelist()
    shipped = sorted(n.removeprefix("picosam_pipeline/project_template/") for n in names if "/project_template/" in n)
    assert shipped == sorted(
        ["dvc.yaml", *project_init.COPIED, *(f".dvc/plots/{p.name}" for p in (REPO / ".dvc/plots").glob("*.json"))]
    )

    run_checked([venv / "bin/picosam-pipeline", "init", "proj"], cwd=tmp_path, env=env)
    project = tmp_path / "proj"
    check_project(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sample"].update(SMALL_SAMPLE)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = [venv / "bin/python", "-m", "dvc"]
    proc = run_checked([*dvc, "repro", "teacher-logits@sam2"], cwd=project, env=env, timeout=900)
    out = proc.stdout + proc.stderr
    for stage in ("code-stamp", "sample", "prepare", "teacher-logits@sam2"):
        assert f"Running stage '{stage}'" in out
    assert (project / "data/prepared/index.parquet").stat().st_size > 0
    assert (project / "data/teacher/stores/sam2.zarr").is_dir() and (
        project / "metrics/teacher-logits@sam2.json"
    ).is_file()
    stamps = (project / ".picosam/code/package.sha256").read_text()
    assert "picosam_pipeline/deploy/template/picosam_imx500_demo.py" in stamps  # package data found as installed

    # An upgrade that changes prepare's code reruns prepare, not sample (and its output is the same: the teacher
    # pass is then skipped, its inputs unchanged)
    installed_prepare = Path(where).parent / "stages/prepare.py"
    original = installed_prepare.read_bytes()
    try:
        installed_prepare.write_bytes(original + b"# an upgrade\n")
        proc = run_checked([*dvc, "repro", "teacher-logits@sam2"], cwd=project, env=env, timeout=900)
    finally:
        installed_prepare.write_bytes(original)
    out = proc.stdout + proc.stderr
    assert "Running stage 'prepare'" in out and "Stage 'sample' didn't change" in out
    assert "Running stage 'teacher-logits@sam2'" not in out
