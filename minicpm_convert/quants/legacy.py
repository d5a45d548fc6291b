"""NumPy ports of llama.cpp's 32-weight block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and of its
float conversions F16/BF16/F32.

``q4_0(rows, qw)``: float32 ``[nrows, n]`` (n % 32 == 0) and the importance array ``qw [n]``
(or None) -> the bytes of ``ggml_quantize_chunk``, uint8 ``[nrows, n/32 * type_size]``.  Without
``qw`` it is ``quantize_row_<type>_ref``; with it ``quantize_row_<type>_impl``, whose weights use
the variance of the whole row (so rows are the unit, not blocks).  Q8_0 ignores ``qw`` as ggml does.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq

from .numeric import F32, FLT_MAX, ZERO, c_float_to_int8, f16_bytes, inv_or_zero, pack_bits, pack_nibbles32, running, seqsum
from .searches import make_qkx, make_qx_quants


def round_half_away(v: np.ndarray) -> np.ndarray:
    """C ``roundf`` / ``lroundf``: to nearest, halves away from zero (exact, as float32)."""
    t = np.trunc(v)
    return np.where(np.abs(v - t) >= F32(0.5), t + np.sign(v), t).astype(F32)


def _lanes32(rows: np.ndarray) -> np.ndarray:
    """[nrows, n] -> [32, nrows*n/32]: column m is block m of the flattened rows."""
    return np.ascontiguousarray(rows.reshape(-1, 32).T)


def _row_weights(rows: np.ndarray, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(X, weights) for the imatrix paths: ``sigma2 = sum_x2/n_per_row`` over the whole row,
    ``weight[j] = qw[j] * sqrtf(sigma2 + x[j]*x[j])`` per block."""
    nrows, n = rows.shape
    R = rows.T
    sigma2 = seqsum(R * R, 0) / F32(n)
    X = _lanes32(rows)
    Q = _lanes32(np.broadcast_to(qw, rows.shape))
    return X, Q * np.sqrt(np.repeat(sigma2, n // 32) + X * X)


def _first_absmax_rows(b: np.ndarray) -> np.ndarray:
    """``amax = 0; max = 0; if (amax < fabsf(v)) {amax = fabsf(v); max = v;}`` over each block row."""
    a = np.abs(b)
    a = np.where(a > 0, a, ZERO)
    i = a.argmax(axis=1)
    r = np.arange(b.shape[0])
    return np.where(a[r, i] > 0, b[r, i], ZERO)


def _out(rows: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts, axis=1).reshape(rows.shape[0], -1)


def _qh(L: np.ndarray) -> np.ndarray:
    """The fifth bits as the little-endian uint32 qh: bit j = bit 4 of level j (blocks of 32)."""
    return pack_bits((L >> 4) & 1)


# ------------------------------------------------------------------------------- Q4_0 / Q5_0

def _symmetric(rows, qw, nmax):
    """Q4_0 (nmax 8) / Q5_0 (nmax 16): (d, levels [blocks, 32])."""
    if qw is None:  # quantize_row_q{4,5}_0_ref: d = max / -nmax, levels (int8_t)(x/d + nmax + 0.5)
        b = rows.reshape(-1, 32)
        d = _first_absmax_rows(b) / F32(-nmax)
        q = c_float_to_int8(b * inv_or_zero(d)[:, None] + F32(nmax + 0.5)).astype(np.int16)
        return d, np.minimum(q, 2 * nmax - 1).astype(np.uint8)
    X, W = _row_weights(rows, qw)
    d, L = make_qx_quants(X, nmax, W)
    return d, L.T.astype(np.uint8)


def q4_0(rows: np.ndarray, qw=None) -> np.ndarray:
    d, L = _symmetric(rows, qw, 8)
    return _out(rows, [f16_bytes(d), pack_nibbles32(L)])


def q5_0(rows: np.ndarray, qw=None) -> np.ndarray:
    d, L = _symmetric(rows, qw, 16)
    return _out(rows, [f16_bytes(d), _qh(L), pack_nibbles32(L)])


# ------------------------------------------------------------------------------- Q4_1 / Q5_1

def _asymmetric(rows, qw, nmax):
    """Q4_1 (nmax 15) / Q5_1 (nmax 31): (d, m, levels [blocks, 32])."""
    if qw is None:  # quantize_row_q{4,5}_1_ref
        B = _lanes32(rows)
        mn = running(B, np.less, FLT_MAX)
        mx = running(B, np.greater, -FLT_MAX)
        d = (mx - mn) / F32(nmax)
        x0 = (B - mn) * inv_or_zero(d)
        q = c_float_to_int8(x0 + F32(0.5))
        q = np.minimum(q.astype(np.int16), nmax) if nmax == 15 else q.view(np.uint8)  # Q5_1 has no MIN
        return d, mn, q.T.astype(np.uint8)
    X, W = _row_weights(rows, qw)
    d, the_min, L = make_qkx(X, W, nmax, -0.9, 0.05, 36)  # make_qkx3_quants
    return d, -the_min, L.T.astype(np.uint8)


def q4_1(rows: np.ndarray, qw=None) -> np.ndarray:
    d, m, L = _asymmetric(rows, qw, 15)
    return _out(rows, [f16_bytes(d), f16_bytes(m), pack_nibbles32(L)])


def q5_1(rows: np.ndarray, qw=None) -> np.ndarray:
    d, m, L = _asymmetric(rows, qw, 31)
    return _out(rows, [f16_bytes(d), f16_bytes(m), _qh(L), pack_nibbles32(L)])


# ------------------------------------------------------------------------------------- Q8_0

def q8_0(rows: np.ndarray, qw=None) -> np.ndarray:
    """quantize_row_q8_0_ref (``quantize_q8_0`` ignores the importance array)."""
    b = rows.reshape(-1, 32)
    d = np.abs(b).max(axis=1) / F32(127)  # amax = MAX(amax, fabsf(v)): order does not matter
    q = c_float_to_int8(round_half_away(b * inv_or_zero(d)[:, None]))
    return _out(rows, [f16_bytes(d), q.view(np.uint8)])


# ------------------------------------------------------------------------------------- floats

def f16(x: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16: round to nearest even; any NaN -> 0x7E00 | sign (numpy keeps payloads)."""
    h = x.astype(np.float16)
    nan = np.isnan(x)
    if nan.any():
        h.view(np.uint16)[nan] = 0x7E00 | ((x.view(np.uint32)[nan] >> 16) & 0x8000).astype(np.uint16)
    return h


def bf16(x: np.ndarray) -> np.ndarray:
    """ggml_fp32_to_bf16_row_ref, as uint16 bit patterns (gguf-py's conversion is the same)."""
    return gq.quantize(x, QT.BF16).view(np.uint16)
