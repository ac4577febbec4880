"""A streaming reader for COCO / LVIS instances files: the top-level object parsed, its annotations only located.

An instances file is one JSON object whose ``annotations`` array holds nearly all of its bytes (COCO train2017:
860k annotations, 448 MB; LVIS v1 train: 1.27M, 1.1 GB). :func:`read_instances` walks the file through a window
of a few MiB and parses every other top-level value whole (``images``, ``categories``, ...), but of each
annotation keeps only its ``id``, its ``image_id`` and the byte span of its JSON text in the file, 32 bytes
an annotation; the caller reads an annotation's text back from the file when it needs it. So memory stays
at the window, the small arrays and the parsed non-annotation values, whatever the file's size.

The values are those ``json.loads`` gives, and malformed JSON raises the ``JSONDecodeError`` ``json.loads``
raises for the whole file (same message, line and column; the file is re-read whole to get them, on that error
path only). Text must be UTF-8 (``UnicodeDecodeError`` otherwise).
"""

from __future__ import annotations

import codecs
import json
import re
from array import array
from dataclasses import dataclass, field
from typing import IO, Any

# Annotations format detection looks at; the reader keeps them parsed (the rest are only located).
ANNOTATIONS_SAMPLED = 1000
# Text read at a time. A value longer than the window (a huge ``images`` array, a polygon of a million vertices)
# makes the window grow until it fits; it shrinks back once the value is passed.
_CHUNK_BYTES = 4 << 20
# JSON insignificant whitespace (RFC 8259): what may stand between the tokens the reader steps over.
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


@dataclass
class AnnotationSpans:
    """Every entry of the ``annotations`` array, in file order: its ids and the byte span of its JSON text.

    ``ids[i]`` / ``image_ids[i]`` are int64 (``array("q")``); an entry whose ``id`` or ``image_id`` is not an
    integer within int64 (or that is not an object) holds 0 there and is listed in ``unusable`` with the values it
    had and the start of its text, for the caller's report.
    """

    ids: array = field(default_factory=lambda: array("q"))
    image_ids: array = field(default_factory=lambda: array("q"))
    offsets: array = field(default_factory=lambda: array("q"))  # byte offset of the entry's text in the file
    lengths: array = field(default_factory=lambda: array("q"))  # its length in bytes
    unusable: dict[int, tuple[Any, Any, Any]] = field(default_factory=dict)  # entry -> (id, image_id, the value)

    def __len__(self) -> int:
        return len(self.offsets)


def is_int64(value: Any) -> bool:
    """An integer (not a bool) that fits a signed 64-bit integer: what an id stored in the index can be."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


class _Window:
    """The file's text through a sliding window: ``text`` holds the decoded characters from file byte ``base``;
    the reader asks for more with :meth:`fill`, which drops what lies before the position it is at."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text, self.base, self.eof, self.ascii = "", 0, False, True
        self._cursor = (0, 0)  # (character, byte offset) last converted, for windows that are not ASCII

    def fill(self, pos: int, need: int = _CHUNK_BYTES) -> int:
        """Drop ``text[:pos]`` and read until ``need`` characters follow it or the file ends; returns the new
        position of what was at ``pos`` (0)."""
        self.base = self.byte_offset(pos)
        parts, have = [self.text[pos:]], len(self.text) - pos
        while have < need and not self.eof:
            data = self.stream.read(min(max(_CHUNK_BYTES, need - have), 16 * _CHUNK_BYTES))
            self.eof = not data
            parts.append(self.decoder.decode(data, final=self.eof))
            have += len(parts[-1])
        self.text = "".join(parts)
        self.ascii, self._cursor = self.text.isascii(), (0, self.base)
        return 0

    def byte_offset(self, pos: int) -> int:
        """File byte offset of ``text[pos]`` (characters and bytes differ only where the text is not ASCII)."""
        if self.ascii:
            return self.base + pos
        char, byte = self._cursor if pos >= self._cursor[0] else (0, self.base)
        byte += len(self.text[char:pos].encode("utf-8"))
        self._cursor = (pos, byte)
        return byte

    def skip(self, pos: int) -> int:
        """The position after the whitespace at ``pos`` (at least one character follows it unless the file ends)."""
        while True:
            pos = _JSON_WHITESPACE.match(self.text, pos).end()
            if pos < len(self.text) or self.eof:
                return pos
            pos = self.fill(pos)

    def value(self, pos: int) -> tuple[Any, int, int]:
        """``(value, start, end)``: the JSON value at ``pos``, and where it lies once the window holds it whole."""
        while True:
            try:
                value, end = _DECODER.raw_decode(self.text, pos)
            except json.JSONDecodeError:
                if self.eof:
                    raise
            else:
                # A value that ends with the window may go on (a number cut in two): read on and parse again.
                if end < len(self.text) or self.eof:
                    return value, pos, end
            pos = self.fill(pos, 2 * (len(self.text) - pos) + _CHUNK_BYTES)


