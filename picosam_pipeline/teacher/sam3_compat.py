"""What the registry's ``sam3`` 0.1.4 wheel needs to run as a teacher, done from outside its files.

Nothing here edits site-packages; each workaround answers one breakage measured with that wheel (each has a test in
``tests/teacher/test_sam3.py``) and is scoped to the SAM3 build and forward pass:

* :func:`import_sam3`: ``sam3.model.edt`` imports ``triton`` at module level (a CUDA kernel of the video
  tracker; the image paths never call it). Where triton is not installed (every CPU-only machine), a stand-in for
  that one module is registered in ``sys.modules`` before ``sam3`` is imported; its only function raises a
  ``RuntimeError`` naming triton. ``triton`` itself stays absent, as torch expects on such a machine.
* :func:`bpe_vocabulary`: the wheel lacks the CLIP BPE vocabulary ``bpe_simple_vocab_16e6.txt.gz`` that its
  tokenizer reads (the default ``bpe_path`` points into the missing ``assets/``). ``open_clip_torch`` ships the
  same file; it is located without importing open_clip and checked against the CLIP vocabulary's sha256.
* :class:`DeviceMap`: ``position_encoding.py`` and ``decoder.py`` create caches with a hard-coded
  ``device="cuda"`` (upstream issues #406, #550, #587; on ``cuda:1`` they would land on ``cuda:0``), the tracker's
  RoPE does so via ``torch.device("cuda")``, and ``geometry_encoders.py`` calls ``Tensor.pin_memory()`` on every
  box prompt, which needs CUDA. A ``TorchFunctionMode`` maps a bare ``"cuda"`` device to the teacher's device and
  makes ``pin_memory`` a no-op off CUDA; the build runs under it on every device, the forward pass only off CUDA.
* :func:`seeded_sam3_build`: two text-encoder parameters (``positional_embedding``, ``text_projection``) are made
  with ``torch.empty`` and never initialised (a checkpoint overwrites them), so random-weight scores are NaN and
  differ between processes. The build runs with torch's ``fill_uninitialized_memory`` (uninitialised floats
  become NaN), then every parameter or buffer still holding NaN is drawn from the seed: a scan, not a list, so
  any other such tensor is caught too.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from picosam_pipeline.errors import PipelineError

SAM3_VERSION = "0.1.4"  # the release these workarounds were measured on
SAM3_EXTRA = "pip install 'picosam-pipeline[sam3]'"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# sha256 of OpenAI CLIP's clip/bpe_simple_vocab_16e6.txt.gz (1,356,917 bytes), the file sam3's tokenizer expects
# (its tokenizer_ve.py is CLIP's SimpleTokenizer); open_clip_torch 3.3.0 ships it byte for byte.
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
UNINITIALISED_STD = 0.02  # std of the normal draw for parameters the package leaves uninitialised (ViT/CLIP scale)


# --------------------------------------------------------------------------------------------------
# import


def import_sam3() -> types.SimpleNamespace:
    """The ``sam3`` entry points the teachers use: ``build_sam3_image_model``, ``Sam3Processor``, ``FindStage``,
    ``Prompt``, ``interpolate`` (the processor's mask resize).

    Raises:
        PipelineError: ``sam3`` is not installed (names the extra), or is another release than 0.1.4.
    """
    try:
        with _triton_placeholder(), warnings.catch_warnings():
            # sam3's video modules decorate functions with autocast(device_type="cuda") at import: on a CUDA-less
            # torch each says "CUDA is not available ... Disabling autocast", about code the image teachers never run.
            warnings.filterwarnings("ignore", message=r".*CUDA is not available.*", category=UserWarning)
            from sam3.model.data_misc import FindStage, interpolate
            from sam3.model.geometry_encoders import Prompt
            from sam3.model.sam3_image_processor import Sam3Processor
            from sam3.model_builder import build_sam3_image_model
    except ImportError as err:
        raise PipelineError(
            f"teacher.model=sam3 needs the optional sam3 package, which cannot be imported ({err}); install it "
            f"with {SAM3_EXTRA} (its checkpoint facebook/sam3 is gated on Hugging Face), or use a SAM2 "
            "teacher, e.g. --set teacher.model=sam2.1_hiera_tiny"
        ) from None
    version = importlib.metadata.version("sam3")
    if version != SAM3_VERSION:
        raise PipelineError(
            f"sam3 {version} is installed, but the teacher adapter is made for sam3 {SAM3_VERSION} (it works around "
            f"that release's packaging); install it with {SAM3_EXTRA}"
        )
    return types.SimpleNamespace(
        build_sam3_image_model=build_sam3_image_model,
        Sam3Processor=Sam3Processor,
        FindStage=FindStage,
        Prompt=Prompt,
        interpolate=interpolate,
    )


def _edt_unavailable(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(
        "sam3's euclidean distance transform (video tracker) is a triton kernel, and triton (a "
        "CUDA-only package) is not installed; the image teachers do not use it"
    )


@contextlib.contextmanager
def _triton_placeholder() -> Iterator[None]:
    """Let ``import sam3`` pass where triton is not installed.

    The module that imports triton, ``sam3.model.edt`` (one function, ``edt_triton``, used by the video tracker's
    mask post-processing), is registered in ``sys.modules`` as a stand-in whose ``edt_triton`` raises. A stand-in
    for ``triton`` itself would not do: torch's own modules (inductor, imported by torchvision) ask whether
    ``triton`` imports and then import its submodules.
    """
    if "sam3.model.edt" not in sys.modules and importlib.util.find_spec("triton") is None:
        edt = types.ModuleType("sam3.model.edt", "picosam-pipeline's stand-in: triton is not installed")
        edt.edt_triton = _edt_unavailable
        sys.modules["sam3.model.edt"] = edt
    yield


# --------------------------------------------------------------------------------------------------
# the tokenizer's vocabulary


def bpe_vocabulary() -> tuple[Path, str]:
    """``(path, sha256)`` of the CLIP BPE vocabulary for sam3's tokenizer.

    Looks beside the ``sam3`` package first (a source checkout has ``assets/``), then in ``open_clip_torch``
    (found with ``find_spec``, which does not import it).

    Raises:
        PipelineError: no copy found (names the extra), or a copy whose sha256 is not CLIP's.
    """
    candidates = []
    for package, relative in (("sam3", Path("..") / "assets" / BPE_FILE), ("open_clip", Path(BPE_FILE))):
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            candidates.append((Path(folder) / relative).resolve())
    found = [p for p in candidates if p.is_file()]
    if not found:
        raise PipelineError(
            f"the CLIP BPE vocabulary {BPE_FILE} that sam3's tokenizer reads is not installed (the sam3 wheel does "
            f"not ship it; open_clip_torch does): install the extra with {SAM3_EXTRA}"
        )
    digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
    if digest != BPE_SHA256:
        raise PipelineError(
            f"{found[0]} has sha256 {digest}, not the CLIP vocabulary's {BPE_SHA256}; reinstall the package that "
            f"provides it ({SAM3_EXTRA})"
        )
    return found[0], digest


# --------------------------------------------------------------------------------------------------
# devices


def _is_bare_cuda(device: Any) -> bool:
    """``"cuda"`` or ``torch.device("cuda")``: the package's hard-coded default, not a chosen GPU."""
    if isinstance(device, str):
        return device == "cuda"
    return isinstance(device, torch.device) and device.type == "cuda" and device.index is None


class DeviceMap(TorchFunctionMode):
    """Inside this mode a bare ``"cuda"`` device (a ``device=`` argument, ``Tensor.to("cuda")``, ``Tensor.cuda()``)
    means ``device``, and ``Tensor.pin_memory()`` is a no-op unless ``device`` is a CUDA device.

    ``cuda:N`` keeps its index: the caches sam3 builds with ``device="cuda"`` land on the teacher's GPU, not on
    ``cuda:0``. Off CUDA, pinned memory only speeds up host-to-GPU copies, so skipping it changes no value.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = torch.device(device)

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.pin_memory and self.device.type != "cuda":
            return args[0]
        if func is torch.Tensor.cuda and not (args[1:] or kwargs.get("device") is not None):
            return args[0].to(self.device)
        if _is_bare_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": self.device}
        if func is torch.Tensor.to and len(args) > 1 and _is_bare_cuda(args[1]):
            args = (args[0], self.device, *args[2:])
        return func(*args, **kwargs)


def forward_context(device: torch.device) -> contextlib.AbstractContextManager:
    """The context for sam3 forward passes on ``device``: :class:`DeviceMap` off CUDA (``pin_memory`` on box
    prompts), nothing on CUDA (every forward-time device there is already the model's)."""
    return contextlib.nullcontext() if torch.device(device).type == "cuda" else DeviceMap(device)


# --------------------------------------------------------------------------------------------------
# random weights


def seeded_sam3_build(
    build: Callable[[], torch.nn.Module], seed: int, device: torch.device
) -> tuple[torch.nn.Module, list[str]]:
    """Run ``build`` (which must build on the CPU) under :class:`DeviceMap` for ``device``, its random init drawn
    from ``seed`` on the CPU generator; then draw every parameter or buffer the package left uninitialised.

    Returns the model and the names of the tensors drawn after the build (``N(0, 0.02)`` from a generator seeded
    with ``seed``): bit-identical in every process, whatever ``device`` is. The global RNG and torch's
    deterministic-algorithms settings are restored.
    """
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            # fill_uninitialized_memory takes effect only with deterministic algorithms on; warn_only keeps ops
            # without a deterministic kernel running (they only warn).
            torch.utils.deterministic.fill_uninitialized_memory = True
            torch.use_deterministic_algorithms(True, warn_only=True)
            with DeviceMap(device):
                model = build()
        finally:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
            torch.utils.deterministic.fill_uninitialized_memory = previous[2]
    generator = torch.Generator().manual_seed(seed)
    drawn = []
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and bool(torch.isnan(tensor).any()):
                tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * UNINITIALISED_STD)
                drawn.append(name)
    return model, drawn
