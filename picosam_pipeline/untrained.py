"""An untrained student, said at every step to the sensor: the trainer's flag (``untrained``, ``training_warnings``
in a student checkpoint's meta), carried by the ONNX files from quantize through export to package, each of which
says it again on stderr and records ``untrained_student: true`` in its metrics.
"""

from __future__ import annotations

import json
import sys
import textwrap
from typing import Any

from picosam_pipeline.untrusted import safe_text

# <prefix><key> in the ONNX metadata of an untrained student's network: "true", and the trainer's warnings (JSON)
UNTRAINED_KEY, WARNINGS_KEY = "untrained_student", "training_warnings"


def training_warnings(meta: dict[str, Any]) -> list[str] | None:
    """The trainer's warnings of a student checkpoint's ``meta`` when it records the student as untrained (a list,
    possibly empty), else None (a trained student, or one of a trainer that did not record it)."""
    if meta.get("untrained") is not True:
        return None
    warnings = meta.get("training_warnings")
    return [str(w) for w in warnings] if isinstance(warnings, list) else []


def untrained_metadata(warnings: list[str] | None) -> dict[str, str]:
    """The ONNX metadata that marks an untrained student's network (none for a trained one, whose files stay as
    they were)."""
    if warnings is None:
        return {}
    return {UNTRAINED_KEY: "true", WARNINGS_KEY: json.dumps(warnings)}


def metadata_training_warnings(props: dict[str, str], prefix: str) -> list[str] | None:
    """The trainer's warnings in an ONNX file's ``metadata_props`` (our keys start with ``prefix``) when they mark
    its student untrained (:func:`untrained_metadata`), else None."""
    if props.get(prefix + UNTRAINED_KEY) != "true":
        return None
    try:
        warnings = json.loads(props.get(prefix + WARNINGS_KEY, "[]"))
    except ValueError:
        warnings = []
    return [str(w) for w in warnings] if isinstance(warnings, list) else []


def untrained_flag(warnings: list[str] | None) -> dict[str, bool]:
    """What a deploy stage adds to its metrics for an untrained student: ``{"untrained_student": true}``."""
    return {} if warnings is None else {UNTRAINED_KEY: True}


def warn_untrained(stage: str, source: str, warnings: list[str] | None) -> None:
    """Say on stderr, as one paragraph, that ``stage`` works on an untrained student (from ``source``), with the
    trainer's warnings; nothing for a trained one."""
    if warnings is None:
        return
    told = " ".join(safe_text(w, limit=600) for w in warnings) or "(the trainer recorded no reason)."
    text = (
        f"WARNING: {stage} is working on an UNTRAINED student ({safe_text(source)}): its masks are close to those "
        f"of its random initial weights. The trainer said: {told} Retrain it (see train.steps) before putting it on "
        f"a camera; {stage} records untrained_student: true in its metrics."
    )
    print(f"\n{textwrap.fill(text, width=110)}\n", file=sys.stderr, flush=True)
