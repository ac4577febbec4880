"""Provenance travels (issue 32): the teacher's weights, the dataset and the recipe go from the teacher stores into
the shards, the student checkpoints, the evaluation (with its whole-crop baseline), predict, the export contract and
the deploy README; a random-weight teacher is called a smoke test everywhere."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from picosam_pipeline.deploy.deploy_folder import with_banner
from picosam_pipeline.evaluate.predict import provenance_note
from picosam_pipeline.evaluate.score_table import BASELINE, InstanceGT, evaluate_batches, format_score_table
from picosam_pipeline.evaluate.shard_evaluation import evaluation_provenance, headline_metrics
from picosam_pipeline.provenance import (
    GROUND_TRUTH,
    NOT_RECORDED,
    RANDOM_WEIGHTS,
    SMOKE_TEST,
    Provenance,
    dataset_of_annotations,
    student_provenance,
)

SHA = "17dbc2293430f5932366c23d30e9036df7245a7e8c0a145513594fbd0e4ee54e"
RANDOM_STORE = {"teacher": {"model": "sam2.1_hiera_tiny", "checkpoint_sha256": None, "random_weights": True}}
REAL_STORE = {"teacher": {"model": "sam3", "checkpoint_sha256": SHA, "random_weights": False}}
GT_STORE = {"teacher": {"model": "gt-mask", "gain": 4.0}}  # teacher.gt_mask's store: no weights at all


def test_store_attributes_say_random_weights_checkpoint_or_ground_truth():
    found = Provenance.from_store_attrs({"sam2": RANDOM_STORE, "sam3": REAL_STORE, "gt": GT_STORE}, "sample")
    assert [(t.name, t.model, t.weights) for t in found.teachers] == [
        ("sam2", "sam2.1_hiera_tiny", RANDOM_WEIGHTS),
        ("sam3", "sam3", SHA),
        ("gt", "gt-mask", GROUND_TRUTH),
    ]
    assert found.smoke_test
    assert not Provenance.from_store_attrs({"sam3": REAL_STORE, "gt": GT_STORE}).smoke_test


def test_title_banner_and_json_round_trip():
    smoke = Provenance.from_store_attrs({"sam2": RANDOM_STORE}, "sample").with_recipe("picosam3", "auto")
    assert smoke.title() == "SAM2.1-tiny (RANDOM WEIGHTS, smoke test) · sample · picosam3/sample"
    assert smoke.banner().startswith(f"**{SMOKE_TEST}.**") and "SAM2.1-tiny" in smoke.banner()
    record = json.loads(json.dumps(smoke.as_dict()))
    assert record["smoke_test"] is True and record["summary"] == smoke.title()
    assert Provenance.from_dict(record) == smoke

    real = Provenance.from_store_attrs({"sam3": REAL_STORE}, "coco2017").with_recipe("picosam3", "auto")
    assert real.title() == "SAM3 (checkpoint 17dbc229) · coco2017 · picosam3/full"
    assert SMOKE_TEST not in real.banner() and real.banner() == f"Provenance: {real.title()}."


@pytest.mark.parametrize("raw", [None, "random weights", {"teachers": "sam2"}, {"teachers": [1, None]}, []])
def test_a_malformed_record_reads_as_not_recorded(raw):
    found = Provenance.from_dict(raw)
    assert found.teachers == () and not found.smoke_test and "not recorded" in found.title()


def test_untrusted_fields_are_kept_printable():
    found = Provenance.from_dict({"teachers": [{"name": "x", "model": "evil\u202e\n", "weights": 5}], "dataset": 3})
    (teacher,) = found.teachers
    assert "\n" not in teacher.model and "\u202e" not in teacher.model and teacher.weights == NOT_RECORDED
    assert found.dataset is None


def test_dataset_name_comes_from_the_annotations_layout():
    assert dataset_of_annotations("data/datasets/coco2017/annotations/instances_val2017.json") == "coco2017"
    assert dataset_of_annotations("elsewhere/instances.json") is None


def _shards(root: Path, provenance: Provenance | None) -> Path:
    """A pack folder whose train split's shards.json holds ``provenance`` (or, without, the teachers' names only)."""
    split = root / "shards" / "train"
    split.mkdir(parents=True)
    index = {"teachers": [{"name": "sam2", "model": "sam2.1_hiera_tiny"}], "shards": []}
    if provenance is not None:
        index["provenance"] = provenance.as_dict()
    (split / "shards.json").write_text(json.dumps(index))
    return split.parent


def test_student_provenance_joins_the_pack_and_the_train_stages_recipe(tmp_path):
    shards = _shards(tmp_path, Provenance.from_store_attrs({"sam2": RANDOM_STORE}, "sample"))
    out = tmp_path / "train"
    out.mkdir()
    (out / "config.resolved.json").write_text(json.dumps({"recipe": {"name": "picosam2", "size": "full"}}))
    found = Provenance.from_dict(student_provenance(shards, out))
    assert found.smoke_test and (found.dataset, found.recipe, found.size) == ("sample", "picosam2", "full")
    # an older pack: the teachers are named, their weights not recorded; no marker: no recipe
    older = Provenance.from_dict(student_provenance(_shards(tmp_path / "old", None), tmp_path / "nowhere"))
    assert [t.weights for t in older.teachers] == [NOT_RECORDED] and older.recipe is None and not older.smoke_test


def test_student_checkpoints_record_their_provenance(tmp_path):
    from torch import nn

    from picosam_pipeline.train.checkpoints import checkpoint_provenance, save_student

    shards = _shards(tmp_path, Provenance.from_store_attrs({"sam2": RANDOM_STORE}, "sample"))
    meta = {"student": "picosam2", "input_size": 96, "config": {"shards": str(shards)}}
    path = save_student(tmp_path / "student.pt", nn.Conv2d(3, 1, 1), meta)
    assert Provenance.from_dict(checkpoint_provenance(path)).smoke_test
    given = Provenance.from_store_attrs({"sam3": REAL_STORE}).as_dict()
    path = save_student(tmp_path / "given.pt", nn.Conv2d(3, 1, 1), {**meta, "provenance": given})
    assert checkpoint_provenance(path) == given
    bare = save_student(tmp_path / "bare.pt", nn.Conv2d(3, 1, 1), {"student": "picosam2", "input_size": 96})
    assert checkpoint_provenance(bare)["teachers"] == []


def test_pack_records_the_gt_teacher_and_dataset_in_shards_json(sample_shards):
    from picosam_pipeline.train.shards import read_shard_index

    for split in ("train", "val"):
        found = Provenance.from_shards(sample_shards / split)
        assert [(t.name, t.weights) for t in found.teachers] == [("gt", GROUND_TRUTH)]
        assert found.dataset == "sample" and not found.smoke_test
        assert read_shard_index(sample_shards / split).samples > 0  # the loader still reads the index
    report = json.loads((sample_shards / "report.json").read_text())
    assert report["provenance"]["teachers"] == [{"name": "gt", "model": "gt-mask", "weights": GROUND_TRUTH}]


# --------------------------------------------------------------------------------------------------
# evaluate: the whole-crop baseline, the provenance line


S = 96


class _HalfModel:
    """Foreground in the crop's left half, whatever the input."""

    name, input_size, crop = "half", S, None

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        logits = np.full((len(rgb), 1, S, S), -5.0, dtype=np.float32)
        logits[..., : S // 2] = 5.0
        return logits


def _batch() -> tuple[dict, InstanceGT]:
    """Two samples of a 200x200 image cut at (0, 0, 96, 96): GT rows 10:30 x cols 0:48, and an empty GT crop."""
    full = [np.zeros((200, 200), np.uint8), np.zeros((200, 200), np.uint8)]
    full[0][10:30, 0:48] = 1
    full[1][150:160, 150:160] = 1
    rle = [mask_utils.encode(np.asfortranarray(m))["counts"].decode("ascii") for m in full]
    gt_crops = np.stack([m[:S, :S] for m in full])[:, None].astype(np.float32)
    batch = {
        "image": np.zeros((2, 3, S, S), np.float32),
        "gt_mask": gt_crops,
        "ann_id": np.array([1, 2]),
        "image_id": np.array([7, 7]),
        "category_id": np.array([1, 1]),
        "area": np.array([960.0, 100.0]),
        "crop_box": np.tile([0, 0, S, S], (2, 1)),
    }
    return batch, InstanceGT([1, 2], rle, [200, 200], [200, 200], ["cat", "cat"], "test")


def test_the_baseline_is_the_whole_crop_scored_like_a_model():
    from picosam_pipeline.evaluate.score_table import evaluation_report

    batch, gt = _batch()
    seen = []
    table, _ = evaluate_batches([batch], {"student": _HalfModel()}, gt, on_sample=seen.append, baseline=True)
    assert table.models == ["student", BASELINE]
    np.testing.assert_allclose(table[f"{BASELINE}_iou"], [20 * 48 / S**2, 0.0])  # every pixel foreground
    np.testing.assert_allclose(table[f"{BASELINE}_full_iou"], [20 * 48 / S**2, 0.0])
    assert all(BASELINE not in s["logits"] and BASELINE not in s["iou"] for s in seen)  # no grid column
    report = evaluation_report(table)
    assert "baseline (whole crop)" in format_score_table(report, table.models)
    metrics = headline_metrics(report, table.models)
    assert metrics[BASELINE] == {"crop_miou": report[BASELINE]["crop_miou"]}  # one number in metrics/evaluate.json
    assert evaluate_batches([batch], {"student": _HalfModel()}, gt)[0].models == ["student"]  # only on request


def test_evaluation_takes_the_students_provenance_else_the_shards(tmp_path):
    smoke = Provenance.from_store_attrs({"sam2": RANDOM_STORE}, "sample")
    student = _HalfModel()
    student.provenance = smoke.as_dict()
    assert evaluation_provenance(student, "nowhere") == smoke
    assert smoke.line().startswith(f"{SMOKE_TEST}: SAM2.1-tiny (RANDOM WEIGHTS")
    shards = _shards(tmp_path, Provenance.from_store_attrs({"sam3": REAL_STORE}, "coco2017"))
    found = evaluation_provenance(_HalfModel(), str(shards / "train"))  # a student without a record
    assert found.dataset == "coco2017" and found.line() == found.title()


def test_predict_notes_the_models_provenance():
    model = _HalfModel()
    assert provenance_note(model).startswith("model provenance: provenance not recorded")
    model.provenance = dataclasses.replace(Provenance.from_store_attrs({"sam2": RANDOM_STORE}), dataset="x").as_dict()
    assert SMOKE_TEST in provenance_note(model) and "SAM2.1-tiny" in provenance_note(model)


# --------------------------------------------------------------------------------------------------
# deploy


def test_deploy_readme_is_headed_by_the_banner():
    readme = "# picosam3 on the Raspberry Pi AI Camera\n\nWritten by ...\n"
    smoke = with_banner(readme, Provenance.from_store_attrs({"sam2": RANDOM_STORE}, "sample"))
    title, blank, banner, *rest = smoke.splitlines()
    assert title == "# picosam3 on the Raspberry Pi AI Camera" and blank == ""
    assert banner.startswith(f"> **{SMOKE_TEST}.**") and rest == ["", "Written by ..."]
    real = with_banner(readme, Provenance.from_store_attrs({"sam3": REAL_STORE}, "coco2017"))
    assert SMOKE_TEST not in real and "> Provenance: SAM3 (checkpoint 17dbc229) · coco2017" in real
    assert "provenance not recorded" in with_banner(readme, Provenance())


def test_export_contract_records_the_students_provenance(tmp_path):
    from picosam_pipeline.deploy import onnx_contract

    smoke = Provenance.from_store_attrs({"sam2": RANDOM_STORE}, "sample").as_dict()
    meta = {"student": "picosam3", "input_size": 16, "normalization": {}, "provenance": smoke}
    made = {"tpc_version": "4.0", "method": "ptq", "crop": {"convention": "roi"}}
    grid = type("Grid", (), {"step": 0.1, "signed": True, "range": (-12.8, 12.7)})()
    spec = type("Spec", (), {"name": "x", "shape": ("batch", 3, 16, 16), "dtype": "float32"})()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_contract, "graph_io", lambda path: ([spec], [spec]))
        patch.setattr(onnx_contract, "output_grid", lambda path: grid)
        contract = onnx_contract.network_contract(tmp_path / "m.onnx", meta, made)
        bare = onnx_contract.network_contract(tmp_path / "m.onnx", {**meta, "provenance": None}, made)
    assert contract["provenance"] == smoke and contract["provenance"]["smoke_test"] is True
    assert bare["provenance"]["teachers"] == [] and bare["provenance"]["smoke_test"] is False
