"""NumPy ports of llama.cpp's ternary types TQ1_0 and TQ2_0 (``quantize_row_tq{1,2}_0_ref``;
``quantize_tq{1,2}_0`` ignore the importance array).

Each 256-weight block has one fp16 scale ``d = max|x|`` and the trits ``lroundf(x/d) + 1``;
TQ2_0 stores them as 2-bit fields, TQ1_0 five (or four) to a byte in base 3, scaled so that a
byte's top bits read the first trit (``q * 256 / 243`` rounded up).
"""

from __future__ import annotations

import numpy as np

from .legacy import round_half_away
from .numeric import f16_bytes, inv_or_zero


def _trits(rows: np.ndarray):
    b = rows.reshape(-1, 256)
    d = np.abs(b).max(axis=1)  # amax = MAX(amax, fabsf(v))
    t = round_half_away(b * inv_or_zero(d)[:, None]).astype(np.int32) + 1  # -1, 0, 1 -> 0, 1, 2
    return b.shape[0], d, t


def _base3(t: np.ndarray, digits: int, pad: bool = False) -> np.ndarray:
    """Trits [..., digits] (most significant first) -> bytes ``ceil(q * 256 / 243)``."""
    q = np.zeros(t.shape[:-1], np.int32)
    for n in range(digits):
        q = q * 3 + t[..., n]
    if pad:  # 4 trits: shift the first one to the most significant of five
        q = q * 3
    return ((q * 256 + 242) // 243).astype(np.uint8)


def tq1_0(rows: np.ndarray, qw=None) -> np.ndarray:
    nb, d, t = _trits(rows)
    a = t[:, :160].reshape(nb, 5, 32).transpose(0, 2, 1)  # qs[m]: x[m + 32n], n = 0..4
    b = t[:, 160:240].reshape(nb, 5, 16).transpose(0, 2, 1)  # qs[32 + m]: x[160 + m + 16n]
    c = t[:, 240:].reshape(nb, 4, 4).transpose(0, 2, 1)  # qh[j]: x[240 + j + 4m], m = 0..3
    out = np.concatenate([_base3(a, 5), _base3(b, 5), _base3(c, 4, pad=True), f16_bytes(d)], axis=1)
    return out.reshape(rows.shape[0], -1)


def tq2_0(rows: np.ndarray, qw=None) -> np.ndarray:
    nb, d, t = _trits(rows)
    g = (t & 3).reshape(nb, 2, 4, 32)  # qs[32c + m] field n: x[128c + m + 32n]
    qs = (g[:, :, 0] | (g[:, :, 1] << 2) | (g[:, :, 2] << 4) | (g[:, :, 3] << 6)).reshape(nb, 64).astype(np.uint8)
    return np.concatenate([qs, f16_bytes(d)], axis=1).reshape(rows.shape[0], -1)


__all__ = ["tq1_0", "tq2_0"]
