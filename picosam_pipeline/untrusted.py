"""Reading untrusted files and text within bounds: refusals are one-paragraph errors, never hangs or tracebacks.

Datasets, params files and stores come from elsewhere, so every read of one follows three rules:

* **Only regular files are read as data.** A FIFO, socket, device or folder where a file is expected is refused
  by name before anything is read: opening a FIFO for reading blocks until a writer comes (forever), a device
  such as ``/dev/zero`` never ends. :func:`open_regular` opens without blocking (``O_NONBLOCK``) and checks the
  opened file itself (``fstat``), so a path swapped between a check and the open is still caught. Symlinks to
  regular files are followed.
* **Sizes are bounded before the bytes are held**: :func:`read_bounded_bytes` refuses a file over ``max_bytes``.
* **Parsed text is bounded too**: :func:`load_json_bounded` refuses nesting deeper than ``max_depth`` (checked
  by a flat scan before parsing, as Python's parser recurses per level), ``NaN`` / ``Infinity`` literals and
  numbers too long to convert, with what is wrong and where.

Refusals raise :class:`UntrustedInputError` (a :class:`~picosam_pipeline.errors.PipelineError`), whose ``kind``
says why (``missing``, ``not_regular``, ``too_large``, ``unreadable``, ``malformed``); the message names the input
by ``what`` (e.g. ``"params file 'params.yaml'"``). :func:`safe_text` makes an untrusted name printable.
"""

from __future__ import annotations

import json
import os
import re
import stat
import unicodedata
from pathlib import Path
from typing import Any, Literal

from picosam_pipeline.errors import PipelineError

RefusalKind = Literal["missing", "not_regular", "too_large", "unreadable", "malformed"]

# A JSON document nested deeper than this is refused before it is parsed (COCO / LVIS nest 5 levels; Python's
# parser recurses once per level and fails with RecursionError near 1000).
MAX_JSON_DEPTH = 100

_FILE_TYPES = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}
# JSON strings (escapes included; an unterminated one runs to the end, so the scan is linear) and the brackets.
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*+(?:"|\Z)|[\[\]{}]', re.DOTALL)


# Unicode categories safe_text escapes: control, format (bidi overrides), surrogate, private use, unassigned, line
# and paragraph separators.
_UNPRINTABLE = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))


class UntrustedInputError(PipelineError):
    """An untrusted file or text that was refused; ``kind`` says why, the message names it and the fix."""

    def __init__(self, kind: RefusalKind, message: str) -> None:
        super().__init__(message)
        self.kind: RefusalKind = kind

    def __reduce__(self):  # rebuilt from both arguments when pickled (to or from a worker process)
        return type(self), (self.kind, str(self))


def file_type(mode: int) -> str:
    """What a ``st_mode`` is, in words: ``"a regular file"``, ``"a folder"``, ``"a FIFO (named pipe)"``, ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return _FILE_TYPES.get(stat.S_IFMT(mode), "not a regular file")


def require_regular_file(path: str | Path, what: str) -> None:
    """Raise :class:`UntrustedInputError` unless ``path`` is (a symlink to) a regular file; reads nothing.

    For a path handed on to a library that opens it itself; prefer :func:`open_regular`, which checks the file
    it opened.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError) as err:  # ValueError: a NUL in the path
        raise _unreadable(what, err) from None
    if not stat.S_ISREG(mode):
        raise _not_regular(what, mode)


def open_regular(path: str | Path, what: str) -> int:
    """A read-only file descriptor of ``path``, which must be (a symlink to) a regular file; the caller closes it.

    Never blocks: a FIFO is opened non-blocking and refused by its ``fstat`` before any read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as err:
        require_regular_file(path, what)  # a socket cannot be opened at all (ENXIO): name what it is
        raise _unreadable(what, err) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(what, mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bounded_bytes(path: str | Path, what: str, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path``; refused when it holds more than ``max_bytes``."""
    fd = open_regular(path, what)
    with open(fd, "rb") as stream:
        data = stream.read(max_bytes + 1)  # one byte over the bound tells a file over it, whatever fstat said
    if len(data) > max_bytes:
        raise UntrustedInputError(
            "too_large",
            f"{what} is larger than the {max_bytes:,} bytes such a file may have; it is not the file expected "
            "there: point at the right file",
        )
    return data


def load_json_bounded(data: bytes | str, what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON text (UTF-8 bytes or str) that may be hostile: what ``json.loads`` gives, or a refusal.

    Refused: text that is not UTF-8 or not JSON, nesting deeper than ``max_depth``, ``NaN`` / ``Infinity``
    (not JSON), an integer too long for Python to convert (``sys.get_int_max_str_digits``).
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as err:
        raise _malformed(what, f"is not UTF-8 text ({err})") from None
    depth = json_depth(text, max_depth)
    if depth > max_depth:
        raise _malformed(what, f"is nested more than {max_depth} levels deep (no valid file of this kind is)")
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as err:
        raise _malformed(what, f"is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except (ValueError, RecursionError) as err:  # an over-long integer, a NaN/Infinity literal
        raise _malformed(what, f"holds a value JSON readers refuse ({err})") from None


def json_file_or_none(path: str | Path, max_bytes: int) -> Any:
    """The JSON value of the regular file ``path`` (at most ``max_bytes``, nesting bounded), or None when it is
    missing, not a regular file, too large or not JSON: for recognising a file of our own among others."""
    try:
        return load_json_bounded(read_bounded_bytes(path, str(path), max_bytes), str(path))
    except (UntrustedInputError, OSError):  # OSError: a read that fails after the open
        return None


def json_depth(text: str, stop_at: int | None = None) -> int:
    """The deepest nesting of arrays / objects in JSON ``text`` (strings skipped), found by a flat scan.

    Stops counting once ``stop_at`` is exceeded (the result is then ``stop_at + 1``). Malformed text gets a
    best-effort count; the parser reports it.
    """
    depth = deepest = 0
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if stop_at is not None and deepest > stop_at:
                return deepest
        elif token in "]}":
            depth -= 1
    return deepest


def safe_text(value: Any, limit: int = 200) -> str:
    """``value`` as printable one-line text: control, format (RTL overrides), surrogate and unassigned code points
    escaped as ``\\uXXXX``, cut to ``limit`` characters. For names from untrusted files in messages and logs."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(_escaped(c) for c in text[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _escaped(char: str) -> str:
    if unicodedata.category(char) not in _UNPRINTABLE:
        return char
    return f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _malformed(what: str, problem: str) -> UntrustedInputError:
    return UntrustedInputError("malformed", f"{what} {problem}; the file is damaged or not what was expected there")


def _unreadable(what: str, err: BaseException) -> UntrustedInputError:
    if isinstance(err, FileNotFoundError):
        return UntrustedInputError("missing", f"{what} does not exist; check the path")
    if isinstance(err, IsADirectoryError):
        return UntrustedInputError("not_regular", f"{what} is a folder, not a file; point at the file inside it")
    detail = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return UntrustedInputError("unreadable", f"{what} cannot be read ({safe_text(detail)}); check the file")


def _not_regular(what: str, mode: int) -> UntrustedInputError:
    return UntrustedInputError(
        "not_regular",
        f"{what} is {file_type(mode)}, not a regular file; only regular files (or symlinks to them) are read as "
        "data: replace it with the file itself",
    )
