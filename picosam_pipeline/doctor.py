"""``picosam-pipeline doctor``: what this machine can run, checked before a stage finds out.

Each check is a :class:`Check` with a status: ``ok``, ``warn`` (the pipeline runs, but without something: no CUDA,
random teacher weights allowed) or ``fail`` (a stage that params.yaml asks for will stop), and the fix where there is
one. The checks are cheap (no model is built): the Python packages of each extra (``errors.EXTRAS``), the dataset
and the teacher checkpoint of every teacher pass in the params, CUDA through torch (and how to get a CUDA build),
the IMX500 converter (``imxconv-pt``) and the Java 17 it needs (``deploy/imx500.py``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from picosam_pipeline.errors import EXTRAS, PipelineError

STATUS_ORDER = ("ok", "warn", "fail")


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


def _version(module: str) -> str:
    """The installed version of the distribution that provides top-level ``module`` ("?" when unknown)."""
    dists = importlib.metadata.packages_distributions().get(module, [module])
    try:
        return importlib.metadata.version(dists[0])
    except importlib.metadata.PackageNotFoundError:
        return "?"


def check_extras() -> list[Check]:
    """One check per extra: are its modules importable (found, not imported)."""
    out = []
    for extra, modules in EXTRAS.items():
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            out.append(
                Check(
                    f"extra [{extra}]",
                    "warn",
                    f"missing {', '.join(missing)}: pip install "
                    f"'picosam-pipeline[{extra}]' (`make env` installs every extra)",
                )
            )
        else:
            out.append(Check(f"extra [{extra}]", "ok", ", ".join(f"{m} {_version(m)}" for m in modules)))
    return out


def check_torch() -> list[Check]:
    """torch's build and whether CUDA is usable (a warning, not a failure: every stage runs on a CPU)."""
    import torch

    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return [Check("CUDA", "ok", f"torch {torch.__version__}, {torch.cuda.device_count()} GPU(s): {names}")]
    why = (
        "a CPU-only torch build"
        if torch.version.cuda is None
        else f"torch built for CUDA {torch.version.cuda}, no GPU visible"
    )
    fix = (
        "for a GPU build, `make env TORCH=cuda` in a fresh .venv (docs/gpu.md)"
        if torch.version.cuda is None
        else "check the driver with `nvidia-smi` and CUDA_VISIBLE_DEVICES"
    )
    return [
        Check(
            "CUDA",
            "warn",
            f"torch {torch.__version__}: {why}; every stage runs on the CPU (slowly for the teacher); {fix}",
        )
    ]


def dataset_checks(cfg) -> list[Check]:
    """The dataset params.yaml names: its annotation files and image folders (``prepare.splits``)."""
    from picosam_pipeline.datasets import missing_dataset_message

    name, folder = cfg.dataset.name, cfg.dataset.folder
    missing = [p for s in cfg.prepare.splits for p in (s.annotations, s.images) if not Path(p).exists()]
    if not missing:
        splits = ", ".join(s.name for s in cfg.prepare.splits)
        return [Check(f"dataset {name}", "ok", f"{folder}: splits {splits}")]
    status = "warn" if name == "sample" else "fail"  # the sample stage builds it on the first `make repro`
    return [Check(f"dataset {name}", status, missing_dataset_message(name, folder, missing[0]))]


def check_teachers(params: str | None, overrides: tuple[str, ...] = ()) -> list[Check]:
    """The checkpoint of every teacher pass the params ask for (random weights allowed: a warning)."""
    from picosam_pipeline.config import load_config

    if params is not None and not Path(params).is_file():
        return [Check("params", "warn", f"{params} not found; teacher checkpoints not checked")]
    try:
        cfg = load_config(params, overrides)
    except PipelineError as err:
        return [Check("params", "fail", str(err))]
    passes = {name: cfg.teacher_pass(name).teacher for name in cfg.teachers} or {"teacher": cfg.teacher}
    out = [Check("params", "ok", f"{params or 'defaults'}: teacher passes {', '.join(passes)}"), *dataset_checks(cfg)]
    for name, t in passes.items():
        label = f"teacher {name} ({t.model})"
        if t.checkpoint and Path(t.checkpoint).is_file():
            out.append(Check(label, "ok", f"checkpoint {t.checkpoint}"))
        elif t.allow_random_weights:
            out.append(
                Check(
                    label,
                    "warn",
                    f"no checkpoint at {t.checkpoint}: RANDOM weights (allowed by "
                    "teacher.allow_random_weights; fine for tests, useless for distillation); "
                    "`picosam-pipeline fetch --list` names the checkpoints",
                )
            )
        else:
            out.append(
                Check(
                    label,
                    "fail",
                    f"no checkpoint at {t.checkpoint} and teacher.allow_random_weights is false; "
                    "`picosam-pipeline fetch sam2.1_hiera_tiny` (or the one params name)",
                )
            )
    return out


def check_converter() -> list[Check]:
    """``imxconv-pt`` and Java 17 (the package stage); a warning when missing: the stages before it run without."""
    if (
        importlib.util.find_spec("imx500_converter") is None
        and importlib.util.find_spec("model_compression_toolkit") is None
    ):
        return [
            Check(
                "IMX500 converter",
                "warn",
                "the [imx500] extra is not installed: quantize, export and package will not run",
            )
        ]
    from picosam_pipeline.deploy.imx500 import ConverterError, check_java, converter_executable

    out = []
    try:
        out.append(
            Check(
                "IMX500 converter", "ok", f"{converter_executable()} (imx500-converter {_version('imx500_converter')})"
            )
        )
    except ConverterError as err:
        out.append(Check("IMX500 converter", "warn", str(err)))
    try:
        java = check_java()
        out.append(Check("Java 17", "ok", f"{java.path}: Java {java.version}"))
    except ConverterError as err:
        out.append(Check("Java 17", "warn", f"{err} (only the package stage needs it)"))
    return out


def run_checks(params: str | None, overrides: tuple[str, ...] = ()) -> list[Check]:
    return [*check_extras(), *check_torch(), *check_teachers(params, overrides), *check_converter()]


def format_checks(checks: list[Check], columns: int | None = None) -> str:
    """One check per line (status, name, detail), the detail wrapped to ``columns`` (default: the terminal's)."""
    import shutil
    import textwrap

    width = max(len(c.name) for c in checks)
    columns = columns or shutil.get_terminal_size((120, 24)).columns
    indent = " " * (4 + 2 + width + 2)
    lines = []
    for c in checks:
        head = f"{c.status.upper():<4}  {c.name:<{width}}  "
        lines.append(
            textwrap.fill(
                c.detail,
                max(columns, len(indent) + 40),
                initial_indent=head,
                subsequent_indent=indent,
                break_on_hyphens=False,
                break_long_words=False,
            )
        )
    return "\n".join(lines)
