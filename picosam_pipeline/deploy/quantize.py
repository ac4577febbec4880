"""INT8 post-training quantisation of a trained student for the Sony IMX500, with Sony's MCT.

::

    model = camera_input_model(student, normalization)       # float: RGB in [0, 1] -> logits
    calib = representative_batches(train_batches, 10)         # list of float32 (B, 3, S, S) RGB in [0, 1]
    int8 = quantize(model, calib, tpc_version="4.0")           # MCT PTQ (or GPTQ with gptq_epochs > 0)
    logits = int8(rgb)                                        # float32 (B, 1, S, S) on the INT8 output grid

**Where the ImageNet normalisation happens.** On the IMX500 the network's input tensor is the camera's
RGB: the converter gives it 8 bits, unsigned, scale 1/256 (``dnnParams.xml``: ``bitsPerElement="8"
scale="0.00390625" format="unsigned"``), i.e. pixel value ``p`` reaches the network as ``p / 256``, and neither
``imxconv-pt`` (its options are memory report, input persistency and logging) nor picamera2 can apply a
per-channel mean/std. So the normalisation goes into the graph: :func:`camera_input_model` puts a frozen
depthwise 1x1 conv computing ``(x - mean) / std`` per channel in front of the student, and MCT quantises it
like any conv (per-channel weights, so ``1 / std`` is exact; the bias stays float). The student's own first
conv then zero-pads the *normalised* image, exactly as in training, which folding the affine into that conv
could not do (``students.normalize``). The only mismatch left is ``p / 256`` on the chip against ``p / 255`` in
training: a 0.4 % gain, at most one input step (1/256). MCT sets the input's range from the representative
crops; natural images reach 1.0, so it picks the unsigned [0, 1) grid the camera needs (the package stage
checks ``dnnParams.xml`` for it).

MCT reads the model with ``torch.fx``, folds BatchNorm into the convs, collects activation statistics on
the representative batches and picks power-of-two activation thresholds and symmetric per-channel 8-bit
weights, as the IMX500 target platform (``edgemdt_tpc``, version from params) prescribes. The result is a
``torch.nn.Module`` that simulates the chip's arithmetic in float; it exists only in this process (MCT's
exporter, ``onnx_export.py``, is its only serialisation).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from picosam_pipeline.errors import PipelineError
from picosam_pipeline.train.students import NORMALIZATION, Normalization

IMX500 = "imx500"


# --------------------------------------------------------------------------------------------------
# the camera-input model


def normalization_conv(normalization: Normalization = NORMALIZATION) -> nn.Conv2d:
    """Frozen depthwise 1x1 conv with bias: ``y_c = x_c / std_c - mean_c / std_c`` on (B, 3, H, W).

    A plain ``nn.Conv2d`` (not a subclass) so MCT's target platform maps it to the CONV operator set.
    """
    conv = nn.Conv2d(3, 3, kernel_size=1, groups=3, bias=True)
    std = torch.tensor(normalization.std, dtype=torch.float32)
    mean = torch.tensor(normalization.mean, dtype=torch.float32)
    with torch.no_grad():
        conv.weight.copy_((1.0 / std).view(3, 1, 1, 1))
        conv.bias.copy_(-mean / std)
    conv.requires_grad_(False)
    return conv


class CameraInputModel(nn.Module):
    """A student that takes the camera's RGB: float32 (B, 3, S, S) in [0, 1] -> (B, 1, S, S) logits.

    ``normalize`` is :func:`normalization_conv`; ``student`` is the trained student, unchanged.
    """

    def __init__(self, student: nn.Module, normalization: Normalization = NORMALIZATION) -> None:
        super().__init__()
        self.normalize = normalization_conv(normalization)
        self.student = student

    def forward(self, rgb: Tensor) -> Tensor:
        return self.student(self.normalize(rgb))


def camera_input_model(
    student: nn.Module, normalization: Mapping[str, Sequence[float]] | Normalization | None = None
) -> CameraInputModel:
    """Wrap a student (eval mode) with its input normalisation; ``normalization`` as a checkpoint's meta stores it.

    ``None`` means the ImageNet statistics of ``students.NORMALIZATION``.
    """
    if normalization is None:
        norm = NORMALIZATION
    elif isinstance(normalization, Normalization):
        norm = normalization
    else:
        norm = Normalization(mean=tuple(normalization["mean"]), std=tuple(normalization["std"]))
    return CameraInputModel(student, norm).eval()


# --------------------------------------------------------------------------------------------------
# representative data and MCT


def representative_batches(batches: Iterable[Mapping[str, Any]], n_batches: int) -> list[Tensor]:
    """The first ``n_batches`` ``image`` tensors (float32 (B, 3, S, S) RGB in [0, 1]) of a loader, on the CPU.

    Kept in memory because MCT iterates the representative data more than once (GPTQ once per epoch).

    Raises:
        PipelineError: the loader yields no batch.
    """
    out = []
    for batch in batches:
        out.append(torch.as_tensor(batch["image"], dtype=torch.float32).cpu())
        if len(out) == n_batches:
            break
    if not out:
        raise PipelineError(
            "the representative data loader yielded no batch; point quantize.train_shards at a non-empty "
            "split written by the pack stage"
        )
    return out


def target_platform(tpc_version: str) -> Any:
    """The IMX500 target platform capabilities of ``edgemdt_tpc`` at ``tpc_version`` (e.g. "4.0").

    Raises:
        PipelineError: a version ``edgemdt_tpc`` does not know (the message lists the available ones).
    """
    from edgemdt_tpc import get_target_platform_capabilities

    try:
        return get_target_platform_capabilities(tpc_version=str(tpc_version), device_type=IMX500)
    except AssertionError as err:  # edgemdt_tpc reports an unknown version with an assert
        raise PipelineError(f"quantize.tpc_version: {err}".replace("Error: ", "")) from None


def quantize(
    model: nn.Module, batches: Sequence[Tensor], *, tpc_version: str = "4.0", gptq_epochs: int = 0
) -> nn.Module:
    """Quantise ``model`` for the IMX500 with MCT; returns the quantised module in eval mode.

    Args:
        model: float module, fx-traceable (e.g. a :class:`CameraInputModel`); not modified.
        batches: representative inputs, each float32 (B, 3, S, S) RGB in [0, 1].
        tpc_version: IMX500 target platform version of ``edgemdt_tpc``.
        gptq_epochs: 0 = post-training quantisation (PTQ); N > 0 = gradient-based PTQ (GPTQ) for N epochs over
            ``batches``, which tunes the weight rounding against the float model (slower, usually closer).

    The quantised module runs on MCT's working device (CUDA when present); :class:`RgbModel` moves inputs there.
    """
    import model_compression_toolkit as mct

    tpc = target_platform(tpc_version)
    logging.getLogger("Model Compression Toolkit").setLevel(logging.ERROR)  # per-op-set notes, not problems

    def representative_data_gen():
        for x in batches:
            yield [x]

    model = copy.deepcopy(model).eval()
    if gptq_epochs > 0:
        gptq_config = mct.gptq.get_pytorch_gptq_config(n_epochs=gptq_epochs)
        quantized, _ = mct.gptq.pytorch_gradient_post_training_quantization(
            model, representative_data_gen, gptq_config=gptq_config, target_platform_capabilities=tpc
        )
    else:
        quantized, _ = mct.ptq.pytorch_post_training_quantization(
            in_module=model, representative_data_gen=representative_data_gen, target_platform_capabilities=tpc
        )
    return quantized.eval()


# --------------------------------------------------------------------------------------------------
# running and measuring


class RgbModel:
    """A :class:`~picosam_pipeline.evaluate.predict.CropModel` for a module that takes RGB in [0, 1] itself.

    Used for both the float :class:`CameraInputModel` and its INT8 twin, so that the two are scored through
    the same code and differ only by quantisation. ``(B, 3, S, S)`` float32 numpy -> ``(B, 1, S, S)`` float32.
    """

    def __init__(self, module: nn.Module, name: str, input_size: int) -> None:
        self.module = module.eval()
        self.name = name
        self.input_size = input_size
        self.device = next(module.parameters()).device

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.ascontiguousarray(rgb, dtype=np.float32), device=self.device)
        with torch.inference_mode():
            return self.module(x).float().cpu().numpy()


def quantized_weight_bytes(quantized: nn.Module) -> int:
    """Deployed weight bytes of an MCT-quantised module, counted from what it holds.

    Every weight MCT quantised (the ``weights_quantizers`` of its wrappers) is one byte; biases stay float32
    (the IMX500 target does not quantise them). This is ``students.folded_int8_bytes`` of the float model plus
    4 bytes per output channel of each conv that had neither a bias nor a BatchNorm (the students' stride-2
    ``down`` convs): MCT gives every conv a bias, zeros there.
    """
    from mct_quantizers import PytorchQuantizationWrapper

    total = 0
    for module in quantized.modules():
        if isinstance(module, PytorchQuantizationWrapper):
            layer = module.layer
            total += sum(getattr(layer, name).numel() for name in module.weights_quantizers)
            if getattr(layer, "bias", None) is not None:
                total += 4 * layer.bias.numel()
    return total
