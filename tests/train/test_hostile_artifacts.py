"""Hostile artifacts: a teacher store's metadata and files, WebDataset shards and their index, student checkpoints.

Each is refused with one paragraph (a PipelineError naming the file, member or attribute), never a traceback, a
hang or an allocation of what the file merely claims. FIFOs are opened with a deadline: a regression fails the test
instead of hanging it (the helper writes to the FIFO to release the blocked reader).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from picosam_pipeline.errors import PipelineError
from picosam_pipeline.teacher.codec import get_codec
from picosam_pipeline.teacher.store import open_store
from picosam_pipeline.train.checkpoints import FORMAT, load_checkpoint, load_student
from picosam_pipeline.train.loader import CorruptShardError, make_loader
from picosam_pipeline.train.shards import INDEX_FILE, encode_jpeg, encode_logits_png, encode_mask_png
from tests.helpers.logit_store import make_store, write

T = 16  # stored side of the synthetic shards


def _within(seconds: float, call: Callable[[], object], fifo: Path | None = None) -> object:
    """``call()``'s result or raised error, failing the test if it takes longer (a reader blocked on ``fifo`` is
    released by opening the FIFO for writing, so the thread ends)."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:  # handed to the test thread
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if fifo is not None:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"still running after {seconds} s: blocked reading {fifo}")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome.get("value")


def _replace_with_fifo(path: Path) -> Path:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    os.mkfifo(path)
    return path


# --------------------------------------------------------------------------------------------------
# the teacher's logit store


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    """A complete 10-instance store (4 shards of 3); tests copy it."""
    path = tmp_path_factory.mktemp("store") / "s.zarr"
    write(make_store(path), range(4))
    return path


def _copy(store_path: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(store_path, tmp_path / "s.zarr"))


def _edit_json(file: Path, edit: Callable[[dict], None]) -> None:
    document = json.loads(file.read_text())
    edit(document)
    file.write_text(json.dumps(document))


def _layout(**changes) -> Callable[[Path], None]:
    return lambda p: _edit_json(p / "zarr.json", lambda d: d["attributes"]["logit_store"].update(changes))


