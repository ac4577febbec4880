"""The package's layering, read from the source with ``ast``: imports only go down the pipeline, and each DVC
stage lists as deps exactly the library files its code imports (so a change reruns the stages it affects).

Phases, in the order data flows: ``data`` -> ``teacher`` -> ``train`` -> ``evaluate`` -> ``deploy``. A phase
imports the phases before it and the cross-cutting modules at the top (``config``, ``errors``, ``device``,
``parallel``, the torchvision shim); never a later phase, never the stages and never the CLI. Function-level (lazy)
imports count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from picosam_pipeline.stages import STAGES
from tests.helpers.paths import REPO

PACKAGE = "picosam_pipeline"
PHASES = ("data", "teacher", "train", "evaluate", "deploy")
CROSS_CUTTING = {
    "config",
    "config_schema",
    "datasets",
    "errors",
    "device",
    "outputs",
    "parallel",
    "recipes",
    "reports",
    "_torchvision_compat",
    "written_paths",
    "output_lock",
    "provenance",
    "untrained",
    "untrusted",
    "environment",
}
TOP = {
    "cli",
    "__main__",
    "doctor",
    "project_init",
    "summary",
    "plot_page",
}  # the command line (and its `doctor`, `init`): imports everything, imported by nothing in the library
# Files that a stage imports but whose changes cannot change its outputs: package docstrings, the import shim,
# and the error classes (messages only).
NOT_DEPS = {"picosam_pipeline/errors.py", "picosam_pipeline/_torchvision_compat.py"}


def source_files() -> dict[str, Path]:
    """Dotted module name -> file, for the library and for the stages (installed as ``picosam_pipeline.stages``)."""
    files = {}
    for root, prefix in ((REPO / PACKAGE, PACKAGE), (REPO / "stages", f"{PACKAGE}.stages")):
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if "template" in parts:  # copied to the Raspberry Pi, not imported
                continue
            name = ".".join((prefix, *parts))
            files[name.removesuffix(".__init__")] = path
    return files


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that ``path`` imports anywhere in its body (``from picosam_pipeline.x import y`` counts ``x``
    and, when ``y`` is a module, ``x.y``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def layer(module: str) -> tuple[str, int]:
    """``(kind, rank)`` of a module: a phase with its rank, or ``cross-cutting`` / ``top`` / ``stages``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "package", -1
    if parts[1] in PHASES:
        return parts[1], PHASES.index(parts[1])
    if parts[1] == "stages":
        return "stages", len(PHASES)
    if parts[1] in TOP:
        return "top", len(PHASES) + 1
    assert parts[1] in CROSS_CUTTING, f"{module}: a new top-level module; put it in a phase or list it here"
    return "cross-cutting", -1


def violations(modules: dict[str, Path]) -> list[str]:
    """One line per import that runs against the pipeline order."""
    wrong = []
    for name, path in sorted(modules.items()):
        kind, rank = layer(name)
        for target in sorted(imports_of(path, modules)):
            target_kind, target_rank = layer(target)
            if kind in ("package", "cross-cutting"):
                allowed = target_kind in ("cross-cutting", "package")
            elif kind == "top":
                allowed = True
            else:  # a phase or the stages: earlier phases, its own phase, the cross-cutting modules
                allowed = target_kind in ("cross-cutting", "package") or target_rank <= rank
            if not allowed:
                wrong.append(f"{path} ({kind}) imports {target} ({target_kind})")
    return wrong


def test_imports_only_go_down_the_pipeline():
    modules = source_files()
    assert {f"{PACKAGE}.{p}" for p in PHASES} <= set(modules)
    wrong = violations(modules)
    assert not wrong, "imports against the pipeline order:\n" + "\n".join(wrong)


def test_the_checker_sees_lazy_and_upward_imports(tmp_path):
    """A data module importing deploy inside a function, and the library importing the CLI, are caught."""
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from picosam_pipeline.deploy import quantize\n")
    cli_user = tmp_path / "cli_user.py"
    cli_user.write_text("import picosam_pipeline.cli\n")
    modules = source_files()
    fake = {**modules, "picosam_pipeline.data.lazy": lazy, "picosam_pipeline.train.cli_user": cli_user}
    assert imports_of(lazy, modules) == {"picosam_pipeline.deploy", "picosam_pipeline.deploy.quantize"}
    assert [line.split(" imports ")[1] for line in violations(fake)] == [
        "picosam_pipeline.deploy (deploy)",
        "picosam_pipeline.deploy.quantize (deploy)",
        "picosam_pipeline.cli (top)",
    ]


