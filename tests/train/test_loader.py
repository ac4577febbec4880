"""The shard loader: batch contract, order and shuffling, worker capping, DDP splitting, untrusted and
corrupt shards, and augmentation applied identically to image, mask and logits."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from picosam_pipeline.errors import PipelineError
from picosam_pipeline.teacher.codec import decode_logits
from picosam_pipeline.train.loader import CorruptShardError, ForeignMemberError, augment, count_samples, make_loader
from picosam_pipeline.train.shards import INDEX_FILE, Frame, read_shard_index
from tests.helpers.pipeline_inputs import elsewhere, own_store, run_pack, split_samples


@pytest.fixture(scope="module")
def shards(sample_shards) -> Path:
    """The built-in sample packed 8 samples per shard (train: several shards); the session's, read-only."""
    assert read_shard_index(sample_shards / "train").shards[0].samples == 8
    return sample_shards


def _ids(loader) -> list[int]:
    return [a for batch in loader for a in batch["ann_id"].tolist()]


def _copy(split_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(split_dir, tmp_path / split_dir.name))


def _reindex(split_dir: Path, name: str) -> None:
    """Make shards.json agree with the (tampered) shard ``name``, as a shard shipped with its own index would."""
    index = json.loads((split_dir / INDEX_FILE).read_text())
    data = (split_dir / name).read_bytes()
    entry = next(e for e in index["shards"] if e["name"] == name)
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (split_dir / INDEX_FILE).write_text(json.dumps(index))


# --------------------------------------------------------------------------------------------------
# batches and order


def test_batches_follow_the_contract_in_shard_then_sample_order(shards):
    split = shards / "train"
    samples = split_samples(split)
    loader = make_loader(split, batch_size=5, shuffle_buffer=0, num_workers=0, seed=0)
    batches = list(loader)
    assert _ids(batches) == [json.loads(s["json"])["ann_id"] for s in samples]
    assert count_samples(split) == len(samples) == loader.samples
    assert [len(b["ann_id"]) for b in batches] == [5] * (len(samples) // 5) + (
        [len(samples) % 5] if len(samples) % 5 else []
    )

    batch, first = batches[0], samples[0]
    shapes = {
        "image": (5, 3, 96, 96),
        "gt_mask": (5, 1, 96, 96),
        "teacher_logits": (5, 1, 96, 96),
        "confidence": (5, 1),  # K = 1 teacher
        "ann_id": (5,),
        "image_id": (5,),
        "category_id": (5,),
        "area": (5,),
        "crop_box": (5, 4),
    }
    assert {k: tuple(v.shape) for k, v in batch.items()} == shapes
    assert [batch[k].dtype for k in ("image", "gt_mask", "teacher_logits", "confidence", "area")] == [torch.float32] * 5
    assert [batch[k].dtype for k in ("ann_id", "image_id", "category_id", "crop_box")] == [torch.int64] * 4
    rgb = np.array(Image.open(io.BytesIO(first["jpg"]))).transpose(2, 0, 1)
    assert torch.equal(batch["image"][0], torch.from_numpy(rgb).float() / 255)
    mask = np.asarray(Image.open(io.BytesIO(first["mask.png"])), np.float32)
    assert torch.equal(batch["gt_mask"][0, 0], torch.from_numpy(mask))
    stored = np.asarray(Image.open(io.BytesIO(first["logits.gt.png"])))
    assert torch.equal(batch["teacher_logits"][0, 0], torch.from_numpy(decode_logits(stored, "sigmoid_uint8")))
    record = json.loads(first["json"])
    assert batch["crop_box"][0].tolist() == record["crop_box"] and batch["area"][0].item() == pytest.approx(
        record["area"]
    )
    assert ((batch["teacher_logits"] > 0).float() == batch["gt_mask"]).float().mean() > 0.95  # the GT-mask teacher
    assert _ids(make_loader(split, batch_size=3, shuffle_buffer=0, num_workers=1, seed=5)) == _ids(batches)


def test_shuffling_is_seeded_and_differs_per_epoch(shards):
    split = shards / "train"
    in_order = _ids(make_loader(split, batch_size=4, shuffle_buffer=0, num_workers=0, seed=0))

    def epochs(seed: int) -> list[list[int]]:
        loader = make_loader(split, batch_size=4, shuffle_buffer=16, num_workers=2, seed=seed, hflip=True)
        return [_ids(loader), _ids(loader)]

    first, again, other = epochs(0), epochs(0), epochs(1)
    assert first == again  # same seed, same worker count: same order, epoch by epoch
    assert first[0] != first[1] and first[0] != other[0] and first[0] != in_order
    assert sorted(first[0]) == sorted(first[1]) == sorted(other[0]) == sorted(in_order)