HOSTILE_STORES = {
    "malformed-json": (lambda p: (p / "zarr.json").write_text("{not json"), "zarr.json' is not valid JSON"),
    "deeply-nested-json": (lambda p: (p / "zarr.json").write_text("[" * 100_000 + "]" * 100_000), "nested more"),
    "huge-json": (lambda p: (p / "zarr.json").write_bytes(b" " * (2 << 20) + b"{}"), "larger than"),
    "json-list": (lambda p: (p / "logits" / "zarr.json").write_text("[1, 2]"), "holds a JSON list"),
    "n_instances-a-string": (_layout(n_instances="10"), r"logit_store.n_instances is '10'"),
    "n_instances-larger-than-the-arrays": (
        _layout(n_instances=10**12, n_shards=-(-(10**12) // 3)),
        r"array ann_id is int64 of shape \(10,\)",
    ),
    "side-not-the-arrays'": (_layout(side=32), r"array logits .* makes it uint8 of shape \(10, 32, 32\)"),
    "shard-size-not-the-arrays'": (_layout(instances_per_shard=1, n_shards=10, chunk_rows=1), "array confidence"),
    "n_shards-inconsistent": (_layout(n_shards=10**9), "logit_store.n_shards is 1000000000, but 10 instances"),
    "codec-unknown": (_layout(codec=["pickle"]), r"logit_store.codec is \['pickle'\]"),
    "gzip-codec": (
        lambda p: _edit_json(
            p / "logits" / "zarr.json",
            lambda d: d["codecs"][0]["configuration"].update(
                codecs=[{"name": "bytes"}, {"name": "gzip", "configuration": {"level": 1}}]
            ),
        ),
        "Blosc only",
    ),
    "array-metadata-of-the-wrong-structure": (
        lambda p: _edit_json(p / "confidence" / "zarr.json", lambda d: d.update(codecs=[{"name": "gzip"}])),
        "an array's zarr.json is not valid Zarr metadata",
    ),
    "data-file-larger-than-a-shard": (
        lambda p: os.truncate(p / "logits/c/1/0/0", 8 << 30),  # sparse: no disk used
        r"logits/c/1/0/0 holds 8,589,934,592 bytes; a chunk of array logits holds at most",
    ),
    "data-file-a-folder": (
        lambda p: ((p / "logits/c/1/0/0").unlink(), (p / "logits/c/1/0/0").mkdir()),
        "logits/c/1/0/0 is a folder, not a regular file",
    ),
}


@pytest.mark.parametrize("case", HOSTILE_STORES)
def test_hostile_store_metadata_and_files_are_refused_before_use(store_path, tmp_path, case):
    mutate, message = HOSTILE_STORES[case]
    path = _copy(store_path, tmp_path)
    mutate(path)
    with pytest.raises(PipelineError, match=message):
        store = open_store(path)
        store.read_logits(slice(None)), store.read_meta()


@pytest.mark.parametrize("file", ["zarr.json", "logits/zarr.json", "shard_digest/c/1/0", "logits/c/2/0/0"])
def test_a_fifo_in_a_store_is_reported_not_opened(store_path, tmp_path, file):
    path = _copy(store_path, tmp_path)
    fifo = _replace_with_fifo(path / file)
    with pytest.raises(PipelineError, match=r"FIFO \(named pipe\), not a regular file"):
        _within(20, lambda: open_store(path).read_logits(slice(None)), fifo)


# --------------------------------------------------------------------------------------------------
# WebDataset shards and shards.json


def _record(ann_id: int) -> dict:
    return {
        "ann_id": ann_id,
        "image_id": 1,
        "category_id": 1,
        "area": 10.0,
        "split": "train",
        "crop_box": [0, 0, T, T],
        "stored_box": [0.0, 0.0, float(T), float(T)],
        "frame": {"crop_size": T, "stored_size": T},
        "confidence": {"gt": 1.0},
        "logits": {"gt": {"codec": "sigmoid_uint8", "decode": "see the store"}},
    }


def _members(ann_id: int, record: bytes | None = None) -> dict[str, bytes]:
    rng = np.random.default_rng(ann_id)
    mask = (rng.random((T, T)) > 0.5).astype(np.uint8)
    return {
        f"{ann_id}.jpg": encode_jpeg(rng.integers(0, 255, (T, T, 3), dtype=np.uint8), 90),
        f"{ann_id}.mask.png": encode_mask_png(mask),
        f"{ann_id}.logits.gt.png": encode_logits_png(np.where(mask, 200, 50).astype(np.uint8)),
        f"{ann_id}.json": json.dumps(_record(ann_id)).encode() if record is None else record,
    }


def _write_tar(path: Path, members: dict[str, bytes], extra: tuple[tarfile.TarInfo, ...] = ()) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)


def _reindex(split: Path) -> None:
    """Make shards.json list the shard as it is now, as a shard shipped with its own index would."""
    data = (split / "shard-000000.tar").read_bytes()
    _edit_json(
        split / INDEX_FILE, lambda i: i["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    )


def _split(root: Path, record: bytes | None = None, extra: tuple[tarfile.TarInfo, ...] = ()) -> Path:
    """A one-shard split of two samples (the first with the json member ``record``) and its matching shards.json."""
    root.mkdir(parents=True)
    _write_tar(root / "shard-000000.tar", {**_members(100, record), **_members(101)}, extra)
    index = {
        "format": "picosam-shards",
        "format_version": 2,
        "split": "train",
        "samples": 2,
        "frame": {"crop_size": T, "stored_size": T},
        "crop": {"convention": "roi"},
        "teachers": [{"name": "gt", "codec": get_codec("sigmoid_uint8").attrs()}],
        "shards": [{"name": "shard-000000.tar", "samples": 2, "bytes": 0, "sha256": "0" * 64}],
    }
    (root / INDEX_FILE).write_text(json.dumps(index))
    _reindex(root)
    return root


def _load(split: Path, on_corrupt_shard: str = "stop"):
    loader = make_loader(
        split, batch_size=2, shuffle_buffer=0, num_workers=0, seed=0, input_size=T, on_corrupt_shard=on_corrupt_shard
    )
    return loader, [a for batch in loader for a in batch["ann_id"].tolist()]


def test_the_synthetic_split_loads(tmp_path):
    assert _load(_split(tmp_path / "ok"))[1] == [100, 101]


def _kind(name: str, kind: bytes, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


MEMBER_KINDS = {
    "symlink": (_kind("100.link", tarfile.SYMTYPE, linkname="/etc/passwd"), "a symbolic link to '/etc/passwd'"),
    "hardlink": (_kind("100.hard", tarfile.LNKTYPE, linkname="100.jpg"), "a hard link"),
    "directory": (_kind("somedir", tarfile.DIRTYPE), "a folder"),
    "fifo": (_kind("100.fifo", tarfile.FIFOTYPE), "a FIFO"),
    "device": (_kind("100.dev", tarfile.CHRTYPE, devmajor=1, devminor=3), "a character device"),
    "sparse": (_kind("100.jpg", tarfile.GNUTYPE_SPARSE), "a sparse file"),  # would expand to its declared size
}


@pytest.mark.parametrize("kind", MEMBER_KINDS)
def test_a_member_that_is_not_a_plain_file_is_reported_or_skipped_and_counted(tmp_path, kind):
    info, words = MEMBER_KINDS[kind]
    split = _split(tmp_path / "split", extra=(info,))
    with pytest.raises(CorruptShardError, match=f"shard-000000.tar: member '{info.name}' is {words}"):
        _load(split)
    loader, ids = _load(split, "skip")
    assert ids == [] and [Path(p.shard).name for p in loader.skipped] == ["shard-000000.tar"]


def test_a_compressed_shard_is_not_inflated(tmp_path):
    split = _split(tmp_path / "split")
    shard = split / "shard-000000.tar"
    shard.write_bytes(gzip.compress(shard.read_bytes()))  # a gzip bomb would expand without bound
    _reindex(split)
    with pytest.raises(CorruptShardError, match="not a readable uncompressed tar file"):
        _load(split)


HOSTILE_RECORDS = {
    "deeply-nested": (b"[" * 10_000 + b"]" * 10_000, "nested more than 8 levels"),
    "huge": (json.dumps({**_record(100), "pad": "a" * 100_000}).encode(), "over a record's 65,536"),
    "not-an-object": (b"[1, 2]", "is list, not an object"),
    "id-a-string": (json.dumps({**_record(100), "ann_id": "100"}).encode(), "'ann_id' is '100', expected a 64-bit"),
    "id-over-64-bits": (json.dumps({**_record(100), "image_id": 2**80}).encode(), "'image_id' is 1208925819"),
    "crop_box-short": (json.dumps({**_record(100), "crop_box": [1]}).encode(), "'crop_box' is \\[1\\]"),
    "area-nan": (json.dumps({**_record(100), "area": float("nan")}).encode(), "NaN is not a JSON number"),
}


@pytest.mark.parametrize("case", HOSTILE_RECORDS)
def test_a_hostile_json_member_is_a_corrupt_shard_not_a_traceback(tmp_path, case):
    record, message = HOSTILE_RECORDS[case]
    with pytest.raises(CorruptShardError, match=f"shard-000000.tar: sample '100' does not decode.*{message}"):
        _load(_split(tmp_path / "split", record=record))


def test_a_shard_larger_than_listed_is_refused_before_it_is_read(tmp_path, monkeypatch):
    split = _split(tmp_path / "split")
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} was read whole before its size"))
    os.truncate(split / "shard-000000.tar", 8 << 30)  # sparse; reading it would hold 8 GiB
    with pytest.raises(CorruptShardError, match="has 8589934592 bytes but shards.json lists"):
        _load(split)


def test_a_fifo_shard_is_reported_not_opened(tmp_path):
    split = _split(tmp_path / "split")
    fifo = _replace_with_fifo(split / "shard-000000.tar")
    with pytest.raises(CorruptShardError, match=r"shard-000000.tar is a FIFO \(named pipe\), not a regular file"):
        _within(20, lambda: _load(split), fifo)
    loader, ids = _within(20, lambda: _load(split, "skip"), fifo)
    assert ids == [] and len(loader.skipped) == 1


def _entry(**changes) -> Callable[[Path], None]:
    return lambda split: _edit_json(split / INDEX_FILE, lambda i: i["shards"][0].update(changes))


HOSTILE_INDEXES = {
    "deeply-nested": (lambda s: (s / INDEX_FILE).write_text("[" * 100_000 + "]" * 100_000), "nested more"),
    "huge": (lambda s: (s / INDEX_FILE).write_bytes(b" " * (65 << 20)), "larger than the 67,108,864 bytes"),
    "not-an-object": (lambda s: (s / INDEX_FILE).write_text("[]"), "expected a JSON object, got list"),
    "samples-a-string": (_entry(samples="2"), "samples: expected a whole number .* got '2'"),
    "samples-negative": (_entry(samples=-5), "samples: expected a whole number .* got -5"),
    "bytes-absurd": (_entry(bytes=10**15), "bytes: expected a whole number in \\[1, .* got 1000000000000000"),
    "sha256-a-number": (_entry(sha256=5), "sha256: expected 64 hex digits, got 5"),
    "frame-a-string": (
        lambda s: _edit_json(s / INDEX_FILE, lambda i: i["frame"].update(crop_size="16")),
        "frame.crop_size: expected a whole number",
    ),
    "frame-huge": (
        lambda s: _edit_json(s / INDEX_FILE, lambda i: i["frame"].update(stored_size=10**6)),
        "frame.stored_size: expected a whole number in \\[1, 3,072\\]",
    ),
}


@pytest.mark.parametrize("case", HOSTILE_INDEXES)
def test_a_hostile_shard_index_is_one_paragraph(tmp_path, case):
    mutate, message = HOSTILE_INDEXES[case]
    split = _split(tmp_path / "split")
    mutate(split)
    with pytest.raises(PipelineError, match=message):
        _load(split)


def test_a_fifo_shard_index_is_reported_not_opened(tmp_path):
    split = _split(tmp_path / "split")
    fifo = _replace_with_fifo(split / INDEX_FILE)
    with pytest.raises(PipelineError, match=r"shards.json' is a FIFO \(named pipe\)"):
        _within(20, lambda: _load(split), fifo)


# --------------------------------------------------------------------------------------------------
# student checkpoints


def _save(path: Path, meta: object, tensors: object = None, raw_meta: bool = False) -> Path:
    tensors = {"w": torch.zeros(2)} if tensors is None else tensors
    torch.save({"format": FORMAT, "meta": meta if raw_meta else json.dumps(meta), "tensors": tensors}, path)
    return path


STUDENT = {"kind": "student", "student": "picosam2", "input_size": 96}


def _deflated(path: Path) -> Path:
    """A valid checkpoint re-zipped with deflate plus a 64 MiB record of zeros: a zip bomb torch would inflate."""
    _save(path, STUDENT)
    with zipfile.ZipFile(path) as source:
        records = {name: source.read(name) for name in source.namelist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in records.items():
            archive.writestr(name, data)
        archive.writestr(next(iter(records)).split("/")[0] + "/data/99", bytes(64 << 20))
    return path


HOSTILE_CHECKPOINTS = {
    "meta-malformed": (lambda p: _save(p, "{not json", raw_meta=True), "is not valid JSON"),
    "meta-deeply-nested": (lambda p: _save(p, "[" * 100_000 + "]" * 100_000, raw_meta=True), "nested more"),
    "meta-not-text": (lambda p: _save(p, 5, raw_meta=True), "'meta' must be a JSON text"),
    "meta-a-list": (lambda p: _save(p, [1]), "'meta' is a JSON list, not an object"),
    "meta-huge": (lambda p: _save(p, {**STUDENT, "pad": "a" * (2 << 20)}), "found 2,097,"),
    "tensors-not-tensors": (lambda p: _save(p, STUDENT, tensors={"w": 3}), "'tensors' is not a dict of named"),
    "student-a-list": (lambda p: _save(p, {**STUDENT, "student": ["x"]}), r"meta 'student' is \['x'\]"),
    "input_size-a-string": (lambda p: _save(p, {**STUDENT, "input_size": "96"}), "meta 'input_size' is '96'"),
    "deflated-records": (_deflated, "declares records larger than the file itself or compressed"),
    "legacy-format": (
        lambda p: torch.save({"format": FORMAT}, p, _use_new_zipfile_serialization=False),
        "is not a torch.save zip archive",
    ),
    "a-folder": (lambda p: p.mkdir(), "is a folder, not a regular file"),
}


@pytest.mark.parametrize("case", HOSTILE_CHECKPOINTS)
def test_hostile_checkpoint_metadata_is_one_paragraph_naming_the_file(tmp_path, case):
    make, message = HOSTILE_CHECKPOINTS[case]
    path = tmp_path / "student.pt"
    make(path)
    with pytest.raises(PipelineError, match=f"checkpoint '{path}'.*{message}|{message}.*checkpoint '{path}'"):
        load_student(path)


def test_a_fifo_checkpoint_is_reported_not_opened(tmp_path):
    fifo = tmp_path / "student.pt"
    os.mkfifo(fifo)
    with pytest.raises(PipelineError, match=r"student.pt' is a FIFO \(named pipe\), not a regular file"):
        _within(20, lambda: load_checkpoint(fifo), fifo)
