"""A pickled object that runs code when it is unpickled: what a malicious checkpoint carries.

``CodeOnLoad(marker)`` pickles to "call write_marker(marker)", so a loader that unpickles it leaves the file
``marker`` behind; the tests put one in a checkpoint and check that it is refused and the file never appears.
"""

from __future__ import annotations

from pathlib import Path


def write_marker(path: str) -> None:
    """What the checkpoint would run when unpickled."""
    Path(path).write_text("code from a checkpoint ran")


class CodeOnLoad:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return write_marker, (str(self.marker),)
