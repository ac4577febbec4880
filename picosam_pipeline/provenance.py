"""Where a result comes from: the teacher(s) and their weights, the dataset, the recipe and its size.

A run on the built-in sample distils a teacher with random weights (there is no checkpoint to fetch), which is a
smoke test of the plumbing, not a model. :class:`Provenance` carries that fact from the teacher stores to every
later artifact, so no figure, grid or deploy folder reads as a real result::

    pack      Provenance.from_store_attrs({name: store.attrs}, dataset)  -> shards.json "provenance", report.json
    train     student_provenance(shards, out_dir)                        -> student checkpoints' meta "provenance"
    evaluate  Provenance.from_dict(meta["provenance"])                   -> report.json, grid title
    export    the quantize report's student meta                         -> picosam_int8.json, deploy README banner

A teacher's ``weights`` is ``random weights``, the sha256 of its checkpoint, ``ground-truth masks`` (the GT-mask
stand-in teacher of tests and benchmarks) or ``not recorded``. Everything read back (checkpoint meta, ONNX
metadata, shards.json) is untrusted: fields of the wrong type read as not recorded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from picosam_pipeline.recipes import AUTO
from picosam_pipeline.untrusted import json_file_or_none, safe_text
from picosam_pipeline.written_paths import read_marker

RANDOM_WEIGHTS = "random weights"
GROUND_TRUTH = "ground-truth masks"
NOT_RECORDED = "not recorded"
SHARDS_FILE = "shards.json"
MAX_SHARDS_FILE_BYTES = 64 << 20  # train.shards.MAX_INDEX_BYTES: the bound the loader reads shards.json within
SMOKE_TEST = "SMOKE TEST: not for deployment"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SAM2 = re.compile(r"sam(2(?:\.1)?)_hiera_(tiny|small|base_plus|large)")


@dataclass(frozen=True)
class TeacherFacts:
    """One teacher pass: its name in the pack (``sam2``), its model (``sam2.1_hiera_tiny``) and its weights."""

    name: str
    model: str
    weights: str  # RANDOM_WEIGHTS | a checkpoint sha256 | GROUND_TRUTH | NOT_RECORDED

    @property
    def random(self) -> bool:
        return self.weights == RANDOM_WEIGHTS

    def label(self) -> str:
        """``SAM2.1-tiny (RANDOM WEIGHTS, smoke test)``, ``SAM3 (checkpoint 3f2a9c1d)``, ``gt-mask (ground-truth
        masks)``."""
        if self.random:
            weights = "RANDOM WEIGHTS, smoke test"
        elif _SHA256.fullmatch(self.weights):
            weights = f"checkpoint {self.weights[:8]}"
        else:
            weights = self.weights
        return f"{model_label(self.model)} ({weights})"


def model_label(model: str) -> str:
    """A teacher model's short name: ``sam2.1_hiera_base_plus`` -> ``SAM2.1-base+``, ``sam3`` -> ``SAM3``."""
    found = _SAM2.fullmatch(model)
    if found:
        return f"SAM{found[1]}-{found[2].replace('base_plus', 'base+')}"
    return "SAM3" if model == "sam3" else model


def store_teacher(name: str, attrs: Mapping[str, Any]) -> TeacherFacts:
    """The facts of teacher pass ``name`` from its logit store's attributes (``teacher_pass.store_attrs``, or the
    GT-mask store's ``teacher.model = gt-mask``)."""
    teacher = attrs.get("teacher") if isinstance(attrs.get("teacher"), Mapping) else {}
    model = _text(teacher.get("model")) or NOT_RECORDED
    if model == "gt-mask":
        weights = GROUND_TRUTH
    elif teacher.get("random_weights") is True:
        weights = RANDOM_WEIGHTS
    else:
        weights = _text(teacher.get("checkpoint_sha256")) or NOT_RECORDED
    return TeacherFacts(name, model, weights)


