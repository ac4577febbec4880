"""Logit codecs: teacher logits (float32) <-> the values the logit store keeps (uint8 or float16).

Every codec keeps the mask decision exactly: ``decode(encode(x)) > 0`` wherever ``x > 0`` and nowhere
else, so a student trained on stored targets sees the teacher's masks unchanged. Values near the decision
boundary are nudged across it when rounding alone would flip them.

=================  ======  =====================================================  =======================
codec              stored  decode (``q`` = stored value)                          |sigmoid error|
=================  ======  =====================================================  =======================
``sigmoid_uint8``  uint8   ``p = clip(q / 254, 1/1016, 1015/1016)``,               <= 1/254 (0.0039)
                           ``logit = log(p / (1 - p))``, logits in [-6.92, 6.92]
``linear_uint8``   uint8   ``logit = (q - 128) * 0.25``, logits in [-32, 31.75]    up to 1/16 near 0
``float16``        float16 ``logit = float32(q)``                                  ~1e-4
=================  ======  =====================================================  =======================

``sigmoid_uint8`` (the default) spends its 255 levels evenly in probability, where the distillation losses
(MSE / BCE / Dice on ``sigmoid(logits)``) measure the teacher; it saturates beyond |logit| ~ 6.2, where
``sigmoid`` is within 0.002 of 0 or 1 (levels 0 and 254 decode to the middle of their bins, ``p = 1/1016``
and ``1015/1016``). ``q = 127`` decodes to exactly 0 (``p = 0.5``), which is why the scale is 254, not 255.
Decoded values are fixed points: re-encoding them gives the same ``q``. ``linear_uint8`` is the PicoSAM-style int8
("scale 0.25 covers SAM2's +-32") kept for comparison; ``float16`` is what PicoSAM3's ``ann_{id}.pt`` files hold.

A reader with plain zarr needs no code from here: the ``logits`` array's attributes carry the rule
``v = (q - offset) * scale``, then, if ``quantity == "sigmoid"``, ``logit = log(p / (1 - p))`` with
``p = clip(v, p_min, p_max)`` (see :meth:`LogitCodec.attrs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from picosam_pipeline.untrusted import safe_text

if TYPE_CHECKING:
    import torch

CodecName = Literal["sigmoid_uint8", "float16", "linear_uint8"]


@dataclass(frozen=True)
class LogitCodec:
    """How logits become stored values: ``v = (q - offset) * scale`` is the sigmoid or the logit itself."""

    name: str
    dtype: str  # numpy dtype of the stored values
    quantity: Literal["sigmoid", "logit"]  # what (q - offset) * scale is
    scale: float
    offset: float
    shuffle: Literal["noshuffle", "shuffle", "bitshuffle"]  # Blosc pre-filter, see BLOSC_SHUFFLE
    formula: str  # the decode rule in words, for people

    @property
    def p_clip(self) -> tuple[float, float]:
        """Probabilities are clipped to the middle of the end levels' bins before the logit (sigmoid codec only).

        Level 0 holds ``p`` in ``[0, scale / 2)``; decoding it to ``scale / 4`` halves the worst error there
        and keeps decoded values fixed points of the encoder (``scale / 2`` itself would round either way).
        """
        quarter = self.scale / 4.0
        return quarter, 1.0 - quarter

    def attrs(self) -> dict[str, Any]:
        """JSON attributes that let a plain-zarr reader decode ``q`` without this module."""
        out: dict[str, Any] = {
            "codec": self.name,
            "stored_dtype": self.dtype,
            "quantity": self.quantity,
            "scale": self.scale,
            "offset": self.offset,
            "decode": self.formula,
            "mask": "logit > 0 (the codec preserves this decision exactly)",
        }
        if self.quantity == "sigmoid":
            out["p_min"], out["p_max"] = self.p_clip
        return out


# Blosc-zstd pre-filter per codec: the smallest of noshuffle / shuffle / bitshuffle on logits of real COCO masks
# (bench/logit_storage.py prints the three sizes per codec). Byte shuffle is a no-op on uint8.
BLOSC_SHUFFLE = {"sigmoid_uint8": "noshuffle", "linear_uint8": "bitshuffle", "float16": "shuffle"}

CODECS: dict[str, LogitCodec] = {
    "sigmoid_uint8": LogitCodec(
        "sigmoid_uint8",
        "uint8",
        "sigmoid",
        1.0 / 254.0,
        0.0,
        BLOSC_SHUFFLE["sigmoid_uint8"],
        "p = clip(q / 254, 1/1016, 1015/1016); logit = log(p / (1 - p))",
    ),
    "linear_uint8": LogitCodec(
        "linear_uint8",
        "uint8",
        "logit",
        0.25,
        128.0,
        BLOSC_SHUFFLE["linear_uint8"],
        "logit = (q - 128) * 0.25",
    ),
    "float16": LogitCodec("float16", "float16", "logit", 1.0, 0.0, BLOSC_SHUFFLE["float16"], "logit = float32(q)"),
}


# Largest |sigmoid(decode(encode(x))) - sigmoid(x)| over all finite x, per codec (the table above):
# sigmoid_uint8: half a level from rounding, a whole level (1/254) where the decision-preserving nudge lifts
# p in (0.5, 0.5 + 1/508) to level 128; linear_uint8: the nudge lifts logits in (0, 0.125) to 0.25, and
# sigmoid' <= 1/4, so < 0.25 / 4 = 1/16; float16: relative rounding 2**-11 times x * sigmoid'(x) <= 0.224, < 2**-13.
SIGMOID_ERROR_BOUND = {"sigmoid_uint8": 1.0 / 254.0, "linear_uint8": 1.0 / 16.0, "float16": 2.0**-13}


def get_codec(name: str) -> LogitCodec:
    """The codec called ``name``; ValueError names the valid ones."""
    if not isinstance(name, str) or name not in CODECS:  # a name from an untrusted file may be any JSON value
        raise ValueError(f"unknown logit codec {safe_text(repr(name), 80)}; expected one of {sorted(CODECS)}")
    return CODECS[name]


def encode_logits(logits: np.ndarray, codec: str | LogitCodec) -> np.ndarray:
    """Float logits of any shape -> stored values of ``codec.dtype``, same shape.

    Raises:
        ValueError: a NaN or infinite logit (a teacher bug, not something to store silently).
    """
    codec = get_codec(codec) if isinstance(codec, str) else codec
    x = np.asarray(logits, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"logits contain {int((~np.isfinite(x)).sum())} NaN/inf values; the teacher output is broken")
    positive = x > 0
    if codec.name == "float16":
        q = np.clip(x, -65504.0, 65504.0).astype(np.float16)
        # Positive logits below float16's smallest subnormal (6e-8) would round to 0, i.e. "background".
        q[positive & (q <= 0)] = np.float16(2.0**-24)
        return q
    if codec.quantity == "sigmoid":
        v = 0.5 * (1.0 + np.tanh(0.5 * x.astype(np.float64)))  # sigmoid without overflow warnings
    else:
        v = x.astype(np.float64)
    q = np.clip(np.rint(v / codec.scale + codec.offset), 0, 255)
    # q == zero_level decodes to exactly logit 0 ("background"); logits in (0, half a level) round onto it.
    zero_level = codec.offset + (0.5 / codec.scale if codec.quantity == "sigmoid" else 0.0)
    q[positive & (q <= zero_level)] = zero_level + 1
    return q.astype(np.uint8)


def encode_logits_torch(logits: torch.Tensor, codec: str | LogitCodec, check_finite: bool = True) -> torch.Tensor:
    """:func:`encode_logits` on a tensor's own device (the GPU pass encodes there and copies only the codes).

    Same rule, same float64 arithmetic, so the codes equal :func:`encode_logits`'s (tested); returns a tensor of
    ``codec.dtype`` on ``logits.device``, same shape. ``check_finite=False`` leaves the NaN/inf check to the
    caller (the teacher pass counts them on the whole-image logits, which the crops could miss).

    Raises:
        ValueError: a NaN or infinite logit.
    """
    import torch

    codec = get_codec(codec) if isinstance(codec, str) else codec
    x = logits.float()
    bad = int((~torch.isfinite(x)).sum()) if check_finite else 0
    if bad:
        raise ValueError(f"logits contain {bad} NaN/inf values; the teacher output is broken")
    positive = x > 0
    if codec.name == "float16":
        q16 = x.clamp(-65504.0, 65504.0).half()
        return torch.where(positive & (q16 <= 0), torch.tensor(2.0**-24, dtype=torch.float16, device=x.device), q16)
    v = 0.5 * (1.0 + torch.tanh(0.5 * x.double())) if codec.quantity == "sigmoid" else x.double()
    q = torch.round(v / codec.scale + codec.offset).clamp(0, 255)  # round half to even, as np.rint
    zero_level = codec.offset + (0.5 / codec.scale if codec.quantity == "sigmoid" else 0.0)
    q = torch.where(positive & (q <= zero_level), torch.full_like(q, zero_level + 1), q)
    return q.to(torch.uint8)


def decode_logits(stored: np.ndarray, codec: str | LogitCodec) -> np.ndarray:
    """Stored values (any shape) -> float32 logits, same shape (uint8 codecs through a 256-entry table)."""
    codec = get_codec(codec) if isinstance(codec, str) else codec
    q = np.asarray(stored)
    if q.dtype != np.dtype(codec.dtype):
        raise ValueError(f"codec {codec.name} stores {codec.dtype}, got an array of {q.dtype}")
    if codec.name == "float16":
        return q.astype(np.float32)
    return _decode_table(codec)[q]


@cache
def _decode_table(codec: LogitCodec) -> np.ndarray:
    """The float32 logit of each of the 256 uint8 levels, computed in float64 from the attrs rule."""
    v = (np.arange(256, dtype=np.float64) - codec.offset) * codec.scale
    if codec.quantity == "sigmoid":
        p = np.clip(v, *codec.p_clip)
        v = np.log(p) - np.log1p(-p)
    table = v.astype(np.float32)
    table.flags.writeable = False  # shared by every call through the cache
    return table
