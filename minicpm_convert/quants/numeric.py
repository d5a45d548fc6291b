"""float32 building blocks that keep NumPy bit-identical to llama.cpp's C quantizers.

The rules every NumPy quantizer here follows (and the C kernels, built with
``-ffp-contract=off -fno-fast-math``, follow by construction):

* every value is float32 and every operation one IEEE float32 operation, in the C source's
  evaluation order (``w*x*l`` is ``(w*x)*l``; an ``int`` operand is converted to float first);
* a sum is accumulated sequentially in source order (:func:`seqsum`), never with ``np.sum``,
  whose pairwise summation rounds differently;
* data are laid out lane-major: axis 0 runs along a group (the C loop index), the other axes
  are independent groups ("lanes") processed side by side;
* ``nearest_int`` is evaluated with its own bit trick (:func:`nearest_int`), so even arguments
  outside its asserted domain (subnormal scales give inf/NaN) give C's result;
* C's integer conversions are reproduced where a value can leave the target's range
  (``uint8_t`` stores wrap, ``(int8_t)`` of a float is x86-64's truncating conversion).
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
ZERO = F32(0.0)
ONE = F32(1.0)
FLT_MAX = F32(np.finfo(np.float32).max)
_MAGIC = F32(12582912.0)  # 1.5 * 2**23


def nearest_int(t) -> np.ndarray:
    """C ``nearest_int(fval)``: ``fval + 1.5*2^23``, low mantissa bits, minus 2^22 (int32)."""
    i = np.add(np.asarray(t, dtype=F32), _MAGIC, dtype=F32).view(np.int32)
    return (i & 0x007FFFFF) - 0x00400000


def seqsum(a: np.ndarray, start=None) -> np.ndarray:
    """``float s = start; for (i..) s += a[i];`` along axis 0.  ``start=None`` starts from the
    first term (``float s = a[0]; for (i = 1..)``), which differs from ``0 + a[0]`` for -0.0."""
    if start is None:
        s, rest = a[0].astype(F32, copy=True), a[1:]
    else:
        s, rest = np.full(a.shape[1:], start, F32), a
    for v in rest:
        s += v
    return s


def running(x: np.ndarray, op, start=None) -> np.ndarray:
    """``m = x[0]; for (i = 1..) if (op(x[i], m)) m = x[i];`` along axis 0 (``start``: ``m =
    start; for (i = 0..)``); ``op`` is np.less / np.greater.  Sequential, so signed zeros and
    ties come out as in C (np.min/np.max do not promise which zero they return)."""
    m = x[0].copy() if start is None else np.full(x.shape[1:], start, F32)
    for v in (x[1:] if start is None else x):
        m = np.where(op(v, m), v, m)
    return m


def macro_max(x: np.ndarray, start=None) -> np.ndarray:
    """``m = start; for: m = MAX(m, x[i]);`` with ggml's ``MAX(a, b) = a > b ? a : b`` along axis 0
    (``start=None``: ``m = x[0]``, i = 1..): an equal value (-0.0 after 0.0) replaces the maximum."""
    m = x[0].copy() if start is None else np.full(x.shape[1:], start, F32)
    for v in (x[1:] if start is None else x):
        m = np.where(m > v, m, v)
    return m


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``amax = 0; max = 0; for: if (fabsf(x) > amax) {amax = fabsf(x); max = x;}`` along axis 0:
    returns (amax, max); ties keep the first, NaN never wins."""
    a = np.abs(x)
    a = np.where(a > 0, a, ZERO)
    i = a.argmax(axis=0)
    amax = np.take_along_axis(a, i[None], axis=0)[0]
    mx = np.take_along_axis(x, i[None], axis=0)[0]
    return amax, np.where(amax > 0, mx, ZERO)


def to_f16(v) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even) of finite float32 values, as float16."""
    return np.asarray(v, dtype=F32).astype(np.float16)


def f16_round(v) -> np.ndarray:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))``."""
    return to_f16(v).astype(F32)


def f16_bytes(v) -> np.ndarray:
    """The two little-endian bytes of each fp16 value: uint8 ``[..., 2]``."""
    h = to_f16(v)
    return h.view(np.uint8).reshape(*h.shape, 2)


def inv_or_zero(d) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f``"""
    d = np.asarray(d, dtype=F32)
    return np.where(d != 0, ONE / np.where(d != 0, d, ONE), ZERO)


def c_float_to_int8(v: np.ndarray) -> np.ndarray:
    """``(int8_t)`` / ``(uint8_t)`` of a float as compiled for x86-64 (cvttss2si, keep the low
    byte; NaN and out-of-range give 0x80000000, i.e. a low byte of 0).  Returns int8."""
    ok = np.abs(v) < F32(2.0**31)
    return np.where(ok, v, ZERO).astype(np.int32).astype(np.int8)


def as_f32(i) -> np.ndarray:
    """``(float)`` of C integers."""
    return np.asarray(i).astype(F32)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """0/1 values along the last axis -> little-endian bytes (bit j of byte k = element 8k+j)."""
    return np.packbits(bits.astype(np.uint8), axis=-1, bitorder="little")


def pack_2bit(L: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K low bits: ``qs[j/4 + l] = L[j+l] | L[j+l+32]<<2 | L[j+l+64]<<4 | L[j+l+96]<<6``
    for j = 0, 128; L is uint8 ``[blocks, 256]`` -> ``[blocks, 64]``."""
    g = L.reshape(L.shape[0], 2, 4, 32).astype(np.uint8)
    return (g[:, :, 0] | (g[:, :, 1] << 2) | (g[:, :, 2] << 4) | (g[:, :, 3] << 6)).reshape(L.shape[0], 64)


def pack_nibbles32(L: np.ndarray) -> np.ndarray:
    """32-weight blocks: ``qs[j] = L[j] | L[j+16] << 4``; L uint8 ``[..., 32]`` -> ``[..., 16]``."""
    L = L.astype(np.uint8)
    return (L[..., :16] & 0x0F) | ((L[..., 16:] & 0x0F) << 4)


def exact_sqrt(t):
    """The correctly rounded square root of a torch tensor (float32 or float64), as IEEE defines it.

    torch.sqrt goes through MKL's vector math, which on AVX-512 machines is not correctly rounded
    for float32 or float64 (measured: MKL_ENABLE_INSTRUCTIONS=AVX2 changes its last bits), so an
    export whose choices depend on a square root would differ from machine to machine. NumPy's
    sqrt is the hardware's correctly rounded instruction."""
    import torch
    return torch.from_numpy(np.asarray(np.sqrt(t.detach().contiguous().numpy())))