def test_iter_starts_the_workers_at_once_and_the_epoch_size_is_bounded(shards):
    # The trainer starts the next epoch's loader ahead of its first batch (trainer.batch_stream): iter must start
    # the worker processes, not the first next().
    import multiprocessing

    loader = make_loader(shards / "train", batch_size=3, shuffle_buffer=16, num_workers=2, seed=0)
    before = set(multiprocessing.active_children())
    batches = iter(loader)
    assert len(set(multiprocessing.active_children()) - before) == 2
    sizes = [len(batch["ann_id"]) for batch in batches]
    assert sum(sizes) == loader.samples
    assert loader.expected_batches <= len(sizes) <= loader.expected_batches + loader.num_workers - 1


def test_fewer_shards_than_workers(sample_inputs, tmp_path):
    root = tmp_path / "one"
    run_pack(elsewhere(sample_inputs, root), root / "shards", samples_per_shard=4096, splits=["val"])
    split = root / "shards/val"
    assert len(read_shard_index(split).shards) == 1
    loader = make_loader(split, batch_size=4, shuffle_buffer=8, num_workers=3, seed=0)
    assert loader.num_workers == 1
    ids = _ids(loader)
    assert len(ids) == len(set(ids)) == count_samples(split)


def test_ddp_ranks_read_disjoint_shards(shards, monkeypatch):
    split = shards / "train"
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        loader = make_loader(split, batch_size=4, shuffle_buffer=0, num_workers=2, seed=0)
        per_rank.append(_ids(loader))
        assert loader.samples == len(per_rank[-1])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(json.loads(s["json"])["ann_id"] for s in split_samples(split))
    monkeypatch.setenv("WORLD_SIZE", str(len(read_shard_index(split).shards) + 1))
    with pytest.raises(PipelineError, match="cannot feed .* DDP ranks.*samples_per_shard"):
        make_loader(split, batch_size=4, shuffle_buffer=0, num_workers=0, seed=0)


def test_bad_arguments_and_paths_name_the_fix(shards, tmp_path):
    split = shards / "train"
    with pytest.raises(PipelineError, match="jitter"):
        make_loader(split, batch_size=4, shuffle_buffer=0, num_workers=0, seed=0, jitter=0.6)
    with pytest.raises(PipelineError, match="on_corrupt_shard: expected stop or skip"):
        make_loader(split, batch_size=4, shuffle_buffer=0, num_workers=0, seed=0, on_corrupt_shard="ignore")
    with pytest.raises(PipelineError, match=r"holds the splits \['train', 'val'\], pick one"):
        count_samples(shards)
    with pytest.raises(PipelineError, match="not a shard folder"):
        count_samples(tmp_path)


# --------------------------------------------------------------------------------------------------
# untrusted and damaged shards


class _CreatesFile:
    """Unpickling this object opens ``path`` for writing, i.e. runs code: what a hostile .pyd/.pth would do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _payload(ext: str, target: Path) -> bytes:
    if ext.endswith("npy"):  # an object array: np.load(allow_pickle=True) unpickles its items
        out = io.BytesIO()
        np.save(out, np.array([_CreatesFile(target)], dtype=object), allow_pickle=True)
        return out.getvalue()
    return pickle.dumps(_CreatesFile(target))


@pytest.mark.parametrize(
    "member,num_workers",
    [
        ("{key}.pyd", 0),
        ("{key}.pyd", 2),
        ("{key}.pth", 0),
        ("{key}.pickle", 0),
        ("{key}.npy", 0),
        ("extra.pkl", 0),
        ("README", 0),
    ],
)
def test_a_planted_pickle_is_refused_before_anything_is_decoded(shards, tmp_path, member, num_workers):
    split = _copy(shards / "val", tmp_path)
    shard = read_shard_index(split).shards[0].name
    key = json.loads(split_samples(split)[0]["json"])["ann_id"]
    name, target = member.format(key=key), tmp_path / "pwned"
    data = _payload(name, target)
    with tarfile.open(split / shard, "a") as tar:  # a hand-edited shard, shipped with a matching index
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    _reindex(split, shard)
    for on_corrupt in ("stop", "skip"):  # never skippable: the source of the shards is not to be trusted
        loader = make_loader(
            split, batch_size=4, shuffle_buffer=0, num_workers=num_workers, seed=0, on_corrupt_shard=on_corrupt
        )
        with pytest.raises(ForeignMemberError, match=f"shard .*{shard} holds member '{name}'.*nothing was decoded"):
            _ids(loader)
    assert not target.exists()
    if name != "README":  # the payload is live: unpickled the usual way it does run
        np.load(io.BytesIO(_payload(name, tmp_path / "proof")), allow_pickle=True) if name.endswith(
            "npy"
        ) else pickle.loads(_payload(name, tmp_path / "proof"))
        assert (tmp_path / "proof").exists()


@pytest.mark.parametrize("index_agrees", [False, True], ids=["stale-index", "index-rewritten"])
def test_a_truncated_shard_stops_or_is_skipped_and_counted(shards, tmp_path, index_agrees):
    split = _copy(shards / "train", tmp_path)
    victim = read_shard_index(split).shards[1]
    data = (split / victim.name).read_bytes()
    (split / victim.name).write_bytes(data[: len(data) // 2])
    if index_agrees:  # size and sha256 match, so the tar reader itself must notice
        _reindex(split, victim.name)
    everything = [json.loads(s["json"])["ann_id"] for s in split_samples(shards / "train")]
    lost = [json.loads(s["json"])["ann_id"] for s in split_samples(shards / "train")[8:16]]

    with pytest.raises(CorruptShardError, match=f"{victim.name}.*on_corrupt_shard=skip"):
        _ids(make_loader(split, batch_size=4, shuffle_buffer=0, num_workers=0, seed=0))
    loader = make_loader(split, batch_size=4, shuffle_buffer=8, num_workers=2, seed=0, on_corrupt_shard="skip")
    ids = _ids(loader)
    assert sorted(ids) == sorted(set(everything) - set(lost))
    assert [Path(p.shard).name for p in loader.skipped] == [victim.name]


# --------------------------------------------------------------------------------------------------
# augmentation


def _l_shape(side: int) -> dict:
    """An asymmetric L: mask, two teachers' logits (2, side, side) with (logits > 0) == mask exactly,
    image red = 255 * mask."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    mask = ((xx > 0.3) & (xx < 0.45) & (yy > 0.2) & (yy < 0.8)) | ((yy > 0.65) & (yy < 0.8) & (xx > 0.3) & (xx < 0.75))
    logits = np.where(mask, 2.0 + yy, -2.0 - xx).astype(np.float32)
    logits = np.stack([logits, 3 * logits])
    image = np.stack([mask * 255, xx * 255, yy * 255], axis=-1).astype(np.uint8)
    return {
        "image": image,
        "mask": mask.astype(np.uint8),
        "logits": logits,
        "confidence": np.ones(2, np.float32),
        "record": {},
    }


