"""ONNX files of an MCT-quantised student, and their checks in onnxruntime.

Two formats, both written by MCT's exporter (``mct.exporter.pytorch_export_model``)::

    export_quantized(int8, "student_int8_mctq.onnx", fmt="mctq")          # what imxconv-pt accepts
    export_quantized(int8, "student_int8_fakequant.onnx", fmt="fakequant")  # fast evaluation copy
    report = compare_onnx("student_int8_fakequant.onnx", rgb, int8_logits)   # max |onnx - torch|

* **MCTQ**: standard ONNX ops plus MCT's custom quantiser ops (domain ``mct_quantizers``:
  ``ActivationPOTQuantizer``, ``WeightsSymmetricQuantizer``). The IMX500 converter reads the thresholds from
  them. onnxruntime runs it only with ``mct_quantizers.get_ort_session_options()`` (their CPU kernels) and
  about 300x slower than float, so it is checked on a few samples.
* **fake-quant**: the same arithmetic with ``QuantizeLinear`` / ``DequantizeLinear`` pairs; plain onnxruntime
  runs it at float speed. The converter rejects it ([USOP]), so it is for evaluation only.

Both take the camera-input model's tensors: input ``float32 (B, 3, S, S)`` RGB in [0, 1] (ImageNet
normalisation is inside the graph, see ``deploy/quantize.py``), output ``float32 (B, 1, S, S)`` logits on the
INT8 output grid (mask = logit > 0). The batch axis is dynamic.

torch >= 2.9 defaults ``torch.onnx.export`` to the dynamo exporter, which breaks MCT 2.5's exporter (it needs
``onnxscript`` and then rejects MCT's ``dynamic_axes``); :func:`legacy_torch_onnx_exporter` makes MCT's call use
the TorchScript exporter (``dynamo=False``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from picosam_pipeline.errors import PipelineError
from picosam_pipeline.evaluate.onnx_runtime import is_mctq, ort_session, run_onnx

Format = Literal["mctq", "fakequant"]
OPSET = 20  # MCT 2.5's default for torch >= 2.4; the converter accepts it
METADATA_PREFIX = "picosam."  # our keys in the ONNX metadata_props, beside MCT's (mct_version, tpc_*)

# The files the deploy stages hand to each other, named once here so that no stage imports another. quantize
# writes these into quantize.out_dir:
QUANTIZE_MCTQ_FILE = "quantized_mctq.onnx"
QUANTIZE_FAKEQUANT_FILE = "quantized_fakequant.onnx"
QUANTIZE_PROBE_FILE = "probe.npz"  # inputs and torch INT8 logits, for export's onnxruntime check
QUANTIZE_REPORT_FILE = "report.json"
# export copies the two models into export.out_dir under the network's name (the converter names the network
# after the file stem) with their input/output contract, which package reads:
NETWORK = "picosam_int8"
EXPORT_MCTQ_FILE = f"{NETWORK}.onnx"
EXPORT_FAKEQUANT_FILE = f"{NETWORK}_fakequant.onnx"
CONTRACT_FILE = f"{NETWORK}.json"


# --------------------------------------------------------------------------------------------------
# export


@contextlib.contextmanager
def legacy_torch_onnx_exporter() -> Iterator[None]:
    """Within the block, ``torch.onnx.export`` defaults to ``dynamo=False`` (MCT calls it without the argument)."""
    import torch

    original = torch.onnx.export
    torch.onnx.export = functools.partial(original, dynamo=False)
    try:
        yield
    finally:
        torch.onnx.export = original


def export_quantized(
    quantized: Any, path: str | Path, *, fmt: Format, input_size: int, metadata: dict[str, str] | None = None
) -> Path:
    """Write an MCT-quantised module as ONNX in format ``fmt``; ``metadata`` goes into ``metadata_props``.

    The exporter swaps the module's quantisers for export versions in place, so it gets a copy.
    """
    import model_compression_toolkit as mct
    import torch

    fmts = {"mctq": mct.exporter.QuantizationFormat.MCTQ, "fakequant": mct.exporter.QuantizationFormat.FAKELY_QUANT}
    device = next(quantized.parameters()).device
    example = torch.rand(1, 3, input_size, input_size, device=device)  # traces the graph; values do not matter
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with legacy_torch_onnx_exporter():
        mct.exporter.pytorch_export_model(
            model=copy.deepcopy(quantized),
            save_model_path=str(path),
            repr_dataset=lambda: iter([[example]]),
            quantization_format=fmts[fmt],
            onnx_opset_version=OPSET,
        )
    stamp_metadata(path, metadata or {})
    return path


# MCT stamps facts of the machine that wrote the file into metadata_props: the interpreter's build string
# (sys.version: its build date and compiler) and torch's build tag (2.13.0+cpu, 2.13.0+cu130). Neither changes a
# weight, but kept as they are the same model would be another file on every machine, and DVC's hash with it (seen:
# Python 3.12 with the registry's torch gave the exact graph and weights of 3.11 with the CPU build, in another file).
# Nothing reads them (mct_quantizers only writes them); the torch release stays.
MACHINE_METADATA = ("python_version",)  # dropped
RELEASE_ONLY_METADATA = ("framework_version",)  # "2.13.0+cu130" -> "2.13.0"


def stamp_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    """Add (or replace) ``picosam.<key>`` entries in an ONNX file's ``metadata_props``, keeping MCT's own but for
    the machine-dependent ones (:data:`MACHINE_METADATA`, :data:`RELEASE_ONLY_METADATA`)."""
    model = onnx.load(str(path))
    keys = {METADATA_PREFIX + k: str(v) for k, v in metadata.items()}
    kept = [
        (p.key, p.value.split("+", 1)[0] if p.key in RELEASE_ONLY_METADATA else p.value)
        for p in model.metadata_props
        if p.key not in keys and p.key not in MACHINE_METADATA
    ]
    del model.metadata_props[:]
    for key, value in kept + sorted(keys.items()):
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """All ``metadata_props`` of an ONNX file (MCT's and ours)."""
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


# --------------------------------------------------------------------------------------------------
# what the graph says


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, shape (``"batch"`` for a dynamic axis) and element type."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str


def graph_io(path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs (initialisers excluded) and outputs of an ONNX graph."""
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        t = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "batch") for d in t.shape.dim)
        dims = tuple("batch" if i == 0 and isinstance(d, str) else d for i, d in enumerate(dims))
        return TensorSpec(value.name, dims, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name)

    return [spec(v) for v in graph.input if v.name not in initializers], [spec(v) for v in graph.output]


@dataclass(frozen=True)
class OutputGrid:
    """The INT8 grid of the graph output: ``step`` per level, signed or not, ``bits`` levels wide."""

    step: float
    signed: bool
    bits: int

    @property
    def range(self) -> tuple[float, float]:
        """Smallest and largest representable logit."""
        if self.signed:
            return -(2 ** (self.bits - 1)) * self.step, (2 ** (self.bits - 1) - 1) * self.step
        return 0.0, (2**self.bits - 1) * self.step


def output_grid(path: str | Path) -> OutputGrid:
    """Quantisation grid of the graph output (one INT8 level of the logits), read from the last quantiser.

    MCTQ: the ``ActivationPOTQuantizer`` that writes the output, step ``threshold / 2 ** (num_bits - signed)``.
    Fake-quant: the ``DequantizeLinear`` that writes it: its scale, and int8 or uint8 zero point.

    Raises:
        PipelineError: the output is not written by a quantiser (a float model).
    """
    graph = onnx.load(str(path)).graph
    output = graph.output[0].name
    producer = next((n for n in graph.node if output in n.output), None)
    if producer is not None and producer.op_type == "ActivationPOTQuantizer":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in producer.attribute}
        bits, signed = int(attrs["num_bits"]), bool(attrs["signed"])
        return OutputGrid(float(attrs["threshold"]) / 2 ** (bits - signed), signed, bits)
    if producer is not None and producer.op_type == "DequantizeLinear":
        zero_point = _constant(graph, producer.input[2])
        return OutputGrid(float(_constant(graph, producer.input[1])), zero_point.dtype == np.int8, 8)
    raise PipelineError(
        f"{path}: the output {output!r} is not written by a quantiser (found "
        f"{producer.op_type if producer else 'no node'}); it is not an MCT-quantised export"
    )


def output_step(path: str | Path) -> float:
    """One INT8 level of the output logits (:func:`output_grid`)."""
    return output_grid(path).step


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray:
    """Value of an initialiser or a ``Constant`` node output."""
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in graph.node:
        if n.op_type == "Constant" and name in n.output:
            return numpy_helper.to_array(n.attribute[0].t)
    raise KeyError(name)


# --------------------------------------------------------------------------------------------------
# checks in onnxruntime


@dataclass(frozen=True)
class OnnxCheck:
    """onnxruntime output of one ONNX file against the quantised torch model's logits on the same inputs."""

    file: str
    format: str
    samples: int
    max_abs_diff: float  # largest |onnx - torch| over all logits
    max_diff_steps: float  # the same in output quantisation steps (1 step = one INT8 level)
    mean_diff_steps: float  # mean |onnx - torch| in output steps
    mask_agreement: float  # share of pixels where (onnx > 0) == (torch > 0)
    seconds_per_sample: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_onnx(path: str | Path, rgb: np.ndarray, reference: np.ndarray, *, batch: int = 8) -> OnnxCheck:
    """Run ``path`` on ``rgb`` (N, 3, S, S) in onnxruntime and compare with ``reference`` (N, 1, S, S) logits."""
    from tqdm import tqdm

    session = ort_session(path)
    step = output_step(path)
    start = time.perf_counter()
    outs = [
        run_onnx(session, rgb[i : i + batch])
        for i in tqdm(range(0, len(rgb), batch), desc=f"onnxruntime {Path(path).name}", unit="batch", disable=None)
    ]
    seconds = time.perf_counter() - start
    logits = np.concatenate(outs)
    if logits.shape != reference.shape:
        raise PipelineError(
            f"{path}: onnxruntime returned logits of shape {logits.shape}, the torch model {reference.shape}"
        )
    diff = np.abs(logits - reference)
    return OnnxCheck(
        file=str(path),
        format="mctq" if is_mctq(path) else "fakequant",
        samples=len(rgb),
        max_abs_diff=float(diff.max()),
        max_diff_steps=float(diff.max()) / step,
        mean_diff_steps=float(diff.mean()) / step,
        mask_agreement=float(np.mean((logits > 0) == (reference > 0))),
        seconds_per_sample=seconds / max(len(rgb), 1),
    )
