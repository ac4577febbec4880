"""The teacher factory: the :class:`~picosam_pipeline.teacher.base.Teacher` that ``teacher.model`` and
``teacher.backend`` name (sam2's ``build_sam.py`` in spirit: implementations apart, chosen here)."""

from __future__ import annotations

from picosam_pipeline.config import TeacherConfig
from picosam_pipeline.device import Runtime
from picosam_pipeline.teacher.base import Teacher


def build_teacher(cfg: TeacherConfig, runtime: Runtime) -> Teacher:
    """Build the teacher named by ``cfg.model`` on ``runtime.device``.

    Raises:
        PipelineError: checkpoint missing (and random weights not allowed), unsafe or not matching the
            model; ``sam3`` asked for without the optional ``sam3`` package.
    """
    # Each implementation is imported only when chosen: they pull in different optional packages (sam3,
    # onnxruntime), and every dask worker process builds its teacher through here.
    if cfg.model == "sam3":
        from picosam_pipeline.teacher.sam3_teacher import build_sam3_teacher

        return build_sam3_teacher(cfg, runtime)
    if cfg.backend == "onnxruntime":
        from picosam_pipeline.teacher.sam2_onnx import OrtSam2Teacher

        return OrtSam2Teacher.build(cfg, runtime)
    from picosam_pipeline.teacher.sam2_batched import Sam2Teacher

    return Sam2Teacher.build(cfg, runtime)
