"""The crop convention: which crop of an image a student sees, the record every artifact carries, and the one check
that two of them agree.

Two conventions, one per paper (the geometry is in :mod:`picosam_pipeline.data.crops`):

* ``roi`` (PicoSAM3): the box prompt padded by ``roi_padding`` of its side per side, made square, clipped;
* ``point`` (PicoSAM2): the ``window``-px native-resolution window around the point prompt.

Either crop is resized to ``input_size`` px. The *record* of a convention, ``{convention, prompt, paper,
roi_padding | window, input_size}`` (``crops.crop_convention``), goes with every artifact made from such crops:
``shards.json``, ``student.pt``, the ONNX files' metadata, the deploy folder. Each stage that puts two artifacts
together checks them with :func:`check_crops`, so a mismatch reads the same wherever it is found.

The record itself (``crops.crop_convention``, ``crops.CONVENTIONS``) is defined beside the geometry in ``crops.py``
because that module ships, standalone, to the Raspberry Pi's deploy folder; everything else about conventions is
here. The crops depend on ``prepare``'s params, which the instance index records; :func:`index_crop_params` is the
one reader of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from picosam_pipeline.data.crops import CONVENTION_KEYS, convention_differences
from picosam_pipeline.data.index import read_index_metadata
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.recipes import STUDENT_CONVENTION  # student -> the crops its paper trains it on


class CropMismatch(PipelineError):
    """Two artifacts (or an artifact and the params) that do not share one crop convention."""


def check_crops(
    found: dict | None,
    found_where: str,
    wanted: dict | None,
    wanted_where: str,
    fix: str,
    *,
    keys: tuple[str, ...] = CONVENTION_KEYS,
) -> None:
    """Refuse two crop records that differ on ``keys`` (of those ``wanted`` names), in one message shape.

    ``found`` is what an artifact holds (``found_where`` names it: a path, or the key that set it), ``wanted`` what
    the other side needs. A partial record (a store records only ``convention``; a student's pairing is only its
    convention) is compared on the keys it has: pass ``keys=("convention",)``.

    Raises:
        CropMismatch: ``FOUND_WHERE holds C1 crops, but WANTED_WHERE needs C2 crops (key a != b; ...); FIX``.
    """
    found_part = {k: (found or {}).get(k) for k in keys}
    wanted_part = {k: (wanted or {}).get(k) for k in keys}
    differences = convention_differences(found_part, wanted_part)
    if differences:
        have = (found or {}).get("convention")
        need = (wanted or {}).get("convention")
        raise CropMismatch(
            f"{found_where} holds {have} crops, but {wanted_where} needs {need} crops ({'; '.join(differences)}); {fix}"
        )


def student_crops(student: str) -> dict[str, str]:
    """The partial record a student's paper trains it on (``{"convention": "roi"}`` for picosam3); compare it with
    ``keys=("convention",)``."""
    return {"convention": STUDENT_CONVENTION[student]}


@dataclass(frozen=True)
class CropParams:
    """The ``prepare`` params the crops depend on, as the instance index records them (``prepare.*``)."""

    roi_padding: float
    point_crop_size: int
    min_roi_side: float
    min_area: float

    def as_dict(self) -> dict[str, Any]:
        """``{roi_padding, point_crop_size, min_roi_side, min_area}`` in this order (the teacher store's ``crop``)."""
        return asdict(self)


def index_crop_params(index: str | Path) -> CropParams:
    """The crop params the index at ``index`` was prepared with; refuses an index that does not record them (there
    is no default to fall back to: crops made with other params would quietly disagree with the teacher's)."""
    recorded = read_index_metadata(index).get("prepare")
    fields = CropParams.__dataclass_fields__
    missing = [k for k in fields if not isinstance((recorded or {}).get(k), (int, float))]
    if missing:
        raise PipelineError(
            f"{index}: the index does not record the crop params {', '.join('prepare.' + k for k in missing)}; it was "
            "not written by this version's prepare stage: rerun prepare (`picosam-pipeline run-stage prepare`)"
        )
    return CropParams(**{k: recorded[k] for k in fields})
