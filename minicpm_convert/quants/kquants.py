"""Byte-exact NumPy ports of llama.cpp's reference k-quant quantizers (no imatrix).

``quantize_q4_k`` / ``quantize_q5_k`` / ``quantize_q6_k`` produce exactly the bytes of
``quantize_row_q4_K_ref`` / ``quantize_row_q5_K_ref`` / ``quantize_row_q6_K_ref`` in
``ggml/src/ggml-quants.c`` (what ``ggml_quantize_chunk`` runs when no imatrix is given),
as built for x86-64 without FMA contraction (the default ``ggml-base`` build).

How exactness is kept while vectorising:

* Data are laid out lane-major: a sub-block of 32 (Q4_K/Q5_K) or 16 (Q6_K) weights is one
  column of an ``(n, M)`` float32 array, so every NumPy op works on all sub-blocks of a chunk
  at once, and a per-sub-block sum is an explicit loop over the ``n`` rows, i.e. the same
  sequential float32 accumulation, in source order, that the C loop does (never np.sum).
* Every arithmetic op is float32 and follows C's evaluation order (``(w*l)*l``,
  ``((scale*l)+min)-x``, ``1/iscale``, ``x/d`` ...); constants are ``np.float32``.
* ``nearest_int`` is ``fval + 1.5*2**23`` then the low mantissa bits.  When every argument of
  a call is provably inside its asserted domain (|f| <= 4194303, checked per lane from the
  lane's min/max, since the mapping is monotone), this is ``np.rint``; otherwise (subnormal
  or overflowing inputs give inf/NaN there) the bit trick itself is evaluated, so even the
  out-of-domain "garbage" matches.
* The winning quant levels of the inner searches are not copied around at each step: only
  the winning ``iscale`` (and ``min``) is remembered, and the levels are recomputed at the
  end, only for the sub-blocks whose final super-block scale is zero (``if (!d) continue``).

Inputs are expected to be finite; NaN/inf inputs are not guaranteed to match C's bytes.
"""

from __future__ import annotations

import os

import numpy as np

try:  # the compiled kernels (setup.py builds them when a C compiler is present)
    from . import _kquants as _compiled
except ImportError:  # pragma: no cover - depends on the install
    _compiled = None

__all__ = ["QK_K", "quantize_q4_k", "quantize_q5_k", "quantize_q6_k"]

QK_K = 256

_F32 = np.float32
_ZERO = _F32(0.0)
_ONE = _F32(1.0)
_MAGIC = _F32(12582912.0)  # 1.5 * 2**23, nearest_int's magic number
_NI_MAX = _F32(4194303.0)  # nearest_int asserts fabsf(fval) <= this
_GROUP_MAX_EPS = _F32(1e-15)

# Super-blocks per chunk: ~8 float32 work arrays of chunk*256 values (~7 MB at 1024);
# measured on one core, throughput plateaus from ~768 up.
_CHUNK_BLOCKS = {"q4_k": 1024, "q5_k": 1024, "q6_k": 1024}

# Test hook: evaluate nearest_int with the bit trick everywhere (the slow, always-exact path).
_force_exact_rounding = False

# Use the compiled kernels when built (same bytes, ~20x faster); MINICPM_CONVERT_NO_C=1 or
# setting this to False selects the NumPy port, which stays the oracle in the tests.
use_compiled = _compiled is not None and not os.environ.get("MINICPM_CONVERT_NO_C")


def compiled_kernel(name: str):
    """The compiled quantizer ``name`` (q4_k, q5_k, q6_k, q8_0, f16) if in use, else None."""
    if not use_compiled or _force_exact_rounding or _compiled is None:
        return None
    return getattr(_compiled, name, None)


# ----------------------------------------------------------------------------- helpers

def _nearest_int(t: np.ndarray) -> np.ndarray:
    """C ``nearest_int`` on a float32 array, bit for bit (also outside its domain)."""
    i = np.add(t, _MAGIC, dtype=np.float32).view(np.int32)
    np.bitwise_and(i, 0x007FFFFF, out=i)
    np.subtract(i, 0x00400000, out=i)
    return i