def import_cycles(modules: dict[str, Path]) -> list[list[str]]:
    """Every import circle among ``modules`` (lazy imports count), as the sorted modules of each strongly connected
    component of more than one module or with a self-import; ``[]`` when the graph has none."""
    graph = {name: sorted(imports_of(path, modules) - {name.rsplit(".", 1)[0]}) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def test_no_import_circles():
    cycles = import_cycles(source_files())
    assert not cycles, "import circles (break each by moving the shared part into a module both import):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def test_the_circle_check_finds_a_planted_circle(tmp_path):
    """config importing outputs while outputs imports config (the circle this check was written for) is found, lazy
    import or not."""
    config = tmp_path / "config.py"
    config.write_text("from picosam_pipeline.outputs import atomic_write_bytes\n")
    outputs = tmp_path / "outputs.py"
    outputs.write_text("def f():\n    from picosam_pipeline.config import Config\n")
    modules = {**source_files(), "picosam_pipeline.config": config, "picosam_pipeline.outputs": outputs}
    assert ["picosam_pipeline.config", "picosam_pipeline.outputs"] in import_cycles(modules)


def closure(module: str, modules: dict[str, Path]) -> set[str]:
    """``module`` and every module of ours it imports, transitively (a package's ``__init__`` included)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # importing a.b.c runs a and a.b
        todo.extend(imports_of(modules[name], modules))
    return seen


def dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stages, a ``foreach`` stage (teacher-logits@NAME) by its template (``do``)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


@pytest.mark.parametrize("stage", list(STAGES))
def test_dvc_deps_list_exactly_the_code_each_stage_imports(stage):
    modules = source_files()
    needed = {str(modules[m].relative_to(REPO)) for m in closure(STAGES[stage].module, modules)}
    needed = {f for f in needed if not f.endswith("__init__.py") and f not in NOT_DEPS}
    listed = {d for d in dvc_stages()[stage]["deps"] if d.endswith(".py") and "/template/" not in d}
    assert needed - listed == set(), f"dvc.yaml stage {stage}: add these deps (its code imports them)"
    assert listed - needed == set(), f"dvc.yaml stage {stage}: these deps are not imported by its code"


PARAMS_CHECK = "check-params"  # dvc.yaml's first stage: the whole params file, before any stage's output goes


def test_every_dvc_stage_is_a_registered_stage():
    stages = dvc_stages()
    check = stages.pop(PARAMS_CHECK)
    assert check["cmd"] == f"picosam-pipeline {PARAMS_CHECK} --stamp data/params.checked"
    assert check["params"] == [{"params.yaml": None}] and check["outs"] == ["data/params.checked"]
    assert list(stages) == list(STAGES)
    for name, stage in stages.items():
        deps = stage["do"]["deps"] if "do" in stage else stage["deps"]
        assert "data/params.checked" in deps, f"{name} must run after {PARAMS_CHECK}"
        suffix = "@${key}" if name == "teacher-logits" else ""  # one stage per teacher pass
        assert stage["cmd"] == f"picosam-pipeline run-stage {name}{suffix}"


STAGE_FUNCTION_LINES = 60  # a stage resolves its config, calls the library and writes: more is library code


def stage_imports(modules: dict[str, Path]) -> list[str]:
    """``file imports stage`` for each import of a stage module by another stage or the library (the stage
    registry ``picosam_pipeline.stages`` and the command line may)."""
    stages = {name for name in modules if name.startswith(f"{PACKAGE}.stages.")}
    return [
        f"{modules[name]} imports {target}"
        for name, path in sorted(modules.items())
        if name != f"{PACKAGE}.stages" and layer(name)[0] != "top"
        for target in sorted(imports_of(path, modules) & stages)
    ]


def test_no_stage_imports_another_stage_and_nothing_imports_a_stage():
    wrong = stage_imports(source_files())
    assert not wrong, "a stage's helpers are imported (move them to the library):\n" + "\n".join(wrong)


def test_the_stage_import_check_sees_a_stage_importing_another(tmp_path):
    (tmp_path / "a.py").write_text("def run():\n    from picosam_pipeline.stages.b import helper\n")
    (tmp_path / "b.py").write_text("def helper():\n    pass\n")
    (tmp_path / "lib.py").write_text("import picosam_pipeline.stages.b\n")
    modules = {f"{PACKAGE}.stages.a": tmp_path / "a.py", f"{PACKAGE}.stages.b": tmp_path / "b.py"}
    modules[f"{PACKAGE}.train.lib"] = tmp_path / "lib.py"
    assert stage_imports(modules) == [
        f"{tmp_path / 'a.py'} imports {PACKAGE}.stages.b",
        f"{tmp_path / 'lib.py'} imports {PACKAGE}.stages.b",
    ]


def long_functions(path: Path, limit: int) -> list[str]:
    """``file:line name (N lines)`` for each function of ``path`` longer than ``limit`` lines."""
    return [
        f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > limit
    ]


def test_stages_are_thin():
    wrong = [
        line for path in sorted((REPO / "stages").glob("*.py")) for line in long_functions(path, STAGE_FUNCTION_LINES)
    ]
    assert not wrong, f"functions in stages/ over {STAGE_FUNCTION_LINES} lines:\n" + "\n".join(wrong)


def test_the_thin_stage_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(STAGE_FUNCTION_LINES))
    (tmp_path / "stage.py").write_text(f"def run():\n{body}\n")
    assert long_functions(tmp_path / "stage.py", STAGE_FUNCTION_LINES) == [f"{tmp_path / 'stage.py'}:1 run (61 lines)"]


def public_names(modules: dict[str, Path]) -> dict[str, list[str]]:
    """Top-level public function and class name -> the library modules defining it (the stages' ``run`` and
    ``output``, every stage's entry points by design, left out)."""
    defined: dict[str, list[str]] = {}
    for name, path in sorted(modules.items()):
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
                if name.startswith(f"{PACKAGE}.stages.") and node.name in ("run", "output"):
                    continue
                defined.setdefault(node.name, []).append(name)
    return defined


def test_no_two_public_functions_share_a_name():
    shared = {name: where for name, where in public_names(source_files()).items() if len(where) > 1}
    assert not shared, "one name, several meanings (rename one):\n" + "\n".join(f"{k}: {v}" for k, v in shared.items())


# --------------------------------------------------------------------------------------------------
# the tests' own imports: shared helpers come from tests.helpers, never from another test file or conftest.py

TESTS = REPO / "tests"


def python_files_under(root: Path = TESTS) -> dict[str, Path]:
    """Every Python file under ``root`` (tests/), by its path relative to it."""
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*.py")) if "__pycache__" not in p.parts}


def local_names(root: Path = TESTS) -> set[str]:
    """Names a bare import would resolve to a file or folder of tests/ (through pytest's old sys.path insertions):
    every module's and folder's name, conftest and the helpers included."""
    names = {p.stem for p in root.rglob("*.py") if "__pycache__" not in p.parts and p.stem != "__init__"}
    return names | {p.name for p in root.rglob("*") if p.is_dir() and p.name != "__pycache__"}


def bad_test_imports(files: dict[str, Path], local: set[str]) -> list[str]:
    """One line per import (lazy ones count) of a test module, of conftest, or of a helper other than through
    ``tests.helpers``; relative imports are refused too (a moved file would import something else)."""
    wrong = []
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    wrong.append(f"{name}:{node.lineno}: relative import (use tests.helpers.<module>)")
                    continue
                modules = [node.module] if node.module != "tests" else [f"tests.{a.name}" for a in node.names]
            else:
                continue
            for module in modules:
                parts = module.split(".")
                if parts[0] == "tests":
                    ok = parts[1:2] == ["helpers"]
                else:
                    ok = parts[0] not in local
                if not ok:
                    wrong.append(f"{name}:{node.lineno}: imports {module}")
    return wrong


def test_no_test_file_imports_another_test_file_or_conftest():
    files = python_files_under()
    assert "helpers/paths.py" in files and "conftest.py" in files
    wrong = bad_test_imports(files, local_names())
    assert not wrong, "tests import shared code from tests.helpers only:\n" + "\n".join(wrong)


def test_the_test_import_check_finds_planted_imports(tmp_path):
    """Each way a test file could reach into another (bare or through ``tests.``, lazy or not, relative) is found;
    ``tests.helpers`` and third-party imports pass."""
    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "paths.py").write_text("REPO = None\n")
    (tmp_path / "conftest.py").write_text("from tests.helpers.paths import REPO\n")
    (tmp_path / "test_a.py").write_text(
        "import numpy\nfrom tests.helpers import paths\nfrom tests.helpers.paths import REPO\n"
    )
    planted = {
        "test_b.py": "from conftest import REPO\n",
        "test_c.py": "def f():\n    import test_a as t\n",
        "test_d.py": "from tests.test_a import x\n",
        "test_e.py": "from tests import conftest\n",
        "test_f.py": "from paths import REPO\n",
        "test_g.py": "from .helpers.paths import REPO\n",
        "test_h.py": "import tests.conftest\n",
    }
    for name, text in planted.items():
        (tmp_path / name).write_text(text)
    wrong = bad_test_imports(python_files_under(tmp_path), local_names(tmp_path))
    assert [line.split(":")[0] for line in wrong] == sorted(planted), wrong
