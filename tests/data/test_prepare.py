"""The prepare stage end to end: bad inputs (strict vs skip), the index it writes, and real COCO / LVIS files."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO

from picosam_pipeline.config import SplitSource
from picosam_pipeline.data.crops import point_box, point_prompt, roi_box
from picosam_pipeline.data.index import column_array, decode_mask, iter_images, read_index, read_index_metadata
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.stages.prepare import run
from tests.helpers.paths import shared_data_or_skip
from tests.helpers.prepare_dataset import (
    Dataset,
    H,
    W,
    annotation,
    encode,
    exif_rotated_jpeg,
    noise_rgb,
    prepare_config,
    prepare_outputs,
    truncated_jpeg,
)

# --------------------------------------------------------------------------------------------------
# every bad input, in skip and strict mode
#   case name -> (mutate the dataset, issue kind, action, annotations dropped, text in the strict-mode message)


def _add(image_id, name, data, **kw):
    return lambda ds: ds.add_image(image_id, name, data, **kw)


def _add_ann(**ann):
    return lambda ds: ds.annotations.append({**annotation(2, 1), **ann})


BAD_INPUTS = {
    "missing image file": (_add(2, "gone.jpg", None, n_anns=2), "image_missing", "dropped", 2, "gone.jpg'"),
    "truncated jpeg": (_add(2, "cut.jpg", truncated_jpeg()), "image_truncated", "dropped", 1, "cut.jpg'"),
    "corrupt file": (_add(2, "junk.jpg", b"\x00garbage" * 50), "image_unreadable", "dropped", 1, "junk.jpg'"),
    "size mismatch": (
        _add(2, "big.jpg", encode(noise_rgb(W + 1, H))),
        "image_size_mismatch",
        "dropped",
        1,
        "big.jpg'",
    ),
    "grayscale": (
        _add(2, "gray.jpg", encode(noise_rgb().convert("L"))),
        "image_grayscale->rgb",
        "converted",
        0,
        None,
    ),
    "cmyk": (_add(2, "cmyk.jpg", encode(noise_rgb().convert("CMYK"))), "image_cmyk->rgb", "converted", 0, None),
    "palette": (
        _add(2, "pal.png", encode(noise_rgb().convert("P"), "PNG")),
        "image_palette->rgb",
        "converted",
        0,
        None,
    ),
    "exif rotated": (_add(2, "rot.jpg", exif_rotated_jpeg()), "image_exif-rotated", "converted", 0, None),
    "degenerate bbox": (
        _add_ann(bbox=[5, 5, 0, 10]),
        "degenerate_bbox",
        "dropped",
        1,
        "annotation 2: bbox [5, 5, 0, 10]",
    ),
    "two-point polygon": (_add_ann(segmentation=[[5, 5, 9, 9]]), "bad_polygon", "dropped", 1, "fewer than 3 points"),
    "bbox partly outside": (_add_ann(bbox=[50, 40, 30, 20]), "bbox_clipped", "converted", 0, None),
    "missing image id": (_add_ann(image_id=77), "missing_image_id", "dropped", 1, "points at image id 77"),
    "duplicate ann id": (_add_ann(id=1), "duplicate_ann_id", "dropped", 1, "annotation id 1 appears twice"),
    "image record without size": (
        _add(2, "nosize.jpg", encode(noise_rgb()), width=None),
        "bad_image_record",
        "dropped",
        1,
        "image 2 (nosize.jpg) has width/height None",
    ),
    # hostile annotation files (issue 13): reported, never a crash nor a silent keep or drop
    "polygon vertex at 5e8": (
        _add_ann(segmentation=[[10, 8, 5e8, 8, 30, 24]]),
        "polygon_outside_image",
        "dropped",
        1,
        "polygon vertex (5e+08, 8) lies far outside",
    ),
    "annotation id 2**63": (
        _add_ann(id=2**63),
        "bad_annotation_record",
        "dropped",
        1,
        "ids must fit a signed 64-bit integer",
    ),
    "garbage RLE counts": (
        _add_ann(segmentation={"size": [H, W], "counts": "12"}),
        "bad_rle",
        "dropped",
        1,
        'counts "12" are not a valid encoding',
    ),
    "iscrowd string": (_add_ann(iscrowd="0"), "bad_iscrowd", "dropped", 1, "iscrowd '0' (str), expected 0 or 1"),
    "empty segmentation": (_add_ann(segmentation=[]), "no_segmentation", "dropped", 1, "segmentation []"),
    "duplicate image id, other size": (
        lambda ds: ds.images.append({"id": 1, "file_name": "good.jpg", "width": W + 8, "height": H}),
        "duplicate_image_id",
        "dropped",
        1,
        "image id 1 names two different images",
    ),
    # the file exists (root/outside.jpg) but is outside the images folder: never read
    "file_name with ..": (
        _add(2, "../outside.jpg", encode(noise_rgb())),
        "image_path_outside_folder",
        "dropped",
        1,
        "'../outside.jpg', which points outside",
    ),
    "absolute file_name": (
        lambda ds: ds.add_image(2, str(ds.root / "elsewhere.jpg"), encode(noise_rgb())),
        "image_path_outside_folder",
        "dropped",
        1,
        "elsewhere.jpg', which points outside",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_skip_mode_drops_or_converts_and_reports(tmp_path, case):
    mutate, kind, action, n_dropped, _ = BAD_INPUTS[case]
    ds = Dataset(tmp_path)
    mutate(ds)
    summary = run(prepare_config(tmp_path, [ds.write()]))
    metrics, records = prepare_outputs(tmp_path)
    val = metrics["splits"]["val"]
    assert val["kept"] + val["dropped"] == val["annotations"] == len(ds.annotations)
    assert val["dropped"] == n_dropped and summary["kept"] == val["kept"]
    assert val["dropped_by_reason"] == ({kind: n_dropped} if n_dropped else {})
    assert val["converted_by_kind"] == ({kind: 1} if action == "converted" else {})
    assert [(r["kind"], r["action"]) for r in records] == [(kind, action)]
    assert records[0]["split"] == "val" and records[0]["reason"]
    assert read_index(tmp_path / "prepared" / "index.parquet").num_rows == val["kept"]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_strict_mode_stops_with_file_and_fix(tmp_path, case):
    mutate, kind, action, _, message = BAD_INPUTS[case]
    ds = Dataset(tmp_path)
    mutate(ds)
    cfg = prepare_config(tmp_path, [ds.write()], on_bad_input="strict")
    if action == "converted":  # conversions are not errors: strict mode keeps the instance
        assert run(cfg)["kept"] == len(ds.annotations)
        return
    with pytest.raises(PipelineError) as err:
        run(cfg)
    text = str(err.value)
    assert message in text and kind in text and "prepare.on_bad_input=skip" in text
    assert ("instances_val.json" in text) or ("images/" in text)  # names the file to fix


def test_exif_rotated_image_keeps_the_annotation_frame(tmp_path):
    ds = Dataset(tmp_path)
    ds.add_image(2, "rot.jpg", exif_rotated_jpeg())
    run(prepare_config(tmp_path, [ds.write()]))
    rows = read_index(tmp_path / "prepared" / "index.parquet").to_pylist()
    assert [(r["width"], r["height"]) for r in rows if r["image_id"] == 2] == [(W, H)]


@pytest.mark.parametrize("mode", ["skip", "strict"])
def test_malformed_json_always_stops(tmp_path, mode):
    split = Dataset(tmp_path).write(text='{"images": [], "annotations": [\n  {"id": 1,}\n]}')
    with pytest.raises(PipelineError, match=r"instances_val\.json: malformed JSON at line 2, column 12"):
        run(prepare_config(tmp_path, [split], on_bad_input=mode))


@pytest.mark.parametrize("mode", ["skip", "strict"])
def test_json_nested_200k_deep_stops_with_a_message_not_a_recursion_error(tmp_path, mode):
    split = Dataset(tmp_path).write(text='{"images": [], "annotations": [' + "[" * 200_000 + "]" * 200_000 + "]}")
    with pytest.raises(PipelineError, match=r"instances_val\.json: the JSON is nested deeper than the parser allows"):
        run(prepare_config(tmp_path, [split], on_bad_input=mode))


def test_folder_given_as_annotations_stops_with_its_name(tmp_path):
    split = Dataset(tmp_path).write()
    with pytest.raises(PipelineError, match=r"images: a folder, not a file"):
        run(prepare_config(tmp_path, [SplitSource("val", split.images, split.images)]))


def test_image_id_beyond_int64_is_reported_with_its_annotations(tmp_path):
    ds = Dataset(tmp_path)
    ds.add_image(2**63, "big.jpg", encode(noise_rgb()), n_anns=0)
    ds.annotations.append(annotation(2, 2**63))
    run(prepare_config(tmp_path, [ds.write()]))
    metrics, records = prepare_outputs(tmp_path)
    assert [r["kind"] for r in records] == ["bad_image_record", "bad_annotation_record"]
    assert metrics["splits"]["val"]["kept"] == 1 and metrics["splits"]["val"]["dropped"] == 1


def test_images_outside_the_folder_are_read_when_the_param_allows_it(tmp_path):
    ds = Dataset(tmp_path)
    ds.add_image(2, "../outside.jpg", encode(noise_rgb()))
    run(prepare_config(tmp_path, [ds.write()], allow_outside_images=True))
    metrics, records = prepare_outputs(tmp_path)
    assert records == [] and metrics["splits"]["val"]["kept"] == 2


def test_without_image_checks_only_missing_files_are_caught(tmp_path):
    ds = Dataset(tmp_path)
    ds.add_image(2, "gone.jpg", None)
    ds.add_image(3, "junk.jpg", b"garbage")  # not decoded, so not caught
    run(prepare_config(tmp_path, [ds.write()], check_images=False))
    metrics, _ = prepare_outputs(tmp_path)
    assert metrics["splits"]["val"]["dropped_by_reason"] == {"image_missing": 1}
    assert metrics["splits"]["val"]["images_checked"] == 0


# --------------------------------------------------------------------------------------------------
# selection and the index contents


def test_selection_and_index_rows(tmp_path):
    ds = Dataset(tmp_path)
    ds.annotations += [
        annotation(2, 1, box=(50, 40, 14, 8)),  # bottom-right corner
        annotation(3, 1, box=(30, 30, 1, 1), area=25.0),  # 1x1: ROI 2x2 < min_roi_side 4 (area set to pass min_area)
        annotation(4, 1, box=(2, 2, 4, 4)),  # area 16 < min_area 20
        annotation(5, 1, iscrowd=1),
    ]
    run(prepare_config(tmp_path, [ds.write()], min_area=20.0))
    metrics, records = prepare_outputs(tmp_path)
    assert metrics["splits"]["val"]["dropped_by_reason"] == {"crowd": 1, "small_area": 1, "small_roi": 1}
    assert records == []  # selection drops are counted, not reported as bad input

    table = read_index(tmp_path / "prepared" / "index.parquet")
    first, corner = table.to_pylist()
    # ann 1, bbox [10, 8, 20, 16]: x=8, y=6.4, w=24, h=19.2 -> side 24 around (20, 16) -> (8, 4, 32, 28)
    assert first["roi_box"] == [8, 4, 32, 28] and first["roi_float_box"] == pytest.approx([8, 4, 32, 28])
    # mask x 10..29, y 8..23 -> point (19, 15); window left = max(0, 19-48) = 0 -> (0, 0, 64, 48)
    assert first["point"] == [19, 15] and first["point_box"] == [0, 0, 64, 48]
    # ann 2, bbox [50, 40, 14, 8]: x=48.6, y=39.2, w=16.8, h=9.6 -> side 16.8 around (57, 44)
    assert corner["roi_box"] == [48, 35, 64, 48]
    assert corner["roi_float_box"] == pytest.approx([48.6, 35.6, 65.4, 52.4])
    assert (corner["split"], corner["iscrowd"], corner["category_name"], corner["area"]) == (
        "val",
        False,
        "thing",
        112.0,
    )
    assert corner["image_path"] == str(tmp_path / "images" / "good.jpg")
    mask = decode_mask(corner["rle_counts"], H, W)
    assert mask.shape == (H, W) and mask[40:48, 50:64].all() and mask.sum() == 112


def test_a_killed_runs_spilled_rows_and_half_written_index_are_cleared_by_the_next_run(tmp_path):
    """prepare spills index rows into its unfinished folder as it goes: what a killed run leaves there is its own
    (not someone else's folder to refuse), and the next run starts over."""
    ds = Dataset(tmp_path)
    ds.add_image(2, "two.jpg", encode(noise_rgb()), n_anns=3)
    cfg = prepare_config(tmp_path, [ds.write()])
    run(cfg)
    index = (tmp_path / "prepared" / "index.parquet").read_bytes()
    partial = tmp_path / "prepared.partial"
    partial.mkdir()
    (partial / "config.resolved.json").write_bytes((tmp_path / "prepared" / "config.resolved.json").read_bytes())
    (partial / ".index-rows.arrow").write_bytes(b"ARROW1\0\0 cut short")
    (partial / "index.parquet.tmp").write_bytes(b"PAR1 cut short")
    run(cfg)
    assert (tmp_path / "prepared" / "index.parquet").read_bytes() == index and not partial.exists()
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == [
        "bad_inputs.jsonl",
        "config.resolved.json",
        "index.parquet",
        "report.json",
    ]


def test_rows_sorted_and_grouped_by_image(tmp_path):
    ds = Dataset(tmp_path)
    ds.add_image(3, "c.jpg", encode(noise_rgb()), n_anns=3)
    ds.add_image(2, "b.jpg", encode(noise_rgb()), n_anns=2)
    ds.annotations.reverse()  # file order must not matter
    run(prepare_config(tmp_path, [ds.write(), Dataset(tmp_path / "train").write(split="train")]))
    index = tmp_path / "prepared" / "index.parquet"
    table = read_index(index)
    keys = list(zip(table["split"].to_pylist(), table["image_id"].to_pylist(), table["ann_id"].to_pylist()))
    assert keys == sorted(keys) and keys[0][0] == "train"
    groups = [
        (g.split, g.image_id, g.file_name, g.rows["ann_id"].to_pylist())
        for g in iter_images(read_index(index, split="val"))
    ]
    assert groups == [
        ("val", 1, "good.jpg", [1]),
        ("val", 2, "b.jpg", [200, 201]),
        ("val", 3, "c.jpg", [300, 301, 302]),
    ]
    roi = column_array(table, "roi_box")
    assert roi.shape == (table.num_rows, 4) and roi.dtype == np.int32 and roi[0].tolist() == [8, 4, 32, 28]
    meta = read_index_metadata(index)
    assert meta["splits"]["val"]["format"] == "coco" and meta["prepare"]["roi_padding"] == 0.1
    assert meta["crop_conventions"]["roi"]["roi_padding"] == 0.1 and meta["crop_conventions"]["point"]["window"] == 96
    with pytest.raises(PipelineError, match="no split 'test'"):
        read_index(index, split="test")


def test_index_reader_rejects_what_prepare_did_not_write(tmp_path):
    with pytest.raises(PipelineError, match="instance index not found; run `picosam-pipeline run-stage prepare`"):
        read_index(tmp_path / "index.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(PipelineError, match="junk.parquet: not a readable Parquet file"):
        read_index(tmp_path / "junk.parquet")
    pq.write_table(pa.table({"ann_id": [1]}), tmp_path / "other.parquet")
    with pytest.raises(PipelineError, match=r"other.parquet: instance index lacks columns \['image_id'"):
        read_index(tmp_path / "other.parquet")


def test_every_input_planted_by_the_sample_generator_is_reported(tmp_path):
    from picosam_pipeline.config import SampleConfig
    from picosam_pipeline.data.sample import generate

    sample = tmp_path / "sample"
    generate(SampleConfig(out_dir=str(sample)))
    splits = [
        SplitSource(s, str(sample / "annotations" / f"instances_{s}.json"), str(sample / s)) for s in ("train", "val")
    ]
    run(prepare_config(tmp_path, splits))
    metrics, records = prepare_outputs(tmp_path)
    for m in metrics["splits"].values():
        assert m["kept"] + m["dropped"] == m["annotations"]
    # BAD_INPUTS.md rows: | kind | image_id | annotation_id (- for a whole image) | file | what |
    table = [
        line.split("|")[1:-1] for line in (sample / "BAD_INPUTS.md").read_text().splitlines() if line.startswith("| ")
    ]
    planted = {int(ann) if ann.strip() != "-" else ("image", int(img)) for _, img, ann, _, _ in table[2:]}
    reported = {r["ann_id"] if "ann_id" in r else ("image", r["image_id"]) for r in records}
    assert reported == planted and all(r["split"] == "train" for r in records)


# --------------------------------------------------------------------------------------------------
# real data (../shared/data)


def test_real_coco_sample_counts_match_pycocotools(tmp_path):
    root = shared_data_or_skip("coco-sample")
    splits = [
        SplitSource(s, str(root / "annotations" / f"instances_{s}2017.json"), str(root / f"{s}2017"))
        for s in ("train", "val")
    ]
    run(prepare_config(tmp_path, splits, min_roi_side=0.0))  # no ROI filter: keeps every non-crowd instance
    metrics, records = prepare_outputs(tmp_path)
    assert records == []  # the real sample is clean
    table = read_index(tmp_path / "prepared" / "index.parquet")
    for split in splits:
        coco = COCO(split.annotations)
        m = metrics["splits"][split.name]
        assert m["annotations"] == len(coco.getAnnIds())
        assert m["kept"] == len(coco.getAnnIds(iscrowd=False))
        assert m["dropped_by_reason"] == {"crowd": len(coco.getAnnIds(iscrowd=True))}
        # every kept row: mask, ROI and point agree with pycocotools' own annToMask (full-image point search)
        for row in (r for r in table.to_pylist() if r["split"] == split.name):
            ann = coco.anns[row["ann_id"]]
            mask = coco.annToMask(ann)
            np.testing.assert_array_equal(decode_mask(row["rle_counts"], row["height"], row["width"]), mask)
            cx, cy = point_prompt(mask)
            assert row["point"] == [cx, cy]
            assert row["point_box"] == list(point_box(cx, cy, row["width"], row["height"], 96))
            assert row["roi_box"] == list(roi_box(ann["bbox"], row["width"], row["height"])[0])
    assert (metrics["splits"]["train"]["kept"], metrics["splits"]["val"]["kept"]) == (335, 190)


def test_real_lvis_v05_without_images_counts_every_instance_as_missing(tmp_path):
    path = shared_data_or_skip("lvis-sample", "lvis_v0.5_val_100.json")
    (tmp_path / "val2017").mkdir()
    run(prepare_config(tmp_path, [SplitSource("val", str(path), str(tmp_path / "val2017"))], check_images=False))
    metrics, records = prepare_outputs(tmp_path)
    assert metrics["dataset"]["val"] == {"format": "lvis", "version": "v0.5", "categories": 1230}
    assert metrics["splits"]["val"]["dropped_by_reason"] == {"image_missing": 977}
    assert metrics["splits"]["val"]["kept"] == 0
    assert sum(len(r["ann_ids"]) for r in records) == 977
    assert all(r["file"].endswith(f"val2017/{r['image_id']:012d}.jpg") for r in records)
    meta = read_index_metadata(tmp_path / "prepared" / "index.parquet")
    assert (meta["splits"]["val"]["format"], meta["splits"]["val"]["version"]) == ("lvis", "v0.5")


@pytest.mark.parametrize("row_group_rows", [65_536, 100])
def test_index_rows_spilled_in_batches_write_the_file_write_index_writes(tmp_path, monkeypatch, row_group_rows):
    """IndexBuilder spills every batch_rows rows to disk and sorts at the end; the file must not depend on the batch
    size, nor on the order rows came in, and must be write_index's for the same rows (row groups of 100 rows: each
    gathered from several batches)."""
    from picosam_pipeline.data import index as index_module
    from picosam_pipeline.data.index import SCHEMA, IndexBuilder, write_index

    monkeypatch.setattr(index_module, "ROW_GROUP_ROWS", row_group_rows)
    rng = np.random.default_rng(0)
    rows = [
        dict(
            ann_id=int(a),
            image_id=int(rng.integers(50)),
            split=str(rng.choice(["val", "train", "minival"])),
            file_name="a.jpg",
            image_path=f"/images/{i}.jpg",
            width=640,
            height=480,
            category_id=1,
            category_name="thing",
            iscrowd=False,
            bbox=[1.5, 2.0, 3.0, 4.0],
            area=float(i),
            roi_box=[1, 2, 3, 4],
            roi_float_box=[1.0, 2.0, 3.0, 4.0],
            point=[1, 2],
            point_box=[0, 0, 96, 96],
            rle_counts="x" * int(rng.integers(1, 40)),
        )
        for i, a in enumerate(rng.permutation(1000))
    ]
    in_order = sorted(rows, key=lambda r: (r["split"], r["image_id"], r["ann_id"]))
    reference = write_index(pa.Table.from_pylist(rows, schema=SCHEMA), tmp_path / "ref.parquet", {"m": 1}).read_bytes()
    for name, added, batch_rows in [
        ("shuffled-whole", rows, 10**9),
        ("shuffled-64", rows, 64),
        ("shuffled-7", rows, 7),
        ("sorted-64", in_order, 64),
        ("reversed-33", in_order[::-1], 33),
    ]:
        builder = IndexBuilder(tmp_path / f"{name}.arrow", batch_rows=batch_rows)
        for row in added:
            builder.add(**row)
        assert len(builder) == len(rows)
        assert builder.write(tmp_path / f"{name}.parquet", {"m": 1}).read_bytes() == reference, name
        assert not (tmp_path / f"{name}.arrow").exists()  # the spill is deleted
    assert read_index(tmp_path / "ref.parquet").column("ann_id").to_pylist() == [r["ann_id"] for r in in_order]
    assert pq.ParquetFile(tmp_path / "ref.parquet").metadata.num_row_groups == -(-1000 // row_group_rows)
    empty = IndexBuilder(tmp_path / "empty.arrow").write(tmp_path / "empty.parquet", {"m": 1}).read_bytes()
    assert empty == write_index(SCHEMA.empty_table(), tmp_path / "empty-ref.parquet", {"m": 1}).read_bytes()
