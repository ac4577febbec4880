"""User-facing errors: bad input that the user can fix.

The CLI prints these as one paragraph and exits non-zero; anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """Bad input (file, params, asset) with a message that names it and says how to fix it."""


# The optional parts of the install (pyproject.toml extras) and the top-level modules each provides.
EXTRAS: dict[str, tuple[str, ...]] = {
    "teacher": ("sam2",),
    "sam3": ("sam3",),
    "imx500": ("model_compression_toolkit", "mct_quantizers", "edgemdt_tpc", "imx500_converter", "uni"),
}


class MissingExtraError(PipelineError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require_extra(extra: str, purpose: str) -> None:
    """Raise :class:`MissingExtraError` (one line, naming the extra) unless every module of ``extra`` is importable.

    Checked before the work starts, so a missing optional package is a one-line message, not a traceback from
    deep inside a stage.
    """
    import importlib.util

    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"{purpose} needs the optional package(s) {', '.join(missing)}, which are not installed; install them with "
            f"pip install 'picosam-pipeline[{extra}]' (`make env` installs every extra with the tested pins)")
