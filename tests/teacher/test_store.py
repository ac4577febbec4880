"""Teacher-logit store: codecs, round trips, plain-zarr reading, resuming, and SIGKILL crash safety."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from picosam_pipeline.cli import cli
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.teacher.codec import CODECS, decode_logits, encode_logits
from picosam_pipeline.teacher.store import (
    chunk_rows,
    create_store,
    is_logit_store,
    open_store,
    shard_size,
    stored_boxes,
    stored_side,
)
from tests.helpers.logit_store import SIDE, K, N, make_store, row_meta, shard_inputs, tree, write
from tests.helpers.paths import REPO, shared_data_or_skip

SIGMOID_ERROR_BOUND = {"sigmoid_uint8": 1 / 254, "linear_uint8": 1 / 16, "float16": 1e-3}


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def hard_logits(seed: int = 0) -> np.ndarray:
    """Logits with the cases that break naive rounding: tiny values of both signs, zeros, saturation."""
    rng = np.random.default_rng(seed)
    tiny = np.array([1e-9, 1e-7, 1e-5, 1e-3, 0.003, 0.0078, 0.0079, 0.124, 0.126, 0.0, -0.0])
    edges = np.concatenate([tiny, -tiny, [31.7, 31.8, 32.0, 40.0, -32.0, -40.0, 6.2, 6.3, -6.2, -6.3]])
    return np.concatenate([edges, rng.normal(0.0, 8.0, 4000), rng.uniform(-0.05, 0.05, 4000)]).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# codecs


@pytest.mark.parametrize("codec", list(CODECS))
def test_codec_keeps_every_decision_and_bounds_the_sigmoid_error(codec):
    x = hard_logits()
    q = encode_logits(x, codec)
    y = decode_logits(q, codec)
    assert q.dtype == np.dtype(CODECS[codec].dtype) and y.dtype == np.float32 and y.shape == x.shape
    assert np.array_equal(y > 0, x > 0), f"{codec} flipped {int(((y > 0) != (x > 0)).sum())} decisions"
    assert np.abs(sigmoid(y) - sigmoid(x)).max() <= SIGMOID_ERROR_BOUND[codec] + 1e-6
    assert np.array_equal(encode_logits(y, codec), q)  # decoded values are fixed points: re-encoding is lossless


def test_sigmoid_codec_levels_and_saturation():
    q = encode_logits(np.array([-100.0, -1e-6, 0.0, 1e-6, 100.0]), "sigmoid_uint8")
    assert q.tolist() == [0, 127, 127, 128, 254]  # 127 is exactly p = 0.5, i.e. logit 0 = background
    table = decode_logits(np.arange(256, dtype=np.uint8), "sigmoid_uint8")
    assert table[127] == 0.0 and table[128] > 0 and np.all(np.diff(table) >= 0)
    assert table[0] == pytest.approx(-np.log(1015)) and table[254] == pytest.approx(np.log(1015))


def test_codec_rejects_non_finite_logits_and_wrong_dtypes():
    with pytest.raises(ValueError, match="NaN"):
        encode_logits(np.array([0.0, np.nan]), "sigmoid_uint8")
    with pytest.raises(ValueError, match="uint8"):
        decode_logits(np.zeros(3, np.float16), "sigmoid_uint8")


def test_stored_side_and_boxes_extend_the_crop_grid():
    assert stored_side(96, 0.0) == 96 and stored_side(96, 0.25) == 144
    box = stored_boxes(np.array([[10, 20, 58, 116]]), 96, 0.25)  # 0.5 and 1.0 image px per crop px
    assert box.tolist() == [[-2.0, -4.0, 70.0, 140.0]]


# --------------------------------------------------------------------------------------------------
# the store


@pytest.mark.parametrize("codec", list(CODECS))
def test_round_trip_through_the_store(tmp_path, codec):
    store = make_store(tmp_path / "l.zarr", codec)
    written = write(store, [2, 0, 3, 1])  # any order: shards are independent
    reader = open_store(tmp_path / "l.zarr")
    assert len(reader) == N and reader.pending_shards() == []
    expected = np.concatenate([written[k]["logits"] for k in range(4)])
    assert np.array_equal(reader.read_logits(slice(None)), decode_logits(encode_logits(expected, codec), codec))
    assert np.array_equal(reader.read_logits([9, 0, 9]), reader.read_logits(slice(None))[[9, 0, 9]])
    assert reader.read_logits(-1).shape == (SIDE, SIDE) and reader.read_raw([]).shape == (0, SIDE, SIDE)
    meta = reader.read_meta()
    for name, expected_meta in row_meta().items():
        assert np.array_equal(meta[name], expected_meta), name
    assert np.array_equal(
        meta["confidence"], np.concatenate([written[k]["confidence"] for k in range(4)]).astype(np.float32)
    )
    assert meta["confidence"].dtype == np.float32 and meta["crop_box"].dtype == np.int32


def test_unwritten_shards_bad_shapes_and_read_only_writes_are_refused(tmp_path):
    store = make_store(tmp_path / "l.zarr")
    write(store, [0])
    assert open_store(tmp_path / "l.zarr").read_logits([0, 2]).shape == (2, SIDE, SIDE)
    with pytest.raises(PipelineError, match=r"shards \[1\] are not written yet"):
        open_store(tmp_path / "l.zarr").read_logits([0, 3])
    good = shard_inputs(1, store.shard_slice(1))
    with pytest.raises(ValueError, match=r"logits has shape \(3, 15, 16\)"):
        store.write_shard(1, **{**good, "logits": good["logits"][:, 1:]})
    with pytest.raises(ValueError, match=r"confidence has shape \(2,\)"):
        store.write_shard(1, **{**good, "confidence": good["confidence"][1:]})
    with pytest.raises(ValueError, match="create_store: ann_id must hold integers"):
        make_store(tmp_path / "m.zarr", rows={**row_meta(), "ann_id": row_meta()["ann_id"] + 0.5})
    with pytest.raises(PermissionError):
        open_store(tmp_path / "l.zarr").write_shard(1, **good)
    assert store.pending_shards() == [1, 2, 3]


@pytest.mark.parametrize("codec", list(CODECS))
def test_plain_zarr_reads_the_store_and_decodes_with_the_attribute_formula(tmp_path, codec):
    write(make_store(tmp_path / "l.zarr", codec), range(4))
    group = zarr.open_group(tmp_path / "l.zarr", mode="r")
    logits = group["logits"]
    assert logits.shape == (N, SIDE, SIDE) and logits.chunks == (K, SIDE, SIDE) and logits.shards == (K, SIDE, SIDE)
    a = dict(logits.attrs)
    v = (logits[:].astype(np.float64) - a["offset"]) * a["scale"]  # the rule a teammate reads off the attributes
    if a["quantity"] == "sigmoid":
        p = np.clip(v, a["p_min"], a["p_max"])
        v = np.log(p / (1 - p))
    assert np.allclose(v, open_store(tmp_path / "l.zarr").read_logits(slice(None)), atol=1e-5)
    assert group.attrs["teacher"]["random_weights"] is True and group.attrs["prompt"]["convention"] == "roi"
    assert group.attrs["logit_store"]["encoding"]["blosc"]["cname"] == "zstd"
    assert group["shard_digest"].shape == (4, 32) and group["shard_digest"][:].any(axis=1).all()


def test_reopening_keeps_finished_shards_and_removes_write_leftovers(tmp_path):
    path = tmp_path / "l.zarr"
    write(make_store(path), [0, 2])
    before = tree(path)
    leftover = path / "logits" / "c" / "1" / "0" / "0.0123abcd.partial"  # what a kill inside zarr's writer leaves
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")
    store = make_store(path, n_workers=4, threads_per_worker=2)  # execution settings may change between runs
    assert store.pending_shards() == [1, 3] and not leftover.exists() and tree(path) == before


def test_reopening_with_another_layout_or_teacher_is_refused(tmp_path):
    path = tmp_path / "l.zarr"
    write(make_store(path), [0])
    moved = {**row_meta(), "crop_box": row_meta()["crop_box"] + 1}  # an index rebuilt since
    for change in (
        dict(codec="float16"),
        dict(n=N + 1),
        dict(checkpoint_sha256="ab" * 32),
        dict(multimask_output=False),
        dict(rows=moved),
    ):
        with pytest.raises(PipelineError, match=r"different layout or teacher .*rm -r .*teacher\.out"):
            make_store(path, **change)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a store")
    with pytest.raises(PipelineError, match="not a teacher-logit store"):
        make_store(tmp_path / "other")
    with pytest.raises(PipelineError, match="not a Zarr group"):
        open_store(tmp_path / "missing.zarr")


def test_a_truncated_shard_without_marker_is_rewritten_whole(tmp_path):
    """What a store without atomic renames could leave: a half file in place, marker never set."""
    path = tmp_path / "l.zarr"
    store = make_store(path)
    write(store, range(4))
    reference = tree(path)
    shard = path / "logits" / "c" / "3" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:7])
    (path / "shard_digest" / "c" / "3" / "0").unlink()
    store = make_store(path)
    assert store.pending_shards() == [3]
    write(store, [3])
    assert tree(path) == reference


# --------------------------------------------------------------------------------------------------
# digests: a store proves its contents


@pytest.mark.parametrize("damage", ["missing_logits", "missing_confidence", "altered", "other_pass"])
def test_a_lost_altered_or_foreign_shard_file_is_named_and_rewritten_on_resume(tmp_path, damage):
    path = tmp_path / "l.zarr"
    write(make_store(path), range(4))
    reference = tree(path)
    logits_file, confidence_file = open_store(path).shard_files(1)
    if damage == "missing_logits":
        logits_file.unlink()  # zarr alone would read fill values (zeros: confident background)
    elif damage == "missing_confidence":
        confidence_file.unlink()
    elif damage == "altered":
        data = bytearray(logits_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        logits_file.write_bytes(bytes(data))
    else:  # the same shard from a pass with another teacher checkpoint: same layout, other pass id
        other = tmp_path / "other.zarr"
        foreign = make_store(other, checkpoint_sha256="cd" * 32)
        for k in range(4):
            foreign.write_shard(k, **shard_inputs(k, foreign.shard_slice(k), seed=1))
        for mine, theirs in zip(open_store(path).shard_files(1), open_store(other).shard_files(1)):
            mine.write_bytes(theirs.read_bytes())
    reader = open_store(path)
    assert reader.read_logits(slice(0, 3)).shape == (3, SIDE, SIDE)  # shard 0 is sound
    expected = {
        "missing_logits": "file logits/c/1/0/0 is missing",
        "missing_confidence": "file confidence/c/1 is missing",
        "altered": "differ from what the teacher wrote",
        "other_pass": "another teacher pass",
    }[damage]
    with pytest.raises(
        PipelineError, match=rf"shard 1 \(rows 3:6\) cannot be read: .*{expected}.*Rerun the teacher stage"
    ):
        reader.read_logits([4])
    with pytest.raises(PipelineError, match="shard 1"):
        reader.read_meta()
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert (
        result.exit_code == 1
        and "1 of 4 shards fail their digest" in result.stderr
        and "shard 1 (rows 3:6)" in result.stderr
    )
    store = make_store(path)  # a resumed pass
    assert store.pending_shards() == [1]
    write(store, [1])
    assert tree(path) == reference


def test_auto_shard_size_keeps_a_coco_size_store_under_a_thousand_files(tmp_path):
    assert shard_size("auto", 100) == 64 and shard_size(32, 10**6) == 32
    assert shard_size("auto", 897_000) == 3504 and shard_size("auto", 1_270_000) == 4976
    assert chunk_rows(3504) == 16 and chunk_rows(64) == 16 and chunk_rows(100) == 10 and chunk_rows(3) == 3
    assert shard_size("auto", 10**8) == 8192
    store = make_store(tmp_path / "l.zarr")
    write(store, [0])
    per_shard = len(tree(store.path))
    write(store, [1])
    assert len(tree(store.path)) - per_shard == 3  # a shard costs its logits, confidence and digest files
    fixed = per_shard - 3  # group and array metadata + the id/box arrays, written once
    for instances in (897_000, 1_270_000):  # COCO train+val, LVIS v1 train+val
        assert fixed + 3 * -(-instances // shard_size("auto", instances)) <= 1000


# --------------------------------------------------------------------------------------------------
# SIGKILL at any moment, then resume

WRITER = """
import sys, time
import numpy as np
import zarr.storage._local as local
sys.path[:0] = [{repo!r}]  # for tests.helpers
from tests.helpers.logit_store import make_store, shard_inputs