def _in_domain(*bounds: np.ndarray) -> bool:
    """True if all |bounds| <= 4194303 (False for NaN)."""
    if _force_exact_rounding:
        return False
    for b in bounds:
        if b.size and not np.abs(b).max() <= _NI_MAX:  # NaN -> False
            return False
    return True


def _round_clip_(t: np.ndarray, lo: int, hi: int, in_domain: bool) -> np.ndarray:
    """In place: t <- (float) MAX(lo, MIN(hi, nearest_int(t))).  Returns t."""
    if in_domain:
        np.rint(t, out=t)
        np.clip(t, _F32(lo), _F32(hi), out=t)
    else:
        i = _nearest_int(t)
        np.clip(i, lo, hi, out=i)
        t[...] = i
    return t


def _sum0(a: np.ndarray) -> np.ndarray:
    """``float s = 0; for (i..) s += a[i];`` along axis 0 (sequential, source order)."""
    s = np.add(a[0], _ZERO)
    for i in range(1, a.shape[0]):
        s += a[i]
    return s


def _sum1(a: np.ndarray) -> np.ndarray:
    """``float s = a[0]; for (i = 1..) s += a[i];`` along axis 0."""
    s = a[0].copy()
    for i in range(1, a.shape[0]):
        s += a[i]
    return s


