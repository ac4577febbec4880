"""The streaming instances reader: json.loads' values and errors, annotations located by byte span."""

from __future__ import annotations

import io
import json

import pytest

from picosam_pipeline.data import instances_json
from picosam_pipeline.data.instances_json import read_instances
from tests.helpers.paths import shared_data_or_skip


def _read(text: str | bytes):
    return read_instances(io.BytesIO(text.encode() if isinstance(text, str) else text))


def _texts(data: bytes, spans) -> list[bytes]:
    return [data[o : o + n] for o, n in zip(spans.offsets, spans.lengths)]


@pytest.fixture(params=[4 << 20, 7], ids=["4MiB-window", "7-byte-window"])
def window(request, monkeypatch):
    """The default window, and one of 7 bytes: every value then crosses window ends (numbers cut in two, multi-byte
    characters split between reads, whitespace runs at the end)."""
    monkeypatch.setattr(instances_json, "_CHUNK_BYTES", request.param)
    return request.param


MALFORMED = [
    '{"a": 1,}',
    '{"annotations": [1,]}',
    '{"a": 1',
    '{"annotations": [{"id": 1}',
    '{"annotations": [1 2]}',
    '{"a": 1} x',
    '{"a" 1}',
    "{a: 1}",
    '{"images": [], "annotations": [{"id": 1, "bbox": [1, 2,, 3]}]}',
    "",
    '\ufeff{"a": 1}',
    '{"annotations": [{"id": 1}] "images": []}',
    '{"a": 1}\n\n  ]',
]


@pytest.mark.parametrize("text", MALFORMED)
def test_the_reader_refuses_what_json_refuses_at_the_same_spot(text, window):
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as got:
        _read(text)
    assert (got.value.msg, got.value.lineno, got.value.colno) == (
        expected.value.msg,
        expected.value.lineno,
        expected.value.colno,
    )


def test_values_and_spans_survive_window_ends_numbers_and_non_ascii_text(window):
    """Byte spans must count UTF-8 bytes, not characters, and a number cut by the window must not be read short."""
    record = {
        "info": {"description": "caf\u00e9 \u2603 \U0001f600"},
        "n": 1234567890123,
        "images": [{"id": 5}],
        "annotations": [
            {"id": 1, "image_id": 5, "caption": "\u00e9t\u00e9 \u2603"},
            {"id": 22, "image_id": 5},
            {"id": 333, "image_id": 5, "segmentation": [[1.5, 2.25e3, -3, 4]]},
        ],
        "categories": [{"id": 1, "name": "\u732b"}],
    }
    for text in (
        json.dumps(record, ensure_ascii=False),
        json.dumps(record, indent=3, ensure_ascii=False),
        json.dumps(record),
    ):
        data = text.encode("utf-8")
        parsed, spans = _read(data)
        assert parsed == record
        assert [json.loads(t) for t in _texts(data, spans)] == record["annotations"]
        assert list(spans.ids) == [1, 22, 333] and list(spans.image_ids) == [5, 5, 5] and not spans.unusable


def test_entries_without_int64_ids_are_listed_with_their_values(window):
    anns = [
        {"id": 1, "image_id": 2},
        {"id": 2**63, "image_id": 2},
        [1, 2],
        {"id": True, "image_id": 2},
        {"id": 3, "image_id": "2"},
        {"id": -(2**63), "image_id": 2**63 - 1},
    ]
    data, spans = _read(json.dumps({"images": [], "annotations": anns, "categories": []}))
    assert data["annotations"] == anns and len(spans) == 6
    assert spans.unusable == {
        1: (2**63, 2, anns[1]),
        2: (None, None, anns[2]),
        3: (True, 2, anns[3]),
        4: (3, "2", anns[4]),
    }
    assert list(spans.ids) == [1, 0, 0, 0, 0, -(2**63)] and spans.image_ids[5] == 2**63 - 1


def test_only_the_first_annotations_are_kept_parsed(monkeypatch):
    monkeypatch.setattr(instances_json, "ANNOTATIONS_SAMPLED", 2)
    anns = [{"id": i, "image_id": 1} for i in range(5)]
    data, spans = _read(json.dumps({"annotations": anns}))
    assert data == {"annotations": anns[:2]} and list(spans.ids) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("text", ['[1, {"annotations": []}]', '"x"', "{}", '{"annotations": 5}'])
def test_json_that_is_not_an_instances_object_is_parsed_whole(text, window):
    data, spans = _read(text)
    assert data == json.loads(text) and len(spans) == 0


def test_not_utf8_is_a_unicode_error(window):
    with pytest.raises(UnicodeDecodeError):
        _read(b'{"images": [], "annotations": [{"id": 1, "x": "\xff"}]}')


def test_real_coco_annotations_located_exactly():
    """On the real COCO val file: every span parses to the record json.loads gives, in file order; the rest of the
    file's values are json's."""
    path = shared_data_or_skip("coco-sample", "annotations", "instances_val2017.json")
    raw = path.read_bytes()
    reference = json.loads(raw)
    data, spans = _read(raw)
    assert [json.loads(t) for t in _texts(raw, spans)] == reference["annotations"]
    assert list(zip(spans.ids, spans.image_ids)) == [(r["id"], r["image_id"]) for r in reference["annotations"]]
    assert data["annotations"] == reference["annotations"][:1000]  # the parsed sample format detection reads
    assert {k: v for k, v in data.items() if k != "annotations"} == {
        k: v for k, v in reference.items() if k != "annotations"
    }