def read_instances(stream: IO[bytes]) -> tuple[Any, AnnotationSpans]:
    """Parse an instances file from ``stream`` (binary, at its start).

    Returns ``(data, spans)``: ``data`` is what ``json.loads`` gives for the file, except that
    ``data["annotations"]`` holds only its first :data:`ANNOTATIONS_SAMPLED` entries; ``spans`` locates every
    entry. A file that is not a JSON object is parsed whole (there is no annotations array to spare).

    Raises:
        json.JSONDecodeError: as ``json.loads`` of the whole file would.
        RecursionError: JSON nested deeper than the parser allows.
        UnicodeDecodeError: the file is not UTF-8.
    """
    window = _Window(stream)
    try:
        return _read_object(window)
    except json.JSONDecodeError as err:
        stream.seek(0)  # json's own message and position for the whole file; ours only if json accepts the file
        json.loads(stream.read().decode("utf-8"))
        raise err


def _read_object(window: _Window) -> tuple[Any, AnnotationSpans]:
    def expect(char: str, pos: int, what: str) -> int:
        if not window.text.startswith(char, pos):
            raise json.JSONDecodeError(f"Expecting {what}", window.text, pos)
        return window.skip(pos + 1)

    pos = window.skip(window.fill(0))
    spans = AnnotationSpans()
    if not window.text.startswith("{", pos):  # not an object: parsed whole, and refused by the caller's layout check
        window.fill(pos, 1 << 62)
        return json.loads(window.text), spans
    data: dict[str, Any] = {}
    pos = window.skip(pos + 1)
    more = not window.text.startswith("}", pos)
    while more:
        if not window.text.startswith('"', pos):
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", window.text, pos)
        key, _, pos = window.value(pos)
        pos = expect(":", window.skip(pos), "':' delimiter")
        if key == "annotations" and window.text.startswith("[", pos):
            spans, sampled = AnnotationSpans(), []
            pos = window.skip(pos + 1)
            more_entries = not window.text.startswith("]", pos)
            while more_entries:
                value, start, end = window.value(pos)
                _locate(spans, value, window.byte_offset(start), window.byte_offset(end))
                if len(sampled) < ANNOTATIONS_SAMPLED:
                    sampled.append(value)
                pos = window.skip(end)
                more_entries = not window.text.startswith("]", pos)
                if more_entries:
                    pos = expect(",", pos, "',' delimiter")
            data[key], pos = sampled, window.skip(pos + 1)
        else:
            data[key], _, pos = window.value(pos)
            pos = window.skip(pos)
        more = not window.text.startswith("}", pos)
        if more:
            pos = expect(",", pos, "',' delimiter")
    pos = window.skip(pos + 1)
    if pos != len(window.text):
        raise json.JSONDecodeError("Extra data", window.text, pos)
    return data, spans


def _locate(spans: AnnotationSpans, value: Any, start: int, end: int) -> None:
    ann_id, image_id = (value.get("id"), value.get("image_id")) if isinstance(value, dict) else (None, None)
    if not (is_int64(ann_id) and is_int64(image_id)):
        spans.unusable[len(spans)] = (ann_id, image_id, value)
        ann_id = image_id = 0
    spans.ids.append(ann_id)
    spans.image_ids.append(image_id)
    spans.offsets.append(start)
    spans.lengths.append(end - start)
