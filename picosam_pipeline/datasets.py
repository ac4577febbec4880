"""Datasets by name: the one switch (``dataset.name`` in ``params.yaml``) that chooses what the pipeline runs on.

A dataset is a folder ``<dataset.dir>/<name>`` (default ``data/datasets/<name>``) with its annotations and image
folders. ``dvc.yaml`` makes that folder a dependency of ``prepare``, ``teacher-logits@*`` and ``pack``
(``${dataset.dir}/${dataset.name}``), so switching datasets, or changing one pixel of one image, is seen by
exactly the stages that read it. ``prepare.splits: auto`` takes the splits from the dataset's layout:

============  =========================================================  ==========================================
name          split ``train`` / ``val``: annotations, images               where it comes from
============  =========================================================  ==========================================
``sample``    ``annotations/instances_{train,val}.json``, ``{train,val}/``  the ``sample`` stage (built-in, offline)
``coco2017``  ``annotations/instances_{train,val}2017.json``,               ``picosam-pipeline fetch coco2017``
              ``{train,val}2017/``
``lvis_v1``   ``annotations/lvis_v1_{train,val}.json``, ``{train,val}2017/``  ``picosam-pipeline fetch lvis_v1`` (the
              (COCO 2017 images; val draws from both folders)                COCO images hard-linked, not copied)
any other     the standard layout, as ``sample``                            your own files, put there by hand
============  =========================================================  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from picosam_pipeline.errors import PipelineError


@dataclass(frozen=True)
class Layout:
    """Where a dataset keeps each split: ``{split: (annotations file, images folder)}``, relative to its folder."""

    splits: dict[str, tuple[str, str]]
    fetch: str | None = None  # the `picosam-pipeline fetch` name that puts it in place; None: made or put by hand


STANDARD = Layout(
    {"train": ("annotations/instances_train.json", "train"), "val": ("annotations/instances_val.json", "val")}
)
LAYOUTS: dict[str, Layout] = {
    "sample": STANDARD,
    "coco2017": Layout(
        {
            "train": ("annotations/instances_train2017.json", "train2017"),
            "val": ("annotations/instances_val2017.json", "val2017"),
        },
        fetch="coco2017",
    ),
    "lvis_v1": Layout(
        {"train": ("annotations/lvis_v1_train.json", "train2017"), "val": ("annotations/lvis_v1_val.json", "val2017")},
        fetch="lvis_v1",
    ),
}


def layout(name: str) -> Layout:
    """The layout of dataset ``name`` (a preset, else the standard layout)."""
    return LAYOUTS.get(name, STANDARD)


def dataset_splits(name: str, folder: str | Path) -> list[tuple[str, str, str]]:
    """``[(split, annotations path, images path)]`` of dataset ``name`` kept in ``folder``."""
    folder = Path(folder)
    return [(split, str(folder / ann), str(folder / images)) for split, (ann, images) in layout(name).splits.items()]


def missing_dataset_message(name: str, folder: str | Path, missing: str | Path) -> str:
    """One paragraph for a dataset file or folder that is not there: what to run to put it in place."""
    how = {"sample": "run the sample stage (`picosam-pipeline run-stage sample`, or `dvc repro`)"}.get(name)
    if how is None and layout(name).fetch:
        how = f"run `picosam-pipeline fetch {layout(name).fetch}`"
    if how is None:
        ann, images = STANDARD.splits["train"]
        how = (
            f"put your dataset there in the standard layout ({ann}, {images}/, and the same for val), or set "
            "dataset.name to sample, coco2017 or lvis_v1"
        )
    return (
        f"dataset {name!r}: {missing} is missing from {folder}; {how}, or `dvc pull` it from the team's remote "
        "if a teammate tracked it (see the README, Real COCO)"
    )


def check_dataset(name: str, folder: str | Path, splits: list[tuple[str, str, str]]) -> None:
    """Raise :class:`PipelineError` naming the fetch (or stage) for the first missing annotations file or images
    folder."""
    for _, annotations_file, images in splits:
        for path in (annotations_file, images):
            if not Path(path).exists():
                raise PipelineError(missing_dataset_message(name, folder, path))