def _to_f16(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even) of finite float32 values."""
    return v.astype(np.float16)


def _as_rows(x: np.ndarray, block: int, name: str) -> tuple[np.ndarray, tuple[int, ...]]:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise ValueError(f"{name}: expected an array with at least one dimension")
    n = x.shape[-1]
    if n % block != 0:
        raise ValueError(f"{name}: row length {n} is not a multiple of {block}")
    return x.reshape(int(np.prod(x.shape[:-1])), n), x.shape


def _chunked(x: np.ndarray, type_size: int, chunk_blocks: int, fn, name: str) -> np.ndarray:
    rows, shape = _as_rows(x, QK_K, name)
    blocks = rows.reshape(rows.size // QK_K, QK_K)
    nb = blocks.shape[0]
    out = np.empty((nb, type_size), dtype=np.uint8)
    kernel = compiled_kernel(name.lower())
    if kernel is not None:
        kernel(blocks, out)  # releases the GIL
        return out.reshape(*shape[:-1], shape[-1] // QK_K * type_size)
    with np.errstate(all="ignore"):
        for s in range(0, nb, chunk_blocks):
            e = min(nb, s + chunk_blocks)
            out[s:e] = fn(blocks[s:e])
    return out.reshape(*shape[:-1], shape[-1] // QK_K * type_size)


# ----------------------------------------------------------------- make_qkx2_quants

def _make_qkx2_quants(X, W, nmax, rmin, rdelta, nstep):
    """Vectorised ``make_qkx2_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta,
    nstep, use_mad=false)``; one lane (column) per call.

    Returns ``(scale, the_min, l_iscale, l_min, early)``; the C output levels are
    ``L = MAX(0, MIN(nmax, nearest_int(l_iscale*(x - l_min))))``, or 0 where ``early``.
    """
    fnmax = _F32(nmax)
    xmin = X.min(axis=0)
    xmax = X.max(axis=0)
    sum_w = _sum1(W)
    sum_x = _sum1(W * X)
    mn = np.where(xmin > 0, _ZERO, xmin)  # if (min > 0) min = 0;
    early = xmax == mn  # -> L = 0, *the_min = -min, return 0
    den = xmax - mn  # (max - min), kept in step with min
    den[early] = _ONE  # dummy, keeps the masked lanes finite
    min0 = mn.copy()

    T = np.empty_like(X)
    E = np.empty_like(X)
    S = np.empty((X.shape[0], 3, X.shape[1]), dtype=np.float32)

    def levels(iscale):
        np.subtract(X, mn, out=T)
        np.multiply(T, iscale, out=T)  # iscale*(x[i] - min)
        ok = _in_domain((xmin - mn) * iscale, (xmax - mn) * iscale)
        return _round_clip_(T, 0, nmax, ok)

    def error(L, scale, min_):
        np.multiply(L, scale, out=E)  # scale * L[i] + min - x[i]
        np.add(E, min_, out=E)
        np.subtract(E, X, out=E)
        np.multiply(E, E, out=E)
        np.multiply(E, W, out=E)  # w * diff
        return _sum0(E)

    iscale = fnmax / den
    scale = _ONE / iscale
    best_error = error(levels(iscale), scale, mn)
    l_iscale = iscale.copy()
    l_min = mn.copy()

    for step in range(nstep + 1):
        iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + fnmax) / den
        L = levels(iscale)
        np.multiply(W, L, out=S[:, 0])  # w*l
        np.multiply(S[:, 0], L, out=S[:, 1])  # w*l*l
        np.multiply(S[:, 0], X, out=S[:, 2])  # w*l*x[i]
        sum_l, sum_l2, sum_xl = _sum0(S)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        if pos.any():
            this_min[pos] = _ZERO
            this_scale[pos] = (sum_xl / sum_l2)[pos]
        cur_error = error(L, this_scale, this_min)
        better = (D > 0) & (cur_error < best_error) & ~early
        if better.any():
            best_error[better] = cur_error[better]
            scale[better] = this_scale[better]
            l_iscale[better] = iscale[better]
            l_min[better] = mn[better]
            mn[better] = this_min[better]
            den[better] = (xmax - mn)[better]

    scale[early] = _ZERO
    mn[early] = min0[early]
    return scale, -mn, l_iscale, l_min, early


def _search_levels(X, idx, l_iscale, l_min, early, nmax):
    """Levels left in L by make_qkx2_quants for the lanes ``idx`` (as float32)."""
    Xs = X[:, idx]
    sc, m = l_iscale[idx], l_min[idx]
    T = (Xs - m) * sc
    ok = _in_domain((Xs.min(axis=0) - m) * sc, (Xs.max(axis=0) - m) * sc)
    _round_clip_(T, 0, nmax, ok)
    T[:, early[idx]] = _ZERO
    return T


# ------------------------------------------------------------------- Q4_K / Q5_K

def _qkx_blocks(blocks, nmax, rmin, rdelta, nstep):
    """Shared body of quantize_row_q4_K_ref / quantize_row_q5_K_ref for (nb, 256) blocks.

    Returns (d16, dmin16, ls, lm, Lq) with Lq uint8 levels, shape (nb, 256)."""
    nb = blocks.shape[0]
    X = np.ascontiguousarray(blocks.reshape(nb * 8, 32).T)  # (32, M): lane = sub-block
    sum_x2 = _sum0(X * X)
    av_x = np.sqrt(sum_x2 / _F32(32))
    W = np.abs(X)
    W += av_x  # av_x + fabsf(x)
    scale, the_min, l_iscale, l_min, early = _make_qkx2_quants(X, W, nmax, rmin, rdelta, nstep)

    scales = scale.reshape(nb, 8)
    mins = the_min.reshape(nb, 8)
    # float max_scale = 0; if (scale > max_scale) max_scale = scale;  (NaN never wins)
    max_scale = np.where(scales > 0, scales, _ZERO).max(axis=1)
    max_min = np.where(mins > 0, mins, _ZERO).max(axis=1)
    inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _ZERO)
    inv_min = np.where(max_min > 0, _F32(63) / max_min, _ZERO)
    # uint8_t ls = nearest_int(...); ls = MIN(63, ls);
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    d16 = _to_f16(max_scale / _F32(63))
    dmin16 = _to_f16(max_min / _F32(63))

    d = (d16.astype(np.float32)[:, None] * ls.astype(np.float32)).reshape(-1)
    dm = (dmin16.astype(np.float32)[:, None] * lm.astype(np.float32)).reshape(-1)
    nz = d != 0
    T = X + dm
    T /= d  # (x + dm)/d
    with_d = np.flatnonzero(nz)
    xmin = X.min(axis=0)[with_d]
    xmax = X.max(axis=0)[with_d]
    ok = _in_domain((xmin + dm[with_d]) / d[with_d], (xmax + dm[with_d]) / d[with_d])
    L = _round_clip_(T, 0, nmax, ok)
    zero_d = np.flatnonzero(~nz)
    if zero_d.size:  # if (!d) continue;  -> keep make_qkx2_quants' levels
        L[:, zero_d] = _search_levels(X, zero_d, l_iscale, l_min, early, nmax)
    Lq = L.astype(np.uint8).T.reshape(nb, QK_K)
    return d16, dmin16, ls, lm, Lq


def _pack_scales_k4(ls, lm):
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return out


def _q4_k_blocks(blocks):
    nb = blocks.shape[0]
    d16, dmin16, ls, lm, Lq = _qkx_blocks(blocks, 15, -1.0, 0.1, 20)
    out = np.empty((nb, 144), dtype=np.uint8)
    out[:, 0:2] = d16.view(np.uint8).reshape(nb, 2)
    out[:, 2:4] = dmin16.view(np.uint8).reshape(nb, 2)
    out[:, 4:16] = _pack_scales_k4(ls, lm)
    Lg = Lq.reshape(nb, 4, 2, 32)
    out[:, 16:144] = (Lg[:, :, 0] | (Lg[:, :, 1] << 4)).reshape(nb, 128)
    return out


def _q5_k_blocks(blocks):
    nb = blocks.shape[0]
    d16, dmin16, ls, lm, Lq = _qkx_blocks(blocks, 31, -0.5, 0.1, 15)
    out = np.empty((nb, 176), dtype=np.uint8)
    out[:, 0:2] = d16.view(np.uint8).reshape(nb, 2)
    out[:, 2:4] = dmin16.view(np.uint8).reshape(nb, 2)
    out[:, 4:16] = _pack_scales_k4(ls, lm)
    # qh[j] bit s = bit 4 of element j of sub-block s
    out[:, 16:48] = np.packbits(Lq.reshape(nb, 8, 32) >> 4, axis=1, bitorder="little").reshape(nb, 32)
    Lg = (Lq & 0x0F).reshape(nb, 4, 2, 32)
    out[:, 48:176] = (Lg[:, :, 0] | (Lg[:, :, 1] << 4)).reshape(nb, 128)
    return out


# ------------------------------------------------------------------------- Q6_K

def _make_qx_quants_rmse1(X, nmax):
    """Vectorised ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)``, one lane per column.

    Returns ``(scale, l_iscale, zero)``; the C levels are
    ``L = nmax + MAX(-nmax, MIN(nmax-1, nearest_int(l_iscale*x)))``, or 0 where ``zero``."""
    M = X.shape[1]
    A = np.abs(X)
    im = A.argmax(axis=0)  # first maximum, like the strict '>' in C
    lanes = np.arange(M)
    amax = A[im, lanes]
    mx = X[im, lanes]
    zero = amax < _GROUP_MAX_EPS
    mx = np.where(zero, _ONE, mx)  # dummy, keeps the masked lanes finite
    fnmax = _F32(nmax)

    Wt = X * X  # w = x[i]*x[i]
    WX = Wt * X  # w*x[i]
    T = np.empty_like(X)
    S = np.empty((X.shape[0], 2, M), dtype=np.float32)

    def sums(iscale):
        np.multiply(X, iscale, out=T)  # iscale * x[i]
        L = _round_clip_(T, -nmax, nmax - 1, _in_domain(np.abs(iscale) * amax))
        np.multiply(WX, L, out=S[:, 0])  # w*x[i]*l
        np.multiply(Wt, L, out=S[:, 1])
        np.multiply(S[:, 1], L, out=S[:, 1])  # w*l*l
        return _sum0(S)

    iscale = _F32(-nmax) / mx
    sumlx, suml2 = sums(iscale)
    scale = np.where(suml2 != 0, sumlx / suml2, _ZERO)
    best = scale * sumlx
    l_iscale = iscale
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fnmax + _F32(0.1) * _F32(step)) / mx
        sumlx, suml2 = sums(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        if better.any():
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
            l_iscale = np.where(better, iscale, l_iscale)
    scale = np.where(zero, _ZERO, scale)
    return scale, l_iscale, zero


def _q6_k_blocks(blocks):
    nb = blocks.shape[0]
    X = np.ascontiguousarray(blocks.reshape(nb * 16, 16).T)  # (16, M): lane = sub-block
    scale, l_iscale, qx_zero = _make_qx_quants_rmse1(X, 32)

    scales = scale.reshape(nb, 16)
    # max_abs_scale = 0; if (abs_scale > max_abs_scale) {...}: first maximum, NaN never wins
    a = np.abs(scales)
    a = np.where(a > 0, a, _ZERO)
    ib = a.argmax(axis=1)
    rows = np.arange(nb)
    max_abs_scale = a[rows, ib]
    max_scale = scales[rows, ib]
    zero_block = max_abs_scale < _GROUP_MAX_EPS
    max_scale = np.where(zero_block, _ONE, max_scale)  # dummy for masked blocks

    iscale = _F32(-128) / max_scale
    d16 = _to_f16(_ONE / iscale)
    sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)

    d = (d16.astype(np.float32)[:, None] * sc.astype(np.float32)).reshape(-1)
    nz = d != 0
    T = X / d
    with_d = np.flatnonzero(nz)
    amax = np.abs(X).max(axis=0)[with_d]
    L = _round_clip_(T, -32, 31, _in_domain(amax / d[with_d]))
    zero_d = np.flatnonzero(~nz)
    if zero_d.size:  # if (!d) continue;  -> keep make_qx_quants' levels
        Xs = X[:, zero_d]
        s = l_iscale[zero_d]
        T2 = Xs * s
        _round_clip_(T2, -32, 31, _in_domain(np.abs(s) * np.abs(Xs).max(axis=0)))
        T2[:, qx_zero[zero_d]] = _F32(-32)  # make_qx_quants sets L = 0 for all-zero groups
        L[:, zero_d] = T2
    L += _F32(32)
    Lq = L.astype(np.uint8).T.reshape(nb, 2, 4, 32)  # [half][quarter][l]

    out = np.empty((nb, 210), dtype=np.uint8)
    lo = Lq & 0x0F
    hi = Lq >> 4
    for h in range(2):  # ql[64h + l] and ql[64h + 32 + l]
        out[:, 64 * h : 64 * h + 32] = lo[:, h, 0] | (lo[:, h, 2] << 4)
        out[:, 64 * h + 32 : 64 * h + 64] = lo[:, h, 1] | (lo[:, h, 3] << 4)
    out[:, 128:192] = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(nb, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d16.view(np.uint8).reshape(nb, 2)
    out[zero_block] = 0
    return out


# ------------------------------------------------------------------------ public

def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 ``[..., n]`` (n % 256 == 0) -> uint8 ``[..., n//256*144]`` (== quantize_row_q4_K_ref)."""
    return _chunked(x, 144, _CHUNK_BLOCKS["q4_k"], _q4_k_blocks, "Q4_K")


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """float32 ``[..., n]`` (n % 256 == 0) -> uint8 ``[..., n//256*176]`` (== quantize_row_q5_K_ref)."""
    return _chunked(x, 176, _CHUNK_BLOCKS["q5_k"], _q5_k_blocks, "Q5_K")


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """float32 ``[..., n]`` (n % 256 == 0) -> uint8 ``[..., n//256*210]`` (== quantize_row_q6_K_ref)."""
    return _chunked(x, 210, _CHUNK_BLOCKS["q6_k"], _q6_k_blocks, "Q6_K")
