"""The environment variables the pipeline reads, checked as strictly as params.yaml's keys.

A launcher's variables (torchrun's ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) are read here and only here: a value
that is not a decimal integer, or out of its range (a negative rank, ``RANK`` not below ``WORLD_SIZE``), stops the
run before any work with one paragraph that names the variable, its value, what is allowed and the fix, instead of
a ``ValueError`` traceback or a rank that silently writes nothing. (``PICOSAM_ON_LOCKED`` is read and checked by
``outputs.py``.)
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

from picosam_pipeline.config_schema import ConfigError

MAX_WORLD_SIZE = 65_536  # processes in one torchrun job: far above any cluster this pipeline trains on
# What each launcher variable is, for the messages.
TORCHRUN = (
    "torchrun sets it for every process it starts (`torchrun --nproc_per_node N -m picosam_pipeline.cli run-stage "
    "train`); for a single process unset WORLD_SIZE, RANK and LOCAL_RANK"
)


class EnvironmentVariableError(ConfigError):
    """An environment variable the pipeline reads holds a value it cannot use; the message names it and the fix."""


class DistributedRanks(NamedTuple):
    """This process's place in a torchrun job (``(0, 1, 0)`` for a single process)."""

    rank: int
    world_size: int
    local_rank: int


def env_int(name: str, default: int | None, minimum: int, maximum: int, purpose: str) -> int | None:
    """The integer in ``$name``, or ``default`` when it is not set.

    ``purpose`` says what the variable is, what sets it and how to fix it (the message's second half).

    Raises:
        EnvironmentVariableError: the value is empty, not a decimal integer, or outside ``minimum..maximum``.
    """
    text = os.environ.get(name)
    if text is None:
        return default
    allowed = str(minimum) if minimum == maximum else f"an integer {minimum}..{maximum}"
    if not re.fullmatch(r"\s*[+-]?\d+\s*", text):
        raise EnvironmentVariableError(f"environment variable {name}={text!r}: expected {allowed}, {purpose}")
    value = int(text)
    if not minimum <= value <= maximum:
        raise EnvironmentVariableError(f"environment variable {name}={value}: expected {allowed}, {purpose}")
    return value


def distributed_ranks() -> DistributedRanks:
    """``(rank, world_size, local_rank)`` from torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``.

    Unset, the process is alone: ``WORLD_SIZE`` 1, ``RANK`` 0, ``LOCAL_RANK`` = ``RANK``. Checked: ``WORLD_SIZE``
    in ``1..65536``; ``RANK`` set when ``WORLD_SIZE`` > 1, and ``RANK`` and ``LOCAL_RANK`` in ``0..WORLD_SIZE - 1``
    (a process numbered past the job's size would wait forever for ranks that never come, or write nothing).

    Raises:
        EnvironmentVariableError: naming the variable, its value and the range.
    """
    world_size = env_int("WORLD_SIZE", 1, 1, MAX_WORLD_SIZE, f"the number of processes of the job; {TORCHRUN}")
    last = world_size - 1
    if world_size > 1 and "RANK" not in os.environ:
        raise EnvironmentVariableError(
            f"environment variable RANK is not set but WORLD_SIZE={world_size}: every process of a multi-process "
            f"job needs its rank 0..{last}; {TORCHRUN}"
        )
    below = f"WORLD_SIZE={world_size}" if "WORLD_SIZE" in os.environ else "WORLD_SIZE (not set: a single process)"
    rank = env_int("RANK", 0, 0, last, f"this process's number in the job, below {below}; {TORCHRUN}")
    local_rank = env_int(
        "LOCAL_RANK", rank, 0, last, f"this process's number on its machine, below {below}; {TORCHRUN}"
    )
    return DistributedRanks(rank, world_size, local_rank)


def check_local_device(local_rank: int, device_count: int) -> None:
    """Raise :class:`EnvironmentVariableError` unless ``LOCAL_RANK`` names one of this machine's ``device_count``
    CUDA devices (each process of a job drives the GPU of its local rank)."""
    if not 0 <= local_rank < device_count:
        raise EnvironmentVariableError(
            f"environment variable LOCAL_RANK={local_rank}: this machine has {device_count} CUDA device(s), "
            f"numbered 0..{device_count - 1}, one per process; start at most {device_count} processes per machine "
            f"(torchrun --nproc_per_node {device_count}) or make more GPUs visible (CUDA_VISIBLE_DEVICES)"
        )
