"""Giving freed memory back to the system: the SAM3 tests build ~4.5 GiB models in the test process."""

from __future__ import annotations

import ctypes
import gc


def give_memory_back() -> None:
    """Collect garbage, then hand the C heap's free pages back to the system (glibc's ``malloc_trim``).

    glibc keeps freed blocks below its mmap threshold (32 MiB at most: nearly all of a model's tensors) in the
    process's heap, so a released model stays resident and the next one adds its own on top: 8.1 GiB for
    tests/teacher/test_sam3.py's two SAM3 builds, measured, against 5.1 GiB with the trim between them. Elsewhere
    than glibc (musl, macOS) there is nothing to call."""
    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
