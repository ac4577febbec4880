"""The built-in sample: determinism, valid COCO for pycocotools, the planted bad inputs, the scene's edge cases."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from picosam_pipeline.config import Config, ConfigError, RuntimeConfig, SampleConfig, load_config
from picosam_pipeline.data import sample
from picosam_pipeline.data.images import BadImageError, load_image
from picosam_pipeline.errors import PipelineError


def _sha256_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _bad_rows(root: Path) -> list[dict[str, str]]:
    """The table rows of BAD_INPUTS.md as dicts keyed by the header."""
    lines = [line for line in (root / "BAD_INPUTS.md").read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    summary = sample.generate(SampleConfig(out_dir=str(out)))
    assert summary["images"] == {"train": 12, "val": 6}
    return out


@pytest.fixture(scope="module")
def cocos(root) -> dict[str, COCO]:
    return {split: COCO(str(root / "annotations" / f"instances_{split}.json")) for split in ("train", "val")}


@pytest.fixture(scope="module")
def bad(root) -> dict[str, dict[str, str]]:
    return {row["kind"]: row for row in _bad_rows(root)}


def _bad_ann_ids(bad) -> set[int]:
    return {int(r["annotation_id"]) for r in bad.values() if r["annotation_id"] != "-"}


def test_same_params_give_byte_identical_files(root, tmp_path):
    again = tmp_path / "again"
    sample.generate(SampleConfig(out_dir=str(again)))
    first = _sha256_tree(root)
    assert len(first) == 12 - 1 + 6 + 3  # images (one planted missing) + 2 JSON + BAD_INPUTS.md
    assert first == _sha256_tree(again)
    sample.generate(SampleConfig(out_dir=str(again)))  # regenerating in place replaces the earlier sample
    assert _sha256_tree(again) == first
    other = tmp_path / "other"
    sample.generate(SampleConfig(out_dir=str(other), seed=1))
    assert _sha256_tree(other) != first


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="notes.txt"):
        sample.generate(SampleConfig(out_dir=str(tmp_path)))
    assert (tmp_path / "notes.txt").exists()


def test_layout_names_and_sizes(root, cocos):
    for split, coco in cocos.items():
        ids = sorted(coco.getImgIds())
        assert len(ids) == (12 if split == "train" else 6)
        for img in coco.loadImgs(ids):
            assert img["file_name"][:12] == f"{img['id']:012d}" and img["file_name"][12:] in (".jpg", ".png")
            assert 200 <= img["width"] <= 360 and 200 <= img["height"] <= 360
        assert any(img["height"] > img["width"] for img in coco.loadImgs(ids))  # some portrait
        cat_ids = sorted(coco.getCatIds())
        assert len(cat_ids) >= 3 and cat_ids != list(range(1, len(cat_ids) + 1))  # COCO-style gaps


def test_every_valid_annotation_decodes_to_its_bbox_and_area(cocos, bad):
    skip = _bad_ann_ids(bad)
    for _split, coco in cocos.items():
        anns = [a for a in coco.dataset["annotations"] if a["id"] not in skip]
        assert len(anns) >= 3 * len(coco.getImgIds())  # 3-8 shapes per image
        for ann in anns:
            img = coco.imgs[ann["image_id"]]
            m = coco.annToMask(ann)
            assert m.shape == (img["height"], img["width"])
            assert m.sum() == ann["area"] > 0
            rle = mask_utils.encode(np.asfortranarray(m))
            np.testing.assert_allclose(mask_utils.toBbox(rle), ann["bbox"])


def test_visible_masks_do_not_overlap(cocos, bad):
    """Each annotation is the visible part: no pixel belongs to two annotations of one image."""
    skip = _bad_ann_ids(bad)
    for coco in cocos.values():
        for img_id in coco.getImgIds():
            masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id)) if a["id"] not in skip]
            assert np.stack(masks).sum(0).max() <= 1


def test_all_three_segmentation_forms_are_used(cocos):
    forms = set()
    for coco in cocos.values():
        for ann in coco.dataset["annotations"]:
            seg = ann["segmentation"]
            forms.add("polygon" if isinstance(seg, list) else "rle-" + type(seg["counts"]).__name__)
    assert forms == {"polygon", "rle-str", "rle-list"}


def test_occlusion_really_hides_parts_of_shapes():
    """Drawn scenes (same code path as the files): some shape inside the image is partly covered and is RLE."""
    occluded = 0
    for i in range(6):
        _, drawn = sample._compose(np.random.default_rng([0, 0, i]), i, portrait=False, planted=[])
        for k, (shape, visible) in enumerate(drawn):
            h, w = visible.shape
            inside = all(
                p[:, 0].min() >= 0 and p[:, 0].max() <= w and p[:, 1].min() >= 0 and p[:, 1].max() <= h
                for p in shape.polygons
            )
            full = sample._rasterize(shape.polygons, h, w)
            if inside and not shape.iscrowd and visible.sum() < full.sum():
                occluded += 1
                assert isinstance(sample._annotation(shape, visible, 1, k)["segmentation"], dict)
    assert occluded >= 3


def test_border_tiny_and_crowd_instances(cocos, bad):
    skip = _bad_ann_ids(bad)
    for coco in cocos.values():
        anns = [a for a in coco.dataset["annotations"] if a["id"] not in skip]
        touching = [
            a
            for a in anns
            if a["bbox"][0] == 0
            or a["bbox"][1] == 0
            or a["bbox"][0] + a["bbox"][2] == coco.imgs[a["image_id"]]["width"]
            or a["bbox"][1] + a["bbox"][3] == coco.imgs[a["image_id"]]["height"]
        ]
        assert len(touching) >= len(coco.getImgIds())  # at least one per image on average
        tiny = [a for a in anns if a["area"] < 30]
        assert len(tiny) == 1 and tiny[0]["iscrowd"] == 0 and isinstance(tiny[0]["segmentation"], list)
        crowd = [a for a in anns if a["iscrowd"]]
        assert len(crowd) == 1 and isinstance(crowd[0]["segmentation"]["counts"], list)
        assert coco.annToMask(crowd[0]).sum() == crowd[0]["area"]


def test_planted_bad_inputs_are_exactly_as_listed(root, cocos, bad):
    assert set(bad) == {kind for kind, _ in sample.BAD_FILES.values()} | set(sample.BAD_ANNOTATIONS)
    train = cocos["train"]

    def path_of(kind: str) -> Path:
        return root / bad[kind]["file"]

    def json_size(kind: str) -> tuple[int, int]:
        img = train.imgs[int(bad[kind]["image_id"])]
        return img["width"], img["height"]

    def ann(kind: str) -> dict:
        return train.anns[int(bad[kind]["annotation_id"])]

    for kind in ("missing_file", "truncated_jpeg", "corrupt_file"):
        with pytest.raises(BadImageError) as info:
            load_image(path_of(kind), json_size(kind))
        assert (
            info.value.kind
            == {"missing_file": "missing", "truncated_jpeg": "truncated", "corrupt_file": "unreadable"}[kind]
        )
    assert not path_of("missing_file").exists() and int(bad["missing_file"]["image_id"]) in train.imgs

    for kind, mode, conversion in [
        ("grayscale_jpeg", "L", "grayscale->rgb"),
        ("cmyk_jpeg", "CMYK", "cmyk->rgb"),
        ("palette_png", "P", "palette->rgb"),
        ("exif_rotated_jpeg", "RGB", "exif-rotated"),
    ]:
        with Image.open(path_of(kind)) as im:
            assert im.mode == mode
            stored_size = im.size
            orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
        out = load_image(path_of(kind), json_size(kind))
        assert out.conversions == (conversion,) and out.size == json_size(kind)
        if kind == "palette_png":
            assert path_of(kind).suffix == ".png"
        if kind == "exif_rotated_jpeg":
            assert orientation == 6 and stored_size == json_size(kind)[::-1]

    assert ann("degenerate_bbox")["bbox"][2] == 0
    assert [len(p) for p in ann("short_polygon")["segmentation"]] == [4]
    outside = ann("bbox_outside_image")
    width = json_size("bbox_outside_image")[0]
    assert outside["bbox"][0] + outside["bbox"][2] > width
    assert 0 < train.annToMask(outside).sum() == outside["area"]
    orphan = ann("orphan_annotation")
    assert orphan["image_id"] == int(bad["orphan_annotation"]["image_id"]) not in train.imgs

    # Nothing else is off in train: every other image decodes as plain RGB at its JSON size.
    bad_images = {int(r["image_id"]) for r in bad.values() if r["annotation_id"] == "-"}
    for img in train.loadImgs([i for i in train.getImgIds() if i not in bad_images]):
        assert load_image(root / "train" / img["file_name"], (img["width"], img["height"])).conversions == ()


def test_val_is_clean(root, cocos, bad):
    assert all(r["file"] == "-" or r["file"].startswith("train/") for r in bad.values())
    val = cocos["val"]
    for img in val.loadImgs(val.getImgIds()):
        assert load_image(root / "val" / img["file_name"], (img["width"], img["height"])).conversions == ()
    for ann in val.dataset["annotations"]:
        assert ann["image_id"] in val.imgs and ann["bbox"][2] > 0 and ann["bbox"][3] > 0
        assert all(len(p) >= 6 for p in ann["segmentation"]) if isinstance(ann["segmentation"], list) else True


def _boundary_gradient(pixels: np.ndarray, masks: list[np.ndarray]) -> float:
    """Mean image gradient magnitude on the masks' outlines (high when masks line up with the drawn shapes)."""
    gray = pixels.astype(np.float32).mean(-1)
    gy, gx = np.gradient(gray)
    edge = np.zeros(gray.shape, dtype=bool)
    for m in masks:
        m = m.astype(bool)
        inner = m.copy()
        inner[1:-1, 1:-1] &= m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
        edge |= m & ~inner
    return float(np.hypot(gx, gy)[edge].mean())


