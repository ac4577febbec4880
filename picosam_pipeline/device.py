"""Device and precision, chosen once at the entry point and handed to every stage.

Nobody downstream calls ``.cuda()`` or picks a dtype: they use ``runtime.device`` and ``runtime.autocast()``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from picosam_pipeline.config import ConfigError, RuntimeConfig, check_device

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Runtime:
    """The resolved device and autocast dtype (``None`` = plain fp32)."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    seed: int

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` for the chosen dtype, or a no-op context for fp32."""
        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        dtype = "fp32" if self.autocast_dtype is None else f"{str(self.autocast_dtype).removeprefix('torch.')} autocast"
        return f"{self.device} ({dtype})"


def resolve_runtime(cfg: RuntimeConfig) -> Runtime:
    """Pick the device (CUDA when present for ``auto``) and precision (bf16 autocast on CUDA for ``auto``).

    Raises:
        ConfigError: CUDA asked for but not available.
    """
    import torch

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    check_device(cfg.device, "runtime.device")  # also for configs built in code (predict --device, verify-logits)
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"runtime.device: {cfg.device!r} asked for but this torch ({torch.__version__}) sees no CUDA device; "
                "use --set runtime.device=cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"runtime.device: {cfg.device!r} asked for but this machine has {torch.cuda.device_count()} "
                f"CUDA device(s), numbered from 0 (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
            )
    if cfg.precision == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else None
    elif cfg.precision == "bf16":
        dtype = torch.bfloat16
    else:
        dtype = None
    if (
        dtype is torch.bfloat16
        and device.type == "cpu"
        and torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "NO AVX", "AVX2")
    ):
        # Without AVX512/AMX bf16 instructions torch emulates bf16 matmuls: a 1024^2 matmul measured 8.9 s
        # in bf16 vs 0.16 s in fp32 on this project's 2-core AVX2 machines.
        warnings.warn(
            f"runtime.precision=bf16 on a CPU with only {torch.backends.cpu.get_cpu_capability()} runs far slower "
            "than fp32; "
            "use --set runtime.precision=fp32 (or auto) on this machine",
            stacklevel=2,
        )
    return Runtime(device=device, autocast_dtype=dtype, seed=cfg.seed)