@dataclass(frozen=True)
class Provenance:
    """The teacher pass(es), the dataset, the recipe and its size (``sample`` / ``full``) a result comes from;
    None (or no teacher) where it was not recorded."""

    teachers: tuple[TeacherFacts, ...] = ()
    dataset: str | None = None
    recipe: str | None = None
    size: str | None = None

    @property
    def smoke_test(self) -> bool:
        """Any teacher ran with random weights: the student learned noise, whatever its figures say."""
        return any(t.random for t in self.teachers)

    @classmethod
    def from_store_attrs(cls, stores: Mapping[str, Mapping[str, Any]], dataset: str | None = None) -> Provenance:
        """From the attributes of each teacher pass's store (``{name: store.attrs}``, in pack order)."""
        return cls(tuple(store_teacher(name, attrs) for name, attrs in stores.items()), dataset)

    @classmethod
    def from_shards(cls, split_dir: str | Path) -> Provenance:
        """From a split's ``shards.json``: its ``provenance`` (written by pack), else the teachers' models alone."""
        raw = json_file_or_none(Path(split_dir) / SHARDS_FILE, MAX_SHARDS_FILE_BYTES)
        if not isinstance(raw, dict):
            return cls()
        if isinstance(raw.get("provenance"), dict):
            return cls.from_dict(raw["provenance"])
        listed = raw.get("teachers") if isinstance(raw.get("teachers"), list) else []
        teachers = [t for t in listed if isinstance(t, dict)]
        return cls(tuple(TeacherFacts(_text(t.get("name")), _text(t.get("model")), NOT_RECORDED) for t in teachers))

    @classmethod
    def from_dict(cls, raw: Any) -> Provenance:
        """Read :meth:`as_dict`'s output back (untrusted: anything malformed reads as not recorded)."""
        if not isinstance(raw, Mapping):
            return cls()
        listed = raw.get("teachers") if isinstance(raw.get("teachers"), list) else []
        teachers = tuple(
            TeacherFacts(_text(t.get("name")), _text(t.get("model")), _text(t.get("weights")) or NOT_RECORDED)
            for t in listed
            if isinstance(t, Mapping)
        )
        return cls(teachers, *(_text(raw.get(k)) or None for k in ("dataset", "recipe", "size")))

    def with_recipe(self, recipe: str | None, size: str | None) -> Provenance:
        """This provenance with the recipe's name and size (``auto`` resolved as ``recipes.py`` does)."""
        if size == AUTO and self.dataset is not None:
            size = "sample" if self.dataset == "sample" else "full"
        return replace(self, recipe=recipe, size=size)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the fields, ``smoke_test`` and the one-line ``summary`` (:meth:`title`)."""
        return {
            "teachers": [{"name": t.name, "model": t.model, "weights": t.weights} for t in self.teachers],
            "dataset": self.dataset,
            "recipe": self.recipe,
            "size": self.size,
            "smoke_test": self.smoke_test,
            "summary": self.title(),
        }

    def title(self) -> str:
        """One line for grid titles, plots and notes: ``SAM2.1-tiny (RANDOM WEIGHTS, smoke test) · sample ·
        picosam3/sample``."""
        if not self.teachers:
            return "provenance not recorded (teacher, dataset and recipe unknown)"
        teachers = " + ".join(t.label() for t in self.teachers)
        recipe = f"{self.recipe or 'recipe ?'}/{self.size or 'size ?'}"
        return f"{teachers} · {self.dataset or 'dataset ?'} · {recipe}"

    def line(self) -> str:
        """:meth:`title`, after the smoke-test warning when a teacher had random weights: above a printed table, a
        grid, a page of plots."""
        return f"{SMOKE_TEST}: {self.title()}" if self.smoke_test else self.title()

    def banner(self) -> str:
        """A README's first words: the smoke-test warning when a teacher had random weights, else the provenance."""
        if not self.smoke_test:
            return f"Provenance: {self.title()}."
        names = ", ".join(model_label(t.model) for t in self.teachers if t.random)
        return (
            f"**{SMOKE_TEST}.** The teacher ({names}) ran with random weights, so its logits are noise and this "
            f"network learned nothing a camera could use: it only shows that the pipeline runs end to end. "
            f"Provenance: {self.title()}."
        )


def student_provenance(shards: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """What a student checkpoint records (:meth:`Provenance.as_dict`): the teachers and dataset of the pack it was
    trained on (``<shards>/train/shards.json``) and the recipe of the train stage's marker in ``out_dir`` (its
    ``config.resolved.json``, written before training starts; none outside the stage)."""
    recipe = (read_marker(Path(out_dir)) or {}).get("recipe")
    recipe = recipe if isinstance(recipe, dict) else {}
    found = Provenance.from_shards(Path(shards) / "train")
    return found.with_recipe(_text(recipe.get("name")) or None, _text(recipe.get("size")) or None).as_dict()


def dataset_of_annotations(annotations: str | Path) -> str | None:
    """The dataset name of an annotations file in the layout of ``datasets.py``
    (``<dataset.dir>/<name>/annotations/<file>.json``); None for a file outside that layout."""
    path = Path(annotations)
    if path.parent.name != "annotations":
        return None
    return path.parent.parent.name or None


def _text(value: Any) -> str:
    """An untrusted string field, printable and bounded; "" for anything else."""
    return safe_text(value, 120) if isinstance(value, str) else ""
