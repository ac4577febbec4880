"""``picosam-pipeline init DIR``: a runnable pipeline project for someone who installed the package (no clone).

DIR gets the repository's ``params.yaml`` (byte for byte), a ``dvc.yaml`` derived from the repository's (below),
``.dvc/`` (``dvc init``, plus our plot templates in ``.dvc/plots/``), ``.dvcignore``, ``.gitignore``, the data layout
the stages expect (``data/README.md``; ``data/checkpoints/``, a dependency of the teacher stage, so it must exist) and
a README.md saying what to run. ``dvc repro`` there runs the whole pipeline on the built-in sample.

**Where the files come from: the repository's own root files, not a second copy.** pyproject.toml maps the package
``picosam_pipeline.project_template`` to the repository root ([tool.setuptools.package-dir]) and ships exactly these
files as its package data, so every wheel (built from the tree, or from an sdist, which carries them at its root)
has them in ``picosam_pipeline/project_template/``. In a checkout (an editable install, or the sources on sys.path)
that folder does not exist and the same files are read from the checkout's root, whatever the editable install
was made from. Not chosen: a committed copy kept equal by a test (two files to edit for every change of dvc.yaml), a
build hook (a setup.py, and an editable-mode path of its own), [tool.setuptools] data-files (installed outside the
package, where it cannot find them reliably, and not at all by an editable install).

**Code deps and upgrades.** Every stage of the repository's dvc.yaml depends on its code files (picosam_pipeline/...,
stages/...), which a project does not have. init replaces them, per stage, by one file, ``.picosam/code/STAGE.sha256``:
the sha256 of each of those files as installed, written by a stage added in front, ``code-stamp`` (``picosam-pipeline
code-stamp``; always_changed, so it runs on every ``dvc repro``, in well under a second). Upgrading or reinstalling
picosam-pipeline then changes the stamps of exactly the stages whose code changed, and only those rerun: the rule of
the repository. The version number alone was not chosen as the trigger: a file written once by init never changes
when the package is upgraded (nothing would rerun), and a version refreshed on every run would rerun every stage,
hours of teacher work included, for any release, while missing code changes under the same number (installs from
git). The version that wrote the project is kept in ``.picosam/version``: code-stamp warns when the installed one
differs, since dvc.yaml and params.yaml are then an older version's (a new key or stage is not in them).

**Git.** DIR inside a git repository joins it (``dvc init --subdir`` below its top). Otherwise init makes one (``git
init``) and commits the project as its first commit: dvclive, which the train stage logs through, fails in a
repository without commits, and ``dvc exp run`` needs one. ``--no-git`` (or no git installed): ``dvc init --no-scm``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from picosam_pipeline import __version__
from picosam_pipeline.errors import PipelineError

TEMPLATE_DIR = "project_template"  # inside the installed package (see the module docstring)
# Copied unchanged, by their path in the repository (= in the project); pyproject.toml's package-data ships them and
# dvc.yaml (tests/test_init.py checks the wheel). Every *.json of PLOTS too: dvc.yaml's plots name these templates.
COPIED = (
    "params.yaml",
    "params.schema.json",
    ".dvcignore",
    ".gitignore",
    "data/README.md",
    "data/checkpoints/README.md",
)
PLOTS = ".dvc/plots"
CODE_DEP = re.compile(r"(picosam_pipeline|stages)/")  # a dep that is a file of this package
STAMP_STAGE = "code-stamp"
STAMP_DIR = ".picosam/code"
VERSION_FILE = ".picosam/version"


@dataclass
class InitResult:
    path: Path
    scm: str  # what git setup the project got, in words
    notes: list[str] = field(default_factory=list)


def template_root() -> Path:
    """The folder holding the repository's root files: the installed package's copy, else a checkout's root."""
    package = Path(__file__).resolve().parent
    for root in (package / TEMPLATE_DIR, package.parent):
        if (
            (root / "dvc.yaml").is_file()
            and (root / "params.yaml").is_file()
            and (root != package.parent or (root / "pyproject.toml").is_file())
        ):
            return root
    raise PipelineError(
        f"this picosam-pipeline install has no project template ({package / TEMPLATE_DIR}/dvc.yaml "
        "is missing): reinstall the package (pip install --force-reinstall picosam-pipeline)"
    )