path, point = sys.argv[1], sys.argv[2]

def block(message):
    print(message, flush=True)
    time.sleep(60)

if point in ("before_commit", "mid_file_atomic", "mid_file_in_place"):
    target = "shard_digest/c/1/0" if point == "before_commit" else "logits/c/1/0/0"
    real_put = local._put
    def put(file, value, exclusive=False):
        if not str(file).endswith(target):
            return real_put(file, value, exclusive)
        data = value.as_buffer_like()
        file.parent.mkdir(parents=True, exist_ok=True)
        if point == "before_commit":
            block("blocked")
        elif point == "mid_file_atomic":  # zarr's own temp-file writer, killed half-way through the file
            with local._atomic_write(file, "wb") as f:
                f.write(data[: len(data) // 2]); f.flush()
                block("blocked")
        else:  # a store that writes in place
            with open(file, "wb") as f:
                f.write(data[: len(data) // 2]); f.flush()
                block("blocked")
    local._put = put

store = make_store(path)
for k in store.pending_shards():
    store.write_shard(k, **shard_inputs(k, store.shard_slice(k)))
    print("wrote", k, flush=True)
    if point == "after_commit" and k == 1:
        block("blocked")
"""


def run_writer(path: Path, point: str = "none", kill: bool = False) -> list[int]:
    """Run the writer in a fresh process; with ``kill``, SIGKILL it once it reports reaching ``point``."""
    code = WRITER.format(repo=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), point], cwd=REPO, stdout=subprocess.PIPE, text=True)
    wrote = []
    for line in proc.stdout:
        if line.startswith("wrote"):
            wrote.append(int(line.split()[1]))
        if kill and line.strip() == "blocked":
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.stdout.close()
    assert proc.wait(timeout=60) == (-signal.SIGKILL if kill else 0)
    return wrote


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, bytes]:
    path = tmp_path_factory.mktemp("reference") / "l.zarr"
    assert run_writer(path) == [0, 1, 2, 3]
    return tree(path)


@pytest.mark.parametrize("point", ["after_commit", "before_commit", "mid_file_atomic", "mid_file_in_place"])
def test_sigkill_then_rerun_finishes_only_missing_shards_and_matches_an_uninterrupted_run(
    tmp_path, point, uninterrupted
):
    path = tmp_path / "l.zarr"
    assert run_writer(path, point, kill=True) == ([0, 1] if point == "after_commit" else [0])
    done = [k for k in range(4) if k not in open_store(path).pending_shards()]
    assert done == ([0, 1] if point == "after_commit" else [0])  # shard 1 is never taken as done half-written
    if point == "mid_file_atomic":
        assert list(path.rglob("*.partial")), "the kill should leave zarr's temporary file behind"
    assert run_writer(path) == [k for k in range(4) if k not in done]  # finished shards are not recomputed
    assert tree(path) == uninterrupted  # every file, logits shards included, byte for byte


# --------------------------------------------------------------------------------------------------
# inspect


def test_inspect_prints_counts_sizes_codec_teacher_and_ranges(tmp_path):
    path = tmp_path / "l.zarr"
    write(make_store(path), [0, 1])
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "6 of 10 written; shards 2 of 4 done" in out
    assert "codec sigmoid_uint8" in out and "p = clip(q / 254" in out and "B per instance" in out
    low = open_store(path).read_logits(slice(0, 6)).min()
    assert f"min {low:.3f}" in out and "sam2.1_hiera_tiny" in out and "confidence  min" in out
    assert "RANDOM WEIGHTS" in result.stderr
    bad = CliRunner().invoke(cli, ["inspect", str(tmp_path / "nothing")])
    assert bad.exit_code == 1 and "not a teacher-logit store" in bad.stderr


# --------------------------------------------------------------------------------------------------
# size target on realistic logits


def test_sigmoid_uint8_meets_the_size_target_on_logits_from_real_coco_masks(tmp_path):
    """<= 2,500 B per 96x96 instance on disk, no flipped decision, sigmoid error <= 0.01 (bench recipe)."""
    coco = shared_data_or_skip("coco-sample")
    spec = importlib.util.spec_from_file_location("logit_storage", REPO / "bench" / "logit_storage.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = bench.coco_like_logits(coco, limit=128)
    store = create_store(
        tmp_path / "l.zarr",
        side=96,
        instances_per_shard=64,
        codec="sigmoid_uint8",
        compression_level=5,
        attrs={},
        rows=dict(
            ann_id=data["ann_id"],
            image_id=data["image_id"],
            crop_box=data["crop_box"],
            stored_box=data["crop_box"].astype(np.float64),
        ),
    )
    for k in store.pending_shards():
        r = store.shard_slice(k)
        store.write_shard(k, data["logits"][r], confidence=data["confidence"][r])
    bytes_per_instance = sum(f.stat().st_size for f in store.path.rglob("*") if f.is_file()) / 128
    quality = bench.fidelity(data["logits"], open_store(store.path).read_logits(slice(None)))
    assert bytes_per_instance <= 2500 and quality["flipped"] == 0.0 and quality["max_sigmoid_err"] <= 0.01


def test_a_store_of_an_older_format_is_recognised_but_not_read(tmp_path):
    path = tmp_path / "l.zarr"
    write(make_store(path), [0])
    group = zarr.open_group(path, mode="r+")
    group.attrs["logit_store"] = {**group.attrs["logit_store"], "format_version": 1}
    assert is_logit_store(path) and not is_logit_store(tmp_path) and not is_logit_store(tmp_path / "missing")
    with pytest.raises(PipelineError, match="has logit-store format 1, this code reads format 2; recompute it"):
        open_store(path)
