"""The one dataset switch (``dataset.name``): presets, their layouts, the message for a missing dataset, and COCO 2017
and LVIS v1 run end to end (prepare -> stand-in teacher -> pack -> train -> evaluate) from the shared COCO sample.

The LVIS v1 files are built here from ``../shared/data/coco-sample``: the same images and masks in LVIS v1's format
(images named by ``coco_url``, no ``iscrowd``, categories with ``synset`` / ``frequency``), and the images shared
with COCO by hard links (``fetch.link_images``), as ``picosam-pipeline fetch lvis_v1`` lays them out.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from picosam_pipeline.config import ConfigError, TrainConfig, load_config
from picosam_pipeline.data import fetch
from picosam_pipeline.data.index import read_index_metadata
from picosam_pipeline.device import resolve_runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.stages import evaluate, pack, prepare, train
from picosam_pipeline.teacher.gt_mask import write_mask_teacher_store
from tests.helpers.paths import REPO, shared_data_or_skip


def test_the_switch_picks_each_layout_and_names_the_fetch_for_a_missing_dataset(tmp_path):
    cfg = load_config(REPO / "params.yaml")
    assert cfg.dataset.folder == "data/datasets/sample" == cfg.sample.out_dir
    assert [s.images for s in cfg.prepare.splits] == ["data/datasets/sample/train", "data/datasets/sample/val"]
    coco = load_config(REPO / "params.yaml", ["dataset.name=coco2017"]).prepare.splits
    assert [(s.name, s.annotations, s.images) for s in coco] == [
        ("train", "data/datasets/coco2017/annotations/instances_train2017.json", "data/datasets/coco2017/train2017"),
        ("val", "data/datasets/coco2017/annotations/instances_val2017.json", "data/datasets/coco2017/val2017"),
    ]
    lvis = load_config(REPO / "params.yaml", ["dataset.name=lvis_v1"]).prepare.splits
    assert [s.annotations for s in lvis] == [
        "data/datasets/lvis_v1/annotations/lvis_v1_train.json",
        "data/datasets/lvis_v1/annotations/lvis_v1_val.json",
    ]
    mine = load_config(REPO / "params.yaml", ["dataset.name=mine"]).prepare.splits  # any folder: the standard layout
    assert [s.annotations for s in mine][0] == "data/datasets/mine/annotations/instances_train.json"
    with pytest.raises(ConfigError, match="sample.out_dir: with dataset.name sample"):
        load_config(REPO / "params.yaml", ["sample.out_dir=elsewhere"])
    with pytest.raises(ConfigError, match="dataset.name: expected a folder name"):
        load_config(REPO / "params.yaml", ["dataset.name=../up"])

    for name, how in (
        ("coco2017", "picosam-pipeline fetch coco2017"),
        ("lvis_v1", "picosam-pipeline fetch lvis_v1"),
        ("sample", "run-stage sample"),
        ("mine", "standard layout"),
    ):
        cfg = load_config(
            REPO / "params.yaml",
            [f"dataset.name={name}", f"dataset.dir={tmp_path}", f"sample.out_dir={tmp_path / 'sample'}"],
        )
        with pytest.raises(PipelineError) as err:
            prepare.run(cfg)
        assert how in str(err.value) and "dvc pull" in str(err.value) and f"dataset {name!r}" in str(err.value)


def lvis_v1_from_coco(coco_json: Path, out: Path) -> int:
    """Write ``coco_json`` as an LVIS v1 file (what LVIS v1's own files look like); returns its annotation count."""
    coco = json.loads(coco_json.read_text())
    images = [
        {
            "id": i["id"],
            "width": i["width"],
            "height": i["height"],
            "coco_url": i["coco_url"],
            "not_exhaustive_category_ids": [],
            "neg_category_ids": [],
        }
        for i in coco["images"]
    ]
    annotations = [
        {k: a[k] for k in ("id", "image_id", "category_id", "segmentation", "area", "bbox")}
        for a in coco["annotations"]
        if not a.get("iscrowd")
    ]
    categories = [
        {
            "id": c["id"],
            "name": c["name"],
            "synset": f"{c['name'].replace(' ', '_')}.n.01",
            "frequency": "f",
            "image_count": 1,
            "instance_count": 1,
        }
        for c in coco["categories"]
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return len(annotations)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> Path:
    """``<data>/datasets/coco2017`` (the shared COCO sample, copied) and ``<data>/datasets/lvis_v1`` (its LVIS v1
    form, the images hard-linked by fetch's own code); returns the ``datasets`` folder (``dataset.dir``)."""
    source = shared_data_or_skip("coco-sample")
    data = tmp_path_factory.mktemp("data")
    shutil.copytree(source, data / "datasets/coco2017", ignore=shutil.ignore_patterns("picosam2_reference_preds"))
    for split in ("train", "val"):
        lvis_v1_from_coco(
            data / f"datasets/coco2017/annotations/instances_{split}2017.json",
            data / f"datasets/lvis_v1/annotations/lvis_v1_{split}.json",
        )
    assert fetch.link_images(data, "lvis_v1") == "lvis_v1: 65 COCO images linked into " + str(data / "datasets/lvis_v1")
    return data / "datasets"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["coco2017", "lvis_v1"])
def test_a_real_dataset_runs_end_to_end_by_the_switch_alone(datasets, tmp_path, name):
    work = tmp_path / "data"
    cfg = load_config(
        REPO / "params.yaml",
        [
            f"dataset.name={name}",
            f"dataset.dir={datasets}",
            f"prepare.out_dir={work / 'prepared'}",
            f"pack.index={work / 'prepared/index.parquet'}",
            f"pack.stores_dir={work / 'stores'}",
            "pack.teachers=[gt]",
            f"pack.out_dir={work / 'shards'}",
            "pack.samples_per_shard=64",
            f"runtime.metrics_dir={tmp_path / 'metrics'}",
            "runtime.device=cpu",
        ],
    )
    runtime = resolve_runtime(cfg.runtime)
    prepare.run(cfg, runtime)
    meta = read_index_metadata(cfg.pack.index)["splits"]
    assert meta["val"]["format"] == ("lvis" if name == "lvis_v1" else "coco")
    assert meta["train"]["kept"] > 300 and meta["val"]["kept"] > 180  # crowd annotations: none in LVIS, dropped in COCO
    write_mask_teacher_store(cfg.pack.index, work / "stores" / "gt.zarr", splits=cfg.pack.splits)
    pack.run(cfg, runtime)
    t = TrainConfig(
        shards=str(work / "shards"),
        student="picosam3",
        steps=2,
        batch_size=8,
        warmup_steps=1,  # the recipe's
        checkpoint_every=2,
        eval_every=2,
        log_every=1,
        out_dir=str(work / "train"),
    )
    e = dataclasses.replace(
        cfg.evaluate,
        shards=str(work / "shards/val"),
        checkpoint=str(work / "train/student.pt"),
        index=cfg.pack.index,
        grid_samples=0,
        out_dir=str(work / "evaluate"),
    )
    cfg = dataclasses.replace(cfg, train=t, evaluate=e)
    train.run(cfg, runtime)
    evaluate.run(cfg, runtime)
    report = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())
    assert report["teacher"]["crop_miou"] > 0.9 and 0.0 <= report["crop_miou"] <= 1.0
