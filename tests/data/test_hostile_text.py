"""Hostile text and file types: params YAML, instances JSON and image paths give one-paragraph errors or bad-input
records, within bounds, never a traceback, a hang or unbounded memory."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from picosam_pipeline.config import ConfigError, load_config
from picosam_pipeline.data.coco import load_annotations
from picosam_pipeline.data.images import BadImageError, header_sizes, load_image
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.stages.prepare import run
from picosam_pipeline.untrusted import UntrustedInputError, json_depth, load_json_bounded, safe_text
from tests.helpers.prepare_dataset import Dataset, annotation, encode, noise_rgb, prepare_config, prepare_outputs


@contextmanager
def _deadline(seconds: int):
    """Fail (rather than hang the suite) when the block takes longer than ``seconds``: a FIFO opened for reading."""

    def expired(*_):
        raise TimeoutError(f"still running after {seconds}s: something blocked")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------------------
# params YAML


def _billion_laughs() -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    return "\n".join(lines) + "\ntrain:\n  steps: *a9\n"


def test_params_yaml_bomb_is_refused_fast_naming_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(_billion_laughs())
    start = time.monotonic()
    with _deadline(20), pytest.raises(ConfigError, match=r"params\.yaml' expands to more than 100,000 values"):
        load_config(path)
    assert time.monotonic() - start < 1


def test_params_yaml_alias_loop_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: &a\n  steps: *a\n")
    with pytest.raises(ConfigError, match="an alias refers to a value that contains it"):
        load_config(path)


def test_params_file_over_the_size_bound_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"params\.yaml' is larger than the 1,048,576 bytes"):
        load_config(path)


def test_params_integer_too_long_to_convert_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  steps: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"params\.yaml' holds a value that cannot be read"):
        load_config(path)


def test_override_nested_past_the_parser_is_refused():
    with pytest.raises(ConfigError, match=r"override 'train\.steps=\[\[\[.*\.\.\.' is nested deeper"):
        load_config(None, ["train.steps=" + "[" * 50_000])


def test_params_fifo_is_refused_unopened(tmp_path):
    path = tmp_path / "params.yaml"
    os.mkfifo(path)
    with _deadline(20), pytest.raises(ConfigError, match=r"params\.yaml' is a FIFO \(named pipe\), not a regular"):
        load_config(path)


# --------------------------------------------------------------------------------------------------
# instances JSON


def _instances(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "instances.json"
    path.write_text(text)
    return path


def test_instances_integer_too_long_to_convert_stops_with_a_message(tmp_path):
    doc = json.dumps({"images": [], "annotations": [{"id": 1, "image_id": "X"}], "categories": []})
    path = _instances(tmp_path, doc.replace('"X"', "9" * 5000))
    with pytest.raises(PipelineError, match=r"instances\.json: holds a number JSON readers refuse"):
        load_annotations(path)


def test_instances_fifo_is_refused_unopened(tmp_path):
    path = tmp_path / "instances.json"
    os.mkfifo(path)
    with _deadline(20), pytest.raises(PipelineError, match=r"instances\.json is a FIFO \(named pipe\), not a regular"):
        load_annotations(path)


def test_category_records_of_the_wrong_type_are_reported(tmp_path):
    categories = [{"id": 1, "name": "a\ud800b"}, {"id": 2, "name": {"x": [1]}}, {"name": "no id"}, "text"]
    path = _instances(tmp_path, json.dumps({"images": [], "annotations": [], "categories": categories}))
    annset = load_annotations(path)
    assert annset.categories == {1: "a?b", 2: "2"}
    kinds = [(r.issue.kind, r.issue.action) for r in annset.record_issues]
    assert kinds == [("bad_category_name", "converted")] * 2  # records without an id: their annotations are reported


def test_unicode_names_go_through_prepare_as_records_not_tracebacks(tmp_path):
    # A lone surrogate (a \ud800 escape) has no UTF-8 form: neither a path nor the index can hold it. NUL and RTL
    # marks are text like any other in a category name.
    ds = Dataset(tmp_path)
    ds.images.append({"id": 2, "file_name": "x\udcff.jpg", "width": 8, "height": 6})
    ds.annotations.append(annotation(2, 2))
    split = ds.write()
    doc = json.loads(Path(split.annotations).read_text())
    doc["categories"] = [{"id": 1, "name": "\u202ething\x00\ud800"}]
    Path(split.annotations).write_text(json.dumps(doc))
    run(prepare_config(tmp_path, [split]))
    _, records = prepare_outputs(tmp_path)
    assert sorted(r["kind"] for r in records) == ["bad_category_name", "bad_image_record"]


def test_json_bounded_refuses_depth_nan_and_long_integers():
    assert load_json_bounded(b'{"a": [1, "[[["]}', "x.json") == {"a": [1, "[[["]}
    assert json_depth('"' + 'a\\"' * 100_000) == 0  # an unterminated string: one linear pass
    for text, problem in [
        ("[" * 100_000 + "]" * 100_000, "is nested more than 100 levels"),
        ("[1, NaN]", "NaN is not a JSON number"),
        ("[" + "9" * 5000 + "]", "Exceeds the limit"),
        (b"\xff", "is not UTF-8 text"),
    ]:
        with pytest.raises(UntrustedInputError, match=problem):
            load_json_bounded(text, "x.json")


def test_safe_text_escapes_what_would_reorder_or_hide_text():
    assert safe_text("a\u202eb\x00c\ud800 é名") == "a\\u202eb\\u0000c\\ud800 é名"


# --------------------------------------------------------------------------------------------------
# only regular files are read as images


def _special_file(path: Path, kind: str) -> object:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        return sock  # kept open for the test
    else:
        path.symlink_to("/dev/null")  # a device: /dev/zero would be endless, a regression must not eat memory
    return None


@pytest.mark.parametrize(
    ("kind", "named"),
    [("fifo", "a FIFO"), ("folder", "a folder"), ("socket", "a socket"), ("device", "a character device")],
)
def test_special_files_as_images_are_refused_by_name(tmp_path, kind, named):
    path = tmp_path / "img.jpg"
    keep = _special_file(path, kind)
    with _deadline(20):
        with pytest.raises(BadImageError, match=f"img.jpg' is {named}") as err:
            load_image(path)
        assert err.value.kind == "unreadable"
        with pytest.raises(PipelineError, match=f"img.jpg' is {named}"):
            header_sizes(path)
    del keep


@pytest.mark.parametrize("check_images", [True, False])
def test_prepare_reports_a_fifo_image_and_goes_on(tmp_path, check_images):
    ds = Dataset(tmp_path)
    ds.add_image(2, "pipe.jpg", None)
    split = ds.write()
    os.mkfifo(Path(split.images) / "pipe.jpg")
    with _deadline(60):
        run(prepare_config(tmp_path, [split], check_images=check_images))
    metrics, records = prepare_outputs(tmp_path)
    assert [(r["kind"], r["image_id"]) for r in records] == [("image_unreadable", 2)]
    assert "pipe.jpg' is a FIFO (named pipe)" in records[0]["reason"]
    assert metrics["splits"]["val"]["kept"] == 1


def test_image_symlink_to_a_regular_file_is_still_read(tmp_path):
    target = tmp_path / "real.jpg"
    target.write_bytes(encode(noise_rgb()))
    (tmp_path / "link.jpg").symlink_to(target)
    assert load_image(tmp_path / "link.jpg").pixels.size > 0