def test_hflip_mirrors_image_mask_and_logits_together():
    sample, rng = _l_shape(96), np.random.default_rng(0)
    flipped = 0
    for _ in range(20):
        out = augment(sample, Frame(96, 96), 96, rng, hflip=True, jitter=0.0)
        mirrored = np.array_equal(out["mask"], sample["mask"][:, ::-1])
        flipped += mirrored
        for name in ("image", "mask", "logits"):
            width_axis = 2 if name == "logits" else 1  # logits (K, H, W); image (H, W, 3), mask (H, W)
            assert np.array_equal(out[name], np.flip(sample[name], width_axis) if mirrored else sample[name])
        assert np.array_equal(out["logits"] > 0, np.broadcast_to(out["mask"].astype(bool), (2, 96, 96)))
    assert 0 < flipped < 20


def test_jitter_moves_one_window_over_image_mask_and_logits():
    frame = Frame(crop_size=96, stored_size=144)  # context margin 0.25: 24 stored pixels per side
    sample, rng = _l_shape(144), np.random.default_rng(1)
    centre = augment(sample, frame, 96, rng, hflip=False, jitter=0.0)
    assert np.array_equal(centre["mask"], sample["mask"][24:120, 24:120])
    views = [augment(sample, frame, 96, rng, hflip=True, jitter=0.2) for _ in range(20)]
    for out in views:
        mask = out["mask"].astype(bool)
        assert out["image"].shape == (96, 96, 3) and out["logits"].shape == (2, 96, 96)
        assert out["logits"].dtype == np.float32 and np.allclose(out["logits"][1], 3 * out["logits"][0], atol=1e-4)
        assert (mask == (out["logits"] > 0)).mean() > 0.98  # only boundary pixels may differ (bilinear vs nearest)
        assert (mask == (out["image"][:, :, 0] > 127)).mean() > 0.98
    assert sum(not np.array_equal(v["mask"], centre["mask"]) for v in views) >= 18


def test_loader_augments_consistently_with_a_stored_context_margin(sample_inputs, tmp_path):
    root = tmp_path / "margin"
    cfg = own_store(elsewhere(sample_inputs, root), root / "stores", context_margin=0.25)
    run_pack(cfg, root / "shards", splits=["train"])
    split = root / "shards/train"
    assert read_shard_index(split).frame == Frame(96, 144)
    plain = next(iter(make_loader(split, batch_size=16, shuffle_buffer=0, num_workers=0, seed=0)))
    jittered = next(
        iter(make_loader(split, batch_size=16, shuffle_buffer=0, num_workers=0, seed=0, hflip=True, jitter=0.2))
    )
    assert torch.equal(plain["ann_id"], jittered["ann_id"]) and not torch.equal(plain["gt_mask"], jittered["gt_mask"])
    for batch in (plain, jittered):
        assert batch["image"].shape == (16, 3, 96, 96)
        assert ((batch["teacher_logits"] > 0).float() == batch["gt_mask"]).float().mean() > 0.95