def code_deps(dvc: dict) -> dict[str, list[str]]:
    """Stage name (a foreach stage by its own name: one code for all its passes) -> its deps that are our code."""
    return {
        name: [d for d in stage.get("do", stage).get("deps", []) if isinstance(d, str) and CODE_DEP.match(d)]
        for name, stage in dvc["stages"].items()
    }


def _stamp_stage(stages: list[str]) -> dict:
    return {
        "cmd": f"picosam-pipeline {STAMP_STAGE}",
        "always_changed": True,
        "outs": [{f"{STAMP_DIR}/{name}.sha256": {"cache": False}} for name in stages],
    }


HEADER = """\
# Written by `picosam-pipeline init` (picosam-pipeline {version}) from the package's own dvc.yaml. Each stage runs
# `picosam-pipeline run-stage NAME`, the command a person types. deps = the stage's code ({stamps}/NAME.sha256:
# the sha256 of each package file it runs, written by the first stage from the installed package) + its inputs,
# params = the params.yaml sections it reads, outs/metrics/plots = what it writes. `dvc repro` reruns only what
# changed, a stage whose code an upgrade of picosam-pipeline changed included.
stages:
  {stage}:
    cmd: picosam-pipeline {stage}
    always_changed: true           # runs on every dvc repro (under a second); a stamp changes only with the code
    outs:
"""


def project_dvc_yaml(template: str) -> str:
    """The repository's dvc.yaml text for a project: code deps replaced by the stage's stamp, code-stamp in front.

    Edited line by line so that the comments stay, then checked against the same change made on the parsed YAML: a
    layout the line rules do not handle (a flow-style list, say) stops here instead of writing a wrong pipeline.
    """
    parsed = yaml.safe_load(template)
    lines = HEADER.format(version=__version__, stamps=STAMP_DIR, stage=STAMP_STAGE).splitlines()
    lines += [f"      - {STAMP_DIR}/{name}.sha256:\n          cache: false" for name in parsed["stages"]]
    section = stage = None
    for line in template.splitlines():
        top = re.match(r"([\w-]+):", line)
        if top:
            section = top.group(1)
            if section == "stages":
                continue  # already written, with the stamp stage under it
        if section is None:
            continue  # the repository's own header comment: about the repository
        named = re.fullmatch(r"  ([\w@-]+):\s*(#.*)?", line)
        if section == "stages" and named:
            stage = named.group(1)
        if re.fullmatch(r"\s*- (picosam_pipeline|stages)/\S+\s*(#.*)?", line):
            continue
        lines.append(line)
        deps = re.fullmatch(r"(\s*)deps:\s*(#.*)?", line)
        if section == "stages" and deps:
            lines.append(f"{deps.group(1)}  - {STAMP_DIR}/{stage}.sha256")
    text = "\n".join(lines) + "\n"

    expected = copy.deepcopy(parsed)
    for name, body in expected["stages"].items():
        body = body.get("do", body)
        body["deps"] = [f"{STAMP_DIR}/{name}.sha256"] + [d for d in body.get("deps", []) if not CODE_DEP.match(str(d))]
    expected["stages"] = {STAMP_STAGE: _stamp_stage(list(parsed["stages"])), **expected["stages"]}
    got = yaml.safe_load(text)
    if got != expected or list(got["stages"]) != list(expected["stages"]):
        raise RuntimeError(
            "project_dvc_yaml: the package's dvc.yaml has a layout its line rules do not handle "
            "(code deps as block-list lines, stages two spaces in): a bug in picosam-pipeline"
        )
    return text


def _installed_file(dep: str) -> Path:
    """A code dep of the repository's dvc.yaml (picosam_pipeline/x.py, stages/x.py) -> the file as installed."""
    import picosam_pipeline.stages as stages  # the repository's stages/, installed as picosam_pipeline.stages

    top, _, rest = dep.partition("/")
    base = Path(stages.__file__) if top == "stages" else Path(__file__)
    return base.resolve().parent / rest


