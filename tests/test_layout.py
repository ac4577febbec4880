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
from conftest import REPO

from picosam_pipeline.stages import STAGES

PACKAGE = "picosam_pipeline"
PHASES = ("data", "teacher", "train", "evaluate", "deploy")
CROSS_CUTTING = {
    "config",
    "datasets",
    "errors",
    "device",
    "outputs",
    "parallel",
    "recipes",
    "reports",
    "_torchvision_compat",
}
TOP = {
    "cli",
    "__main__",
    "doctor",
    "project_init",
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


def test_every_dvc_stage_is_a_registered_stage():
    assert list(dvc_stages()) == list(STAGES)
    for name, stage in dvc_stages().items():
        suffix = "@${key}" if name == "teacher-logits" else ""  # one stage per teacher pass
        assert stage["cmd"] == f"picosam-pipeline run-stage {name}{suffix}"