def test_exif_rotated_image_lines_up_with_its_annotations(root, cocos, bad):
    train = cocos["train"]
    img = train.imgs[int(bad["exif_rotated_jpeg"]["image_id"])]
    pixels = load_image(root / "train" / img["file_name"], (img["width"], img["height"])).pixels
    masks = [train.annToMask(a) for a in train.loadAnns(train.getAnnIds(imgIds=img["id"]))]
    assert _boundary_gradient(pixels, masks) > 2 * _boundary_gradient(pixels[::-1, ::-1], masks)


def test_config_checks_enough_train_images_for_the_planted_inputs():
    with pytest.raises(ConfigError, match="sample.train_images"):
        load_config(None, ["sample.train_images=5"])
    assert load_config(None, ["sample.train_images=5", "sample.plant_bad_inputs=false"]).sample.train_images == 5


def test_stage_writes_dataset_config_and_metrics(tmp_path):
    from picosam_pipeline.device import resolve_runtime
    from picosam_pipeline.stages.sample import run

    cfg = Config(
        runtime=RuntimeConfig(device="cpu", metrics_dir=str(tmp_path / "metrics")),
        sample=SampleConfig(out_dir=str(tmp_path / "s"), train_images=3, val_images=2, plant_bad_inputs=False),
    )
    summary = run(cfg, resolve_runtime(cfg.runtime))
    assert summary == {"images": {"train": 3, "val": 2}, "annotations": summary["annotations"], "bad_inputs": 0}
    assert json.loads((tmp_path / "metrics" / "sample.json").read_text()) == {
        "images": sum(summary["images"].values()),
        "annotations": sum(summary["annotations"].values()),
        "bad_inputs": summary["bad_inputs"],
    }
    assert json.loads((tmp_path / "s" / "config.resolved.json").read_text())["sample"]["train_images"] == 3
    train = json.loads((tmp_path / "s" / "annotations" / "instances_train.json").read_text())
    assert summary["annotations"]["train"] == len(train["annotations"]) > 0
    assert _bad_rows(tmp_path / "s")[0]["kind"].startswith("(none planted")
