"""Check a teacher-logit store against its teacher: recompute a random sample of instances and compare.

A teammate who pulled a store (``dvc pull``) can trust it without recomputing it all:
:func:`verify_store` rebuilds the teacher from the configuration the store records (refusing when the
checkpoint's sha256, or the random-weights digest, differs from the recorded one), rereads the same index rows
(refusing when their digest differs), recomputes ``sample`` random finished instances exactly as the stage does
(:func:`runner.predict_crops`: one encoder pass per image, the image's sampled prompts in one batch) and
compares them with the stored values.

The figures (:class:`VerifyReport`): the share of stored values equal to the recomputation pushed through the
same codec (1.0 when the teacher recomputes bit-identically), the largest logit difference after the codec,
the largest sigmoid difference between the stored logits and the recomputed float32 logits, and decision flips
(``logit > 0``). The store passes when the sigmoid difference is within the codec's bound
(``codec.SIGMOID_ERROR_BOUND``) plus ``tolerance``, which allows for teacher recomputation noise (another
device, bf16 kernels).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from picosam_pipeline.config import RuntimeConfig, TeacherConfig, build
from picosam_pipeline.data.checksums import sha256_file
from picosam_pipeline.device import Runtime, resolve_runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.teacher.codec import SIGMOID_ERROR_BOUND, decode_logits, encode_logits
from picosam_pipeline.teacher.executors import compute_threads
from picosam_pipeline.teacher.runner import (
    InstanceRows,
    TeacherSpec,
    instance_rows,
    load_pixels,
    predict_crops,
    teacher_session,
)
from picosam_pipeline.teacher.store import LogitStore, open_store


@dataclass(frozen=True)
class VerifyReport:
    """How far a store's values are from a fresh teacher run on ``instances`` sampled instances."""

    instances: int
    images: int
    pixels: int
    identical_share: float  # stored values equal to encode(recomputed): 1.0 = bit-identical recomputation
    max_logit_diff: float  # |decode(stored) - decode(encode(recomputed))|: the logit difference after the codec
    max_sigmoid_diff: float  # |sigmoid(decode(stored)) - sigmoid(recomputed float32)|
    flipped_pixels: int  # (decode(stored) > 0) != (recomputed > 0)
    bound: float  # the codec's largest sigmoid error
    tolerance: float
    teacher: str
    runtime: str

    @property
    def ok(self) -> bool:
        return self.max_sigmoid_diff <= self.bound + self.tolerance

    def format(self) -> str:
        verdict = "OK" if self.ok else "FAILED: the stored logits differ from the teacher by more than the codec allows"
        lines = [
            ("stored values identical to the recomputation", f"{self.identical_share:.2%}"),
            ("max |delta logit| after the codec", f"{self.max_logit_diff:.4f}"),
            (
                "max |delta sigmoid| vs the float32 teacher",
                f"{self.max_sigmoid_diff:.5f}  (codec bound {self.bound:.5f} + tolerance {self.tolerance:g})",
            ),
            ("decision flips (logit > 0)", f"{self.flipped_pixels} of {self.pixels:,} pixels"),
        ]
        return "\n".join(
            [
                f"recomputed {self.instances} instances of {self.images} images with {self.teacher} on {self.runtime}",
                *(f"  {label:<46} {value}" for label, value in lines),
                verdict,
            ]
        )


def verify_store(
    path: str | Path,
    sample: int = 16,
    *,
    seed: int = 0,
    device: str = "auto",
    index: str | None = None,
    checkpoint: str | None = None,
    tolerance: float = 1e-4,
    backend: str | None = None,
    onnx_dir: str | None = None,
) -> VerifyReport:
    """Recompute ``sample`` random finished instances of the store at ``path`` and compare (module docstring).

    Args:
        index: the instance index the store was made from (default: the path the store records).
        checkpoint: the teacher checkpoint (default: the path the store records); its sha256 must match. Refused for a
            store made with random weights (it could only be ignored).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; the precision is the one the store records.
        backend: ``torch`` or ``onnxruntime`` to recompute with that backend instead of the one the store
            records (a cross-check of one backend against the other). onnx_dir: where exported teachers are cached.

    Raises:
        PipelineError: not a store, nothing finished, a different checkpoint / random weights / index rows.
    """
    store = open_store(path)
    cfg, runtime = _teacher_config(store, checkpoint), _runtime(store, device)
    if backend is not None:
        cfg = dataclasses.replace(cfg, backend=backend)
    if onnx_dir is not None:
        cfg = dataclasses.replace(cfg, onnx_dir=onnx_dir)
    cfg.validate("verify-logits teacher")
    rows = _aligned_rows(store, index or cfg.index, cfg)
    done = np.flatnonzero(np.repeat(store.done_shards(), store.instances_per_shard)[: len(rows)])
    if len(done) == 0:
        raise PipelineError(f"{path}: no finished shard to verify; run the teacher stage first")
    picked = np.sort(np.random.default_rng(seed).choice(done, size=min(sample, len(done)), replace=False))

    session = teacher_session(TeacherSpec.of(cfg, runtime, threads=compute_threads()))
    _check_weights(store, session.teacher.metadata)
    sampled = rows.take(picked)
    recomputed = []
    with session.lock:
        for _, sl in sampled.images():
            group = sampled.take(sl)
            session.teacher.set_image(load_pixels(group))
            recomputed.append(predict_crops(session.teacher, cfg, group)[0])
    fresh = np.concatenate(recomputed)
    stored = store.read_raw(picked)
    stored_logits = decode_logits(stored, store.codec)
    fresh_stored = encode_logits(fresh, store.codec)
    return VerifyReport(
        instances=len(picked),
        images=len(sampled.images()),
        pixels=int(stored.size),
        identical_share=float((stored == fresh_stored).mean()),
        max_logit_diff=float(np.abs(stored_logits - decode_logits(fresh_stored, store.codec)).max()),
        max_sigmoid_diff=float(np.abs(_sigmoid(stored_logits) - _sigmoid(fresh)).max()),
        flipped_pixels=int(((stored_logits > 0) != (fresh > 0)).sum()),
        bound=SIGMOID_ERROR_BOUND[store.codec.name],
        tolerance=tolerance,
        teacher=f"{cfg.model} ({session.teacher.metadata.get('weights')}, backend {cfg.backend}; the store was made "
        f"with {store.attrs['teacher']['build'].get('backend', 'torch')})",
        runtime=runtime.describe(),
    )


