"""Make ``import torchvision`` work on a CPU-only torch with the registry's CUDA-linked torchvision.

torchvision 0.28.0 is only published CUDA-linked; next to the CPU build of torch 2.13 its compiled ops
library (``torchvision/_C.so``) cannot load, and ``import torchvision`` then fails with
``RuntimeError: operator torchvision::nms does not exist`` because its fake-tensor registrations expect
``torchvision::nms`` / ``torchvision::qnms``. That also breaks ``sam2.sam2_image_predictor`` and
``model_compression_toolkit`` (both import torchvision).

:func:`install` puts a tiny finder on ``sys.meta_path`` that, when torchvision is first imported, checks
whether ``_C`` loads; only when it does not, it defines the two operator schemas and a plain CPU ``nms``
(nothing else in this project calls torchvision's compiled ops). Where torchvision loads natively (CUDA
machines, matched builds) it does nothing. It runs at package import, so DataLoader and dask worker
processes that unpickle anything from ``picosam_pipeline`` get it too.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_applied = False


def _native_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision: nothing to fix
    import torch

    for folder in spec.submodule_search_locations:
        for lib in Path(folder).glob("_C*.so"):
            try:
                torch.ops.load_library(str(lib))
                return True
            except OSError:
                return False
    return True


def _nms_cpu(boxes, scores, iou_threshold: float):
    """Greedy NMS, same contract as ``torchvision.ops.nms``: kept indices by decreasing score."""
    import torch

    order = torch.argsort(scores, descending=True)
    boxes = boxes[order].float()
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas - inter).clamp(min=1e-12)
        suppressed |= iou > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long)]


def apply() -> bool:
    """Define ``torchvision::nms``/``qnms`` if torchvision's own ops cannot load. Returns True if it did."""
    global _applied
    if _applied or _native_ops_load():
        return False
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", _nms_cpu, "CPU")
    # Keep the Library object alive for the life of the process (its destructor removes the ops).
    sys.modules[__name__]._torchvision_lib = lib  # type: ignore[attr-defined]
    _applied = True
    return True


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Runs :func:`apply` once, just before the first ``import torchvision``, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        apply()
        return None  # let the normal finders import it


def install() -> None:
    """Arrange for :func:`apply` to run before torchvision is imported (or now, if it already was not)."""
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionFinder())
