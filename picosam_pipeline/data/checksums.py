"""sha256 of files: asset downloads, checkpoints recorded in a teacher store, shard indexes.

Its own module so that the stages which record a digest (teacher, pack) do not depend on the downloader's code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

CHUNK = 1 << 20  # bytes per hash update


def sha256_file(path: str | Path, hasher: Any = None) -> str:
    """Hex sha256 of a file, read in ``CHUNK`` pieces (optionally continuing ``hasher``)."""
    hasher = hasher or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()