def _teacher_config(store: LogitStore, checkpoint: str | None) -> TeacherConfig:
    """The recorded teacher config, with a checkpoint whose sha256 matches the recorded one."""
    recorded = store.attrs.get("teacher", {})
    if "config" not in recorded or "build" not in recorded:
        raise PipelineError(
            f"{store.path}: the store does not record its teacher configuration (not written by the "
            "teacher-logits stage); it cannot be verified"
        )
    cfg = build(TeacherConfig, recorded["config"], "store attribute teacher.config")
    expected = recorded.get("checkpoint_sha256")
    if expected is None:  # random weights: rebuilt from the recorded seed, digest checked after the build
        if checkpoint is not None:  # it would be ignored: say so instead of verifying something else than asked
            raise PipelineError(
                f"--checkpoint {checkpoint!r} does not apply: {store.path} was made with RANDOM weights "
                f"(seed {store.attrs['teacher']['build'].get('seed')}, no checkpoint), so it is checked "
                "against the same random weights; rerun without --checkpoint, or make the store with "
                "that checkpoint (teacher.checkpoint) first"
            )
        return dataclasses.replace(cfg, checkpoint=None, allow_random_weights=True)
    path = Path(checkpoint or cfg.checkpoint or "")
    if not path.is_file():
        raise PipelineError(
            f"{store.path} was made with checkpoint {cfg.checkpoint!r} (sha256 {expected}), which is not at "
            f"{str(path)!r}; fetch it (`picosam-pipeline fetch {cfg.model}`) or pass --checkpoint PATH"
        )
    found = sha256_file(path)
    if found != expected:
        raise PipelineError(
            f"refusing to verify {store.path}: checkpoint {str(path)!r} has sha256 {found}, the store was "
            f"made with {expected}; pass --checkpoint with the checkpoint the store was made with"
        )
    return dataclasses.replace(cfg, checkpoint=str(path), allow_random_weights=False)


def _runtime(store: LogitStore, device: str) -> Runtime:
    build_meta = store.attrs["teacher"]["build"]
    precision = "fp32" if build_meta.get("autocast", "fp32") == "fp32" else "bf16"
    return resolve_runtime(RuntimeConfig(device=device, precision=precision, seed=int(build_meta.get("seed") or 0)))


def _check_weights(store: LogitStore, metadata: dict) -> None:
    expected = store.attrs["teacher"]["build"].get("weights_sha256")
    if expected is not None and metadata.get("weights_sha256") != expected:
        raise PipelineError(
            f"refusing to verify {store.path}: the rebuilt random-weight teacher has weights digest "
            f"{metadata.get('weights_sha256')}, the store was made with {expected} (another sam2 or "
            "torch version draws other random weights)"
        )


def _aligned_rows(store: LogitStore, index: str, cfg: TeacherConfig) -> InstanceRows:
    """The index rows the store was made from; refuses when they or the store's ids differ."""
    rows = instance_rows(index, cfg.splits, cfg.prompt)
    recorded = store.attrs.get("rows", {}).get("sha256")
    if rows.digest() != recorded or len(rows) != store.n_instances:
        raise PipelineError(
            f"{index}: these index rows are not the ones {store.path} was made from (digest "
            f"{rows.digest()[:12]}..., the store recorded {str(recorded)[:12]}...); pass --index with "
            "the index it was made from, or rerun the teacher stage"
        )
    done = np.flatnonzero(np.repeat(store.done_shards(), store.instances_per_shard)[: len(rows)])
    meta = store.read_meta(done)
    if not (
        np.array_equal(meta["ann_id"], rows.ann_id[done]) and np.array_equal(meta["image_id"], rows.image_id[done])
    ):
        raise PipelineError(
            f"{store.path}: its ann_id / image_id arrays do not follow the index rows; the store is "
            "damaged: delete it and rerun the teacher stage"
        )
    return rows


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x.astype(np.float64)))