def write_code_stamps(project: Path = Path(".")) -> tuple[list[Path], str | None]:
    """Write ``.picosam/code/STAGE.sha256`` for every stage: ``(files written, warning or None)``.

    The warning says that the project was made by another version of picosam-pipeline than the installed one.
    """
    out = project / STAMP_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stage, deps in code_deps(yaml.safe_load((template_root() / "dvc.yaml").read_text())).items():
        lines = [f"# the picosam-pipeline code that stage {stage} runs, as installed: sha256, path in its repository"]
        for dep in sorted(deps):
            path = _installed_file(dep)
            if not path.is_file():
                raise PipelineError(
                    f"{path} is missing from the installed picosam-pipeline (stage {stage} runs it): "
                    "reinstall the package (pip install --force-reinstall picosam-pipeline)"
                )
            lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {dep}")
        written.append(out / f"{stage}.sha256")
        written[-1].write_text("\n".join(lines) + "\n")
    recorded = project / VERSION_FILE
    made_by = recorded.read_text().strip() if recorded.is_file() else __version__
    warning = (
        None
        if made_by == __version__
        else (
            f"this project was made by picosam-pipeline {made_by}, the installed one is {__version__}: its dvc.yaml "
            "and params.yaml are that version's (`picosam-pipeline init NEW_DIR` writes the installed one's, to "
            "compare)"
        )
    )
    return written, warning


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True)


def init_project(directory: str | Path, git: bool | None = None) -> InitResult:
    """Create a project in ``directory`` (new or empty). ``git``: None = use the enclosing git repository, else
    ``git init`` when git is installed, else none; True = the same, but git must be installed; False = no git
    (``dvc init --no-scm``)."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise PipelineError(f"{target} is a file: give a new or empty folder for the project")
    if target.is_dir() and any(target.iterdir()):
        shown = sorted(p.name for p in target.iterdir())
        raise PipelineError(
            f"{target} is not empty ({', '.join(shown[:5])}{', ...' if len(shown) > 5 else ''}): "
            "init writes a new project and overwrites nothing; give a new or empty folder"
        )
    has_git = shutil.which("git") is not None
    if git and not has_git:
        raise PipelineError("--git: git is not installed (or not on PATH); install it, or use --no-git")
    template = template_root()
    dvc_yaml = project_dvc_yaml((template / "dvc.yaml").read_text())  # before anything is written: it may stop
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    try:
        return _populate(target.resolve(), template, dvc_yaml, git, has_git)
    except BaseException:
        # Leave the folder as it was (absent or empty): a rerun must not meet a half-made project it refuses.
        if created:
            shutil.rmtree(target, ignore_errors=True)
        else:
            for child in target.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        raise


def _populate(target: Path, template: Path, dvc_yaml: str, git: bool | None, has_git: bool) -> InitResult:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    top = _git("-C", str(target), "rev-parse", "--show-toplevel") if has_git and git is not False else None
    enclosing = Path(top.stdout.strip()).resolve() if top is not None and top.returncode == 0 else None
    no_scm = git is False or (enclosing is None and not has_git)
    if no_scm:
        scm = "none (dvc init --no-scm; " + ("--no-git)" if git is False else "git is not installed)")
    elif enclosing is not None:
        scm = f"the enclosing git repository {enclosing}"
    else:
        made = _git("init", "-q", str(target))
        if made.returncode != 0:
            raise PipelineError(f"git init {target} failed: {made.stderr.strip()}")
        scm = "a new git repository (git init)"
    dvc_log = logging.getLogger("dvc")
    level = dvc_log.level
    dvc_log.setLevel(logging.WARNING)  # not dvc init's "You can now commit": the command prints its own summary
    try:
        # --subdir: DVC's project below the top of the git repository it is in
        Repo.init(str(target), no_scm=no_scm, subdir=enclosing is not None and enclosing != target).close()
    except DvcException as err:
        raise PipelineError(f"dvc init in {target} failed: {err}") from err
    finally:
        dvc_log.setLevel(level)

    for name in COPIED:  # .dvcignore replaces the one dvc init wrote (ours lists the READMEs in data/)
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template / name, target / name)
    (target / PLOTS).mkdir(parents=True, exist_ok=True)
    for plot in sorted((template / PLOTS).glob("*.json")):
        shutil.copyfile(plot, target / PLOTS / plot.name)
    (target / "dvc.yaml").write_text(dvc_yaml)
    (target / VERSION_FILE).parent.mkdir(parents=True, exist_ok=True)
    (target / VERSION_FILE).write_text(__version__ + "\n")
    (target / "README.md").write_text(README.format(name=target.name, version=__version__))

    notes, failed = [], ""
    if scm.startswith("a new git"):
        # The first commit, of what init wrote into its own new repository: dvclive (the train stage) fails in a git
        # repository without commits ("Empty git repo", treeverse/dvclive#522) and `dvc exp run` needs one too.
        made = _git("-C", str(target), "add", "-A")
        if made.returncode == 0:
            made = _git(
                "-C", str(target), "commit", "-q", "-m", f"picosam-pipeline init (picosam-pipeline {__version__})"
            )
        if made.returncode == 0:
            scm += " with a first commit"
        else:
            failed = f" (git commit: {(made.stderr.strip().splitlines() or ['exit ' + str(made.returncode)])[-1]})"
    if not no_scm and _git("-C", str(target), "rev-parse", "-q", "--verify", "HEAD").returncode != 0:
        notes.append(
            f"the git repository has no commit yet{failed}: commit the project (git add -A && git commit -m "
            "init) before `dvc repro`; its train stage (dvclive) and `dvc exp run` need a commit"
        )
    if not (shutil.which("dvc") and shutil.which("picosam-pipeline")):
        notes.append(
            "dvc or picosam-pipeline is not on PATH: activate the environment picosam-pipeline is installed "
            "in (source VENV/bin/activate) before `dvc repro`, whose stages run `picosam-pipeline ...`"
        )
    return InitResult(target, scm, notes)


README = """\
# {name}

