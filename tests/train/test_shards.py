"""The pack stage: bit-exact logits, pixel-aligned crops, shard index, shuffled reproducible order, size."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from picosam_pipeline.config import Config, SplitSource
from picosam_pipeline.data.images import load_rgb
from picosam_pipeline.data.index import decode_mask, read_index
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.stages import prepare
from picosam_pipeline.teacher.codec import CODECS, encode_logits, get_codec
from picosam_pipeline.teacher.gt_mask import write_mask_teacher_store
from picosam_pipeline.teacher.store import open_store
from picosam_pipeline.train.shards import (
    _POSITION,
    INDEX_FILE,
    _finish_shard,
    _spill_body,
    crop_window,
    decode_logits_png,
    encode_jpeg,
    encode_logits_png,
    read_shard_index,
    resample_mask_window,
    resample_window,
)
from tests.helpers.paths import shared_data_or_skip
from tests.helpers.pipeline_inputs import build_inputs, elsewhere, read_tar_samples, run_pack, split_samples


@pytest.fixture(scope="module")
def inputs(sample_inputs, tmp_path_factory) -> Config:
    """The session's sample inputs (read-only), writing metrics into a folder of this module's."""
    return elsewhere(sample_inputs, tmp_path_factory.mktemp("shards_tests"))


@pytest.fixture(scope="module")
def packed(inputs, sample_shards) -> tuple[Config, Path, dict]:
    """The session's shards of the sample inputs (packed as their pack section says) with the stage's report."""
    return inputs, sample_shards, json.loads((sample_shards / "report.json").read_text())


# --------------------------------------------------------------------------------------------------
# content


def test_round_trip_logits_bit_exact_and_crops_match_picosam(packed):
    cfg, out, _ = packed
    store = open_store(cfg.pack.store_paths()["gt"])
    meta = store.read_meta()
    row_of = {int(a): i for i, a in enumerate(meta["ann_id"])}
    index = {r["ann_id"]: r for r in read_index(cfg.pack.index).to_pylist()}
    seen = 0
    for split in ("train", "val"):
        for s in split_samples(out / split):
            record = json.loads(s["json"])
            row, ann = row_of[record["ann_id"]], index[record["ann_id"]]
            logits = np.asarray(Image.open(io.BytesIO(s["logits.gt.png"])))
            assert logits.dtype == np.uint8 and np.array_equal(logits, store.read_raw(row))
            assert record["split"] == split == ann["split"] and record["image_id"] == ann["image_id"]
            assert record["category_id"] == ann["category_id"] and record["area"] == ann["area"]
            assert record["crop_box"] == meta["crop_box"][row].tolist() == ann["roi_box"]
            assert record["stored_box"] == meta["stored_box"][row].tolist()
            assert record["confidence"] == {"gt": float(meta["confidence"][row])}
            assert (
                record["logits"]["gt"]["codec"] == "sigmoid_uint8"
                and "log(p / (1 - p))" in record["logits"]["gt"]["decode"]
            )
            # PicoSAM's own crop recipe, computed independently: crop, then resize.
            box = tuple(ann["roi_box"])
            full = Image.open(ann["image_path"]).convert("RGB")
            want_image = full.crop(box).resize((96, 96), Image.Resampling.BILINEAR)
            mask = Image.fromarray(decode_mask(ann["rle_counts"], ann["height"], ann["width"]))
            want_mask = np.asarray(mask.crop(box).resize((96, 96), Image.Resampling.NEAREST))
            got_mask = np.asarray(Image.open(io.BytesIO(s["mask.png"]))).astype(np.uint8)
            assert np.array_equal(got_mask, want_mask)
            jpeg = io.BytesIO()  # JPEG encoding is deterministic: same crop, same settings -> same bytes
            want_image.save(jpeg, "JPEG", quality=cfg.pack.jpeg_quality, optimize=True)
            assert s["jpg"] == jpeg.getvalue()
            seen += 1
    assert seen == store.n_instances == len(index)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_logits_png_round_trips_every_codec_bit_exactly(codec):
    logits = np.random.default_rng(0).normal(0, 8, (3, 96, 96)).astype(np.float32)
    logits[0, :4, :4] = [[1e-9, -1e-9, 0.0, 31.9]] * 4  # the codecs' edge cases: tiny, zero, saturated
    for values in encode_logits(logits, codec):
        back = decode_logits_png(encode_logits_png(values), 96, get_codec(codec))
        assert back.dtype == values.dtype and back.tobytes() == values.tobytes()


def _position_dataset(root: Path) -> SplitSource:
    """One lossless image whose red/green channels are x / y, with rectangles touching every border."""
    w, h = 220, 160
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.stack([xx, yy, np.zeros_like(xx)], axis=-1).astype(np.uint8)
    (root / "images").mkdir(parents=True)
    Image.fromarray(pixels).save(root / "images/ramp.png")
    boxes = [(0, 0, 40, 30), (150, 100, 70, 60), (80, 50, 50, 40), (5, 120, 30, 40)]  # x, y, w, h
    anns = [
        {
            "id": i + 1,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "area": float(bw * bh),
            "bbox": [x, y, bw, bh],
            "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]],
        }
        for i, (x, y, bw, bh) in enumerate(boxes)
    ]
    (root / "ramp.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "ramp.png", "width": w, "height": h}],
                "annotations": anns,
                "categories": [{"id": 1, "name": "box"}],
            }
        )
    )
    return SplitSource("val", str(root / "ramp.json"), str(root / "images"))


@pytest.mark.parametrize("context_margin", [0.0, 0.25])
def test_image_mask_and_logits_share_the_stored_frame(tmp_path, context_margin):
    cfg = build_inputs(tmp_path, context_margin=context_margin, splits=[_position_dataset(tmp_path)])
    run_pack(cfg, tmp_path / "shards")
    pixels = np.asarray(Image.open(tmp_path / "images/ramp.png")).astype(np.float64)
    h, w = pixels.shape[:2]
    for s in split_samples(tmp_path / "shards/val"):
        record = json.loads(s["json"])
        side = record["frame"]["stored_size"]
        assert side == (144 if context_margin else 96) and record["frame"]["crop_size"] == 96
        x1, y1, x2, y2 = record["stored_box"]
        u = (np.arange(side) + 0.5) / side
        # Pixel value i sits at coordinate i + 0.5; outside the image the border value repeats.
        want_x = np.clip(x1 + u * (x2 - x1) - 0.5, 0, w - 1)
        want_y = np.clip(y1 + u * (y2 - y1) - 0.5, 0, h - 1)
        image = np.asarray(Image.open(io.BytesIO(s["jpg"])), np.float64)
        for error in (image[:, :, 0] - want_x[None, :], image[:, :, 1] - want_y[:, None]):
            # Bilinear keeps a ramp exact; JPEG q90 adds ~0.6 of zero-mean noise. A shift of 0.2 px shows as bias.
            assert abs(error.mean()) < 0.15 and np.abs(error).mean() < 1.0
        # The mask crop and the teacher logits (GT mask -> crop_logits) cover the same pixels.
        mask = np.asarray(Image.open(io.BytesIO(s["mask.png"]))).astype(bool)
        logits = np.asarray(Image.open(io.BytesIO(s["logits.gt.png"])))
        assert (mask == (logits > 127)).mean() > 0.97
        bx, by, bw, bh = next(a for a in read_index(cfg.pack.index).to_pylist() if a["ann_id"] == record["ann_id"])[
            "bbox"
        ]
        inside = ((np.floor(x1 + u * (x2 - x1)) >= bx) & (np.floor(x1 + u * (x2 - x1)) < bx + bw))[None, :] & (
            (np.floor(y1 + u * (y2 - y1)) >= by) & (np.floor(y1 + u * (y2 - y1)) < by + bh)
        )[:, None]
        # Nearest sampling of the rectangle; beyond the image the mask repeats its edge (the rectangles touch it).
        interior = (want_x[None, :] > 0) & (want_x[None, :] < w - 1) & (want_y[:, None] > 0) & (want_y[:, None] < h - 1)
        assert (mask == inside)[interior].mean() > 0.99


# --------------------------------------------------------------------------------------------------
# shards, index, order, size


def test_shard_index_lists_every_shard_with_count_and_sha256(packed):
    cfg, out, metrics = packed
    for split in ("train", "val"):
        index = read_shard_index(out / split / INDEX_FILE)
        assert index.split == split and index.samples == read_index(cfg.pack.index, split=split).num_rows
        assert sorted(p.name for p in (out / split).glob("*.tar")) == [e.name for e in index.shards]
        for entry in index.shards:
            data = index.shard_path(entry).read_bytes()
            assert entry.bytes == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest()
            assert entry.samples == len(read_tar_samples(index.shard_path(entry)))
        assert [e.samples for e in index.shards[:-1]] == [8] * (len(index.shards) - 1)
        assert metrics["splits"][split]["samples"] == index.samples
    assert json.loads((out / "config.resolved.json").read_text())["pack"]["samples_per_shard"] == 8


def test_samples_are_shuffled_across_images_and_reproducible(packed, tmp_path):
    cfg, out, _ = packed
    order = [json.loads(s["json"])["ann_id"] for s in split_samples(out / "train")]
    index_order = read_index(cfg.pack.index, split="train")["ann_id"].to_pylist()
    assert sorted(order) == sorted(index_order) and order != index_order
    images = [a // 100 for a in order]  # the sample's annotation ids are image_id * 100 + k
    assert sum(a == b for a, b in zip(images, images[1:])) < len(images) // 3  # neighbours mostly differ in image

    run_pack(cfg, tmp_path / "again")
    run_pack(cfg, tmp_path / "seed1", seed=1)
    again, seed1 = read_shard_index(tmp_path / "again/train"), read_shard_index(tmp_path / "seed1/train")
    assert again.shards == read_shard_index(out / "train").shards  # byte-identical shards
    assert [json.loads(s["json"])["ann_id"] for s in split_samples(tmp_path / "seed1/train")] != order
    assert seed1.samples == again.samples


def test_bytes_per_sample_at_96px_on_the_built_in_sample(inputs, tmp_path):
    metrics = run_pack(inputs, tmp_path / "shards", samples_per_shard=4096)  # one shard per split, as in real packs
    for split in ("train", "val"):
        assert metrics["splits"][split]["bytes_per_sample"] < 15_000
        assert metrics["splits"][split]["member_bytes_per_sample"]["jpg"] > 1_000  # real image content, not blank


def test_bytes_per_sample_at_96px_on_real_coco_images(tmp_path):
    coco = shared_data_or_skip("coco-sample")
    split = SplitSource("val", str(coco / "annotations/instances_val2017.json"), str(coco / "val2017"))
    cfg = build_inputs(tmp_path, splits=[split])
    metrics = run_pack(cfg, tmp_path / "shards", samples_per_shard=4096)
    assert metrics["splits"]["val"]["samples"] == read_index(cfg.pack.index).num_rows > 180  # 190 minus small ROIs
    assert metrics["splits"]["val"]["bytes_per_sample"] < 15_000


def test_a_store_without_the_split_or_with_other_crops_is_refused(inputs, tmp_path):
    write_mask_teacher_store(inputs.pack.index, tmp_path / "partial" / "gt.zarr", splits=["train"])
    with pytest.raises(PipelineError, match=r"no teacher logits for \d+ of the \d+ instances of split 'val'.*teacher"):
        run_pack(
            dataclasses.replace(inputs, pack=dataclasses.replace(inputs.pack, stores_dir=str(tmp_path / "partial"))),
            tmp_path / "a",
        )
    # The index rebuilt with another ROI padding after the teacher ran: the store's crop boxes are stale.
    other = dataclasses.replace(inputs.prepare, roi_padding=0.3, out_dir=str(tmp_path / "reprepared"))
    prepare.run(dataclasses.replace(inputs, prepare=other), None)
    with pytest.raises(PipelineError, match="crop boxes disagree with the index's roi_box.*rerun the teacher stage"):
        run_pack(
            dataclasses.replace(
                inputs, pack=dataclasses.replace(inputs.pack, index=str(tmp_path / "reprepared/index.parquet"))
            ),
            tmp_path / "b",
        )


def test_pack_refuses_to_replace_a_folder_it_did_not_write(inputs, tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match=r"notes.txt.*which stage pack did not write"):
        run_pack(inputs, out)
    assert (out / "notes.txt").read_text() == "mine"


def test_store_rows_joins_on_image_and_annotation_ids():
    """The store row of each index row, whatever the store's order; an ann_id the store holds for two images is
    told apart by the image; a missing pair and a pair stored twice are refused."""
    import pyarrow as pa

    from picosam_pipeline.train.packing import store_rows

    meta = {"image_id": np.array([7, 3, 3, 9, 5]), "ann_id": np.array([70, 31, 30, 90, 30])}
    rows = pa.table({"image_id": [3, 3, 5, 7, 9], "ann_id": [30, 31, 30, 70, 90]})
    assert store_rows(meta, rows, "val", Path("s.zarr")).tolist() == [2, 1, 4, 0, 3]
    with pytest.raises(PipelineError, match=r"no teacher logits for 1 of the 2 instances .*ann_id \[30\]"):
        store_rows(meta, pa.table({"image_id": [3, 4], "ann_id": [31, 30]}), "val", Path("s.zarr"))
    twice = {"image_id": np.array([3, 3]), "ann_id": np.array([30, 30])}
    with pytest.raises(PipelineError, match="pairs twice"):
        store_rows(twice, rows, "val", Path("s.zarr"))


# --------------------------------------------------------------------------------------------------
# pack's fast paths: the same bytes as the plain array code


def test_crop_windows_cut_in_pil_and_masks_decoded_by_window_equal_the_array_path(tmp_path):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (61, 83, 3), dtype=np.uint8)
    path = tmp_path / "comment.jpg"
    # A JPEG comment (as in many COCO files) must not reach the crops: the array path never carried it, PIL would.
    Image.fromarray(pixels).save(path, "JPEG", quality=95, comment=b"a comment", icc_profile=b"not a profile" * 4)
    image, _ = load_rgb(path, expected_size=(83, 61))
    array = np.asarray(image)
    yy, xx = np.mgrid[:61, :83]
    mask = ((yy - 30) ** 2 + (xx - 50) ** 2 < 400).astype(np.uint8)
    rle = mask_utils.encode(np.asfortranarray(mask))["counts"].decode("ascii")
    boxes = [
        (10.0, 5.0, 40.0, 35.0),
        (0.0, 0.0, 83.0, 61.0),
        (12.3, 7.7, 70.2, 44.9),  # inside
        (-8.5, -3.0, 30.0, 35.5),
        (60.0, 40.0, 95.5, 75.0),
        (-10.0, -10.0, 93.0, 71.0),
    ]  # leaving the image
    for box in boxes:
        for side in (16, 96):
            want = resample_window(array, box, side, Image.Resampling.BILINEAR)
            got = crop_window(image, box, side, Image.Resampling.BILINEAR)
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=str(box))
            assert encode_jpeg(got, 90) == encode_jpeg(want, 90)
            np.testing.assert_array_equal(
                resample_mask_window(rle, 61, 83, box, side),
                resample_window(decode_mask(rle, 61, 83), box, side, Image.Resampling.NEAREST),
            )


def test_a_spill_cut_short_or_missing_samples_is_an_error_naming_it(tmp_path):
    fields = ("__key__", "jpg", "json")
    spill = tmp_path / "000000.spill"
    records = [
        _POSITION.pack(p) + _spill_body(fields, {"__key__": str(p).encode(), "jpg": b"x" * p, "json": b"{}"})
        for p in (2, 0, 1)
    ]
    spill.write_bytes(b"".join(records))
    entry = _finish_shard((spill, 3, tmp_path / "shard.tar", fields))
    assert entry.samples == 3 and not spill.exists()
    keys = [m.name for m in tarfile.open(tmp_path / "shard.tar")]
    assert keys == ["0.jpg", "0.json", "1.jpg", "1.json", "2.jpg", "2.json"]  # in position order
    spill.write_bytes(b"".join(records))
    with pytest.raises(PipelineError, match=r"000000.spill: 3 samples read back of the 4 written"):
        _finish_shard((spill, 4, tmp_path / "shard.tar", fields))
    for cut in (len(records[0]) + 5, len(records[0]) + 20):  # inside the second record's header, then its bytes
        spill.write_bytes(b"".join(records)[:cut])
        with pytest.raises(PipelineError, match=r"000000.spill: the spill file ends inside"):
            _finish_shard((spill, 3, tmp_path / "shard.tar", fields))
