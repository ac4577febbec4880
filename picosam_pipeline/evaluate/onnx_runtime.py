"""Running an exported student in onnxruntime: one session recipe for prediction, evaluation and export checks.

It lives in ``evaluate/`` because ``predict.py`` runs ONNX students and imports only downward; the deploy phase
(``deploy/onnx_export.py``, ``deploy/imx500.py``) imports it from here for its own checks. Tensors: input
``float32 (B, 3, S, S)``, output ``float32 (B, 1, S, S)`` logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from picosam_pipeline.errors import require_extra

MCTQ_DOMAIN = "mct_quantizers"  # MCT's custom quantiser ops, which the IMX500 converter reads


def is_mctq(model_or_path: onnx.ModelProto | str | Path) -> bool:
    """Whether the graph uses MCT's custom quantiser ops (domain ``mct_quantizers``)."""
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path))
    return any(node.domain == MCTQ_DOMAIN for node in model.graph.node)


def ort_session(path: str | Path) -> Any:
    """onnxruntime CPU session that runs the graph as written; MCTQ files get MCT's custom-op library.

    Graph optimisations are off: onnxruntime's rewrites around QuantizeLinear / DequantizeLinear change the
    rounding (measured on a trained PicoSAM3: mean 2.9 output steps from the torch INT8 model with them, 0.8
    without, which is what float accumulation order alone leaves).
    """
    import onnxruntime as ort

    if is_mctq(path):
        require_extra("imx500", f"running {path} (an ONNX file with MCT's quantiser ops)")
        from mct_quantizers import get_ort_session_options

        options = get_ort_session_options()
    else:
        options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # unused-initialiser warnings are noise
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, rgb: np.ndarray) -> np.ndarray:
    """Run a session on float32 (B, 3, S, S) RGB in [0, 1]; returns float32 (B, 1, S, S) logits."""
    (name,) = [i.name for i in session.get_inputs()]
    (logits,) = session.run(None, {name: np.ascontiguousarray(rgb, dtype=np.float32)})
    return np.asarray(logits, dtype=np.float32)
