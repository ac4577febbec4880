"""User-facing errors: bad input that the user can fix.

The CLI prints these as one paragraph and exits non-zero; anything else is a bug and keeps its traceback.
No message here advises turning a safety check off: a refused input gets the safe way to a good one.
"""

import re
import sys


class PipelineError(Exception):
    """Bad input (file, params, asset) with a message that names it and says how to fix it."""


# The optional parts of the install (pyproject.toml extras) and the top-level modules each provides.
EXTRAS: dict[str, tuple[str, ...]] = {
    "teacher": ("sam2",),
    "sam3": ("sam3",),
    "imx500": ("model_compression_toolkit", "mct_quantizers", "edgemdt_tpc", "imx500_converter", "uni"),
}


# Extras whose packages exist for some Pythons only (pyproject.toml's markers): Sony's IMX500 converter front end
# (uni-pytorch) is published for 3.10-3.12; of those the project supports 3.11 and 3.12.
PYTHONS_OF_EXTRA: dict[str, tuple[tuple[int, int], ...]] = {"imx500": ((3, 11), (3, 12))}


class MissingExtraError(PipelineError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require_extra(extra: str, purpose: str) -> None:
    """Raise :class:`MissingExtraError` (one line, naming the extra) unless every module of ``extra`` is importable.

    Checked before the work starts, so a missing optional package is a one-line message, not a traceback from
    deep inside a stage.
    """
    import importlib.util

    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing and extra in PYTHONS_OF_EXTRA and sys.version_info[:2] not in PYTHONS_OF_EXTRA[extra]:
        versions = ", ".join(f"{major}.{minor}" for major, minor in PYTHONS_OF_EXTRA[extra])
        raise MissingExtraError(
            f"{purpose} needs the optional package(s) {', '.join(missing)} (the [{extra}] extra), which are not "
            f"published for Python {sys.version_info[0]}.{sys.version_info[1]}; run this stage with Python {versions} "
            f"(e.g. `make env PYTHON=python3.12` into a fresh .venv)"
        )
    if missing:
        raise MissingExtraError(
            f"{purpose} needs the optional package(s) {', '.join(missing)}, which are not installed; install them with "
            f"pip install 'picosam-pipeline[{extra}]' (`make env` installs every extra with the tested pins)"
        )


def refused_checkpoint(path: object, err: BaseException, fix: str) -> PipelineError:
    """Our message for a checkpoint that ``torch.load(weights_only=True)`` refused: it needs arbitrary unpickling.

    torch's own message advises re-running ``torch.load`` with ``weights_only=False`` or allow-listing the
    refused global, i.e. running code from the file; neither is repeated. The message names what the file asked
    for (the class or function its pickle would call), says that nothing ran, and ends with ``fix``: how to get a
    checkpoint that holds tensors only.
    """
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL ([\w.<>]+)", text) or re.search(
        r"WeightsUnpickler error: ([^.\n]+)", text
    )
    wanted = f"it asks for {found.group(1)}" if found else "it holds pickled objects other than tensors"
    return PipelineError(
        f"checkpoint {str(path)!r} was refused: loading it would run code from the file ({wanted}, which is not a "
        f"tensor or a plain container); nothing from it was run. {fix}"
    )


def is_weights_only_refusal(err: BaseException) -> bool:
    """True for torch's refusal of a file that needs more than tensors and plain containers (not plain damage)."""
    import pickle

    return isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err)