A picosam-pipeline project (made by `picosam-pipeline init`, version
{version}): SAM2 distilled into a PicoSAM student for the Sony IMX500, as DVC stages. It starts on the built-in
synthetic sample, which runs on a CPU in minutes (random teacher weights: the numbers mean nothing).

## Run

With the environment that has picosam-pipeline activated (the stages run `picosam-pipeline run-stage NAME`):

```bash
dvc repro                       # every stage; again: only what changed (params, inputs, upgraded code)
dvc repro prepare               # up to one stage (dvc dag: the order)
picosam-pipeline stages         # what each stage reads and writes
picosam-pipeline doctor         # what this machine can run: extras, CUDA, teacher checkpoints, Java 17
```

quantize, export and evaluate-int8 need the `imx500` extra, package also Java 17 (`pip install
'picosam-pipeline[imx500]'`); the teacher stage needs the `teacher` extra (sam2). `picosam-pipeline --help`
explains every command.

## Results

```bash
dvc metrics show                # the headline numbers of every stage (metrics/*.json)
picosam-pipeline summary        # every stage's headline numbers and provenance, one table
picosam-pipeline plots          # every plot in one page that opens offline (data/plots.html)
picosam-pipeline inspect data/teacher/stores/sam2.zarr       # the stored teacher logits
picosam-pipeline predict --image photo.jpg --box 40,30,120,90 # the trained student on an image
```

## Real COCO

```bash
picosam-pipeline fetch coco2017 sam2.1_hiera_tiny --track    # 20 GB into data/datasets/coco2017, the checkpoint
dvc exp run -S dataset.name=coco2017 -S teacher.allow_random_weights=false   # needs git (init made a commit)
```

Without `dvc exp`: set `dataset.name: coco2017` and `teacher.allow_random_weights: false` in params.yaml, then
`dvc repro`. The teacher stage wants a GPU at that size. Your own COCO-format data: put it in
data/datasets/NAME as annotations/instances_{{train,val}}.json and {{train,val}}/ images, and set `dataset.name: NAME`.

## What is here

| path | what |
|---|---|
| `params.yaml` | every setting, one section per stage (checked before a stage starts) |
| `dvc.yaml`, `dvc.lock` | the stages and the state of the last run (commit both) |
| `data/` | inputs and stage outputs (data/README.md); outputs are tracked by DVC, not git |
| `metrics/` | each stage's headline numbers (small, commit them) |
| `.picosam/` | the version that made this project and the installed code of each stage (stage code-stamp; commit) |

After upgrading picosam-pipeline, `dvc repro` reruns the stages whose code changed. Its dvc.yaml and params.yaml
can gain keys or stages: `picosam-pipeline init NEW_DIR` writes the new version's to compare with these.
"""
