"""One entry point for every GGML tensor type the converter writes, byte-identical to llama.cpp.

``quantize(x, qtype)`` takes float32 ``[..., n]`` and returns

* F32 -> float32, F16 -> float16, BF16 -> uint16 (bf16 bit patterns), each ``[..., n]``;
* block types -> uint8 bytes ``[..., n // block * type_size]``.

Q4_K/Q5_K/Q6_K come from :mod:`.kquants`.  Q8_0 and BF16 come from ``gguf.quants`` (verified
byte-exact against ggml).  Q4_0/Q5_0/Q5_1 and F16 are implemented here, because gguf-py's
differ from ggml on blocks holding -0.0 (which zero ``max``/``min`` C keeps, hence the sign
of ``d``/``m``) and on NaN payloads (ggml writes 0x7E00|sign) respectively.
``dequantize(data, qtype)`` is ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq
from gguf.constants import GGML_QUANT_SIZES

from . import kquants

__all__ = ["quantize", "dequantize", "SUPPORTED"]

_F32 = np.float32
_ZERO = _F32(0.0)
_ONE = _F32(1.0)
_CHUNK = 1 << 16  # 32-weight blocks per chunk


def _f32_to_f16(x: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16: round to nearest even; any NaN -> 0x7E00 | sign."""
    h = x.astype(np.float16)
    nan = np.isnan(x)
    if nan.any():
        h.view(np.uint16)[nan] = 0x7E00 | ((x.view(np.uint32)[nan] >> 16) & 0x8000).astype(np.uint16)
    return h


def _c_float_to_int8(v: np.ndarray) -> np.ndarray:
    """``(int8_t)`` / ``(uint8_t)`` of a float as compiled for x86-64 (cvttss2si, keep the low
    byte; NaN and out-of-range give 0x80000000, i.e. a low byte of 0).  Returns int8."""
    ok = np.abs(v) < _F32(2.0**31)
    return np.where(ok, v, _ZERO).astype(np.int32).astype(np.int8)


def _first_absmax(b: np.ndarray) -> np.ndarray:
    """``amax = 0; max = 0; if (amax < fabsf(v)) {amax = fabsf(v); max = v;}``"""
    a = np.abs(b)
    a = np.where(a > 0, a, _ZERO)
    im = a.argmax(axis=1)
    r = np.arange(b.shape[0])
    return np.where(a[r, im] > 0, b[r, im], _ZERO)


def _inv(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f``"""
    return np.where(d != 0, _ONE / np.where(d != 0, d, _ONE), _ZERO)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """qs[j] = (q[j] & 0xF) | (q[j + 16] & 0xF) << 4 for 32-element blocks."""
    q = q & 0x0F
    return q[:, :16] | (q[:, 16:] << 4)


def _pack_qh(q: np.ndarray) -> np.ndarray:
    """uint32 qh, bit j = bit 4 of q[j], little-endian bytes."""
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


def _q4_0(b):
    d = _first_absmax(b) / _F32(-8)
    x0 = b * _inv(d)[:, None]
    q = np.minimum(_c_float_to_int8(x0 + _F32(8.5)).astype(np.int16), 15).astype(np.uint8)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), _pack_nibbles(q)], axis=1)


def _q5_0(b):
    d = _first_absmax(b) / _F32(-16)
    x0 = b * _inv(d)[:, None]
    q = np.minimum(_c_float_to_int8(x0 + _F32(16.5)).astype(np.int16), 31).astype(np.uint8)
    d16 = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return np.concatenate([d16, _pack_qh(q), _pack_nibbles(q)], axis=1)


def _q5_1(b):
    r = np.arange(b.shape[0])
    mn = b[r, b.argmin(axis=1)]  # first minimum (strict '<' from FLT_MAX)
    mx = b[r, b.argmax(axis=1)]
    d = (mx - mn) / _F32(31)
    x0 = (b - mn[:, None]) * _inv(d)[:, None]
    q = _c_float_to_int8(x0 + _F32(0.5)).view(np.uint8)
    d16 = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    m16 = mn.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return np.concatenate([d16, m16, _pack_qh(q), _pack_nibbles(q)], axis=1)


def _blocks32(fn, type_size):
    def run(x: np.ndarray) -> np.ndarray:
        n = x.shape[-1]
        if n % 32:
            raise ValueError(f"row length {n} is not a multiple of 32")
        blocks = x.reshape(-1, 32)
        out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)
        with np.errstate(all="ignore"):
            for s in range(0, blocks.shape[0], _CHUNK):
                out[s : s + _CHUNK] = fn(blocks[s : s + _CHUNK])
        return out.reshape(*x.shape[:-1], n // 32 * type_size)

    return run


_QUANTIZERS = {
    QT.Q4_K: kquants.quantize_q4_k,
    QT.Q5_K: kquants.quantize_q5_k,
    QT.Q6_K: kquants.quantize_q6_k,
    QT.Q4_0: _blocks32(_q4_0, 18),
    QT.Q5_0: _blocks32(_q5_0, 22),
    QT.Q5_1: _blocks32(_q5_1, 24),
    QT.Q8_0: lambda x: gq.quantize(x, QT.Q8_0),
    QT.F16: _f32_to_f16,
    QT.BF16: lambda x: gq.quantize(x, QT.BF16).view(np.uint16),
    QT.F32: lambda x: x,
}

SUPPORTED = frozenset(_QUANTIZERS)


def quantize(x: np.ndarray, qtype: QT) -> np.ndarray:
    """Quantize float32 ``[..., n]`` to ``qtype`` exactly as llama.cpp (no imatrix) does.

    Raises ValueError on NaN or Inf input to a block format (llama.cpp would write garbage
    blocks); F32/F16/BF16 convert them bit for bit as ggml does."""
    qtype = QT(qtype)
    fn = _QUANTIZERS.get(qtype)
    if fn is None:
        raise NotImplementedError(f"quantization to {qtype.name} is not supported")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise ValueError("expected an array with at least one dimension")
    # Block formats have no meaning for NaN/Inf (llama.cpp writes garbage blocks); the float types
    # are plain casts that keep ggml's NaN/Inf bits. The stream refuses non-finite weights anyway.
    if qtype not in (QT.F32, QT.F16, QT.BF16) and not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise ValueError(f"{qtype.name}: input holds {bad} non-finite values (NaN or Inf)")
    block = GGML_QUANT_SIZES[qtype][0]
    if x.shape[-1] % block:
        raise ValueError(f"{qtype.name}: row length {x.shape[-1]} is not a multiple of {block}")
    if x.size == 0:  # gguf-py cannot reshape empty arrays
        if qtype in (QT.F32, QT.F16):
            return fn(x)
        if qtype == QT.BF16:
            return np.empty(x.shape, dtype=np.uint16)
        return np.empty(gq.quant_shape_to_byte_shape(x.shape, qtype), dtype=np.uint8)
    return fn(x)


def dequantize(data: np.ndarray, qtype: QT) -> np.ndarray:
    """Inverse of :func:`quantize` (float32 ``[..., n]``), via ``gguf.quants.dequantize``."""
    qtype = QT(qtype)
    if qtype == QT.BF16 and data.dtype == np.uint16:
        data = data.view(np.uint8)
    return gq.dequantize(data, qtype)
