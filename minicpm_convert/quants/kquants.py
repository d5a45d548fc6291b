"""NumPy ports of llama.cpp's k-quants Q2_K .. Q6_K, with and without an importance matrix.

One function per type, ``q4_k(rows, qw)``: float32 ``rows [nrows, n]`` (n % 256 == 0) and the
importance array ``qw [n]`` (or None) -> the bytes ``ggml_quantize_chunk`` writes,
uint8 ``[nrows, n/256 * type_size]``.  Without ``qw`` that is ``quantize_row_<type>_ref``; with
it, ``quantize_row_<type>_impl`` (ggml-quants.c).  Every super-block is independent, so all of
them are processed side by side (lane-major, see :mod:`.numeric`); these are the oracle of the
compiled kernels and the fallback when the extension is not built.
"""

from __future__ import annotations

import numpy as np

from .numeric import F32, ONE, ZERO, as_f32, f16_bytes, f16_round, first_absmax, nearest_int, pack_2bit, running, seqsum
from .searches import GROUP_MAX_EPS, make_q3_quants, make_qkx, make_qp_quants, make_qx_quants

QK_K = 256


# ----------------------------------------------------------------------------- layout helpers

def _lanes(blocks: np.ndarray, n: int) -> np.ndarray:
    """(nb, 256) -> (n, nb*256/n): column m is sub-block m (m // (256/n) is its super-block)."""
    return np.ascontiguousarray(blocks.reshape(-1, n).T)


def _blocks(L: np.ndarray, nb: int) -> np.ndarray:
    """Inverse of :func:`_lanes`."""
    return L.T.reshape(nb, QK_K)


def _per_lane(v: np.ndarray, n: int) -> np.ndarray:
    """A per-super-block value repeated for each of its 256/n sub-blocks."""
    return np.repeat(v, QK_K // n)


def _superblocks(rows: np.ndarray, qw):
    nb = rows.size // QK_K
    blocks = rows.reshape(nb, QK_K)
    Q = None if qw is None else np.broadcast_to(qw.reshape(1, -1, QK_K), (rows.shape[0], rows.shape[1] // QK_K, QK_K)).reshape(nb, QK_K)
    return blocks, Q, nb


def _sigma2(blocks: np.ndarray, factor: float) -> np.ndarray:
    """``float sumx2 = 0; for (256) sumx2 += x*x; sigma2 = factor*sumx2/QK_K`` per super-block."""
    B = blocks.T
    return F32(factor) * seqsum(B * B, 0) / F32(QK_K)


def _imatrix_weights(X: np.ndarray, Q: np.ndarray, sigma2: np.ndarray, n: int) -> np.ndarray:
    """``qw[l] * sqrtf(sigma2 + x[l]*x[l])`` for lanes of n values."""
    return Q * np.sqrt(_per_lane(sigma2, n) + X * X)


def _requantize(X: np.ndarray, L: np.ndarray, d: np.ndarray, dm, lo: int, hi: int, offset: int = 0) -> np.ndarray:
    """``if (!d) continue; l = nearest_int((x + dm)/d); L = MAX(lo, MIN(hi, l)) + offset``
    per lane (dm None: ``x/d``); lanes with d == 0 keep L."""
    t = X / d if dm is None else (X + dm) / d
    new = np.clip(nearest_int(t), lo, hi) + offset
    return np.where(d != 0, new, L)


# ----------------------------------------------------------------------------- Q4_K / Q5_K

def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12 scale bytes of Q4_K/Q5_K from 8 (uint8) scales and mins, [nb, 8] each; C's uint8
    stores wrap, so values above 63 (possible for Q4_K with an imatrix) pack as C packs them."""
    ls, lm = ls.astype(np.int32), lm.astype(np.int32)
    out = np.zeros((ls.shape[0], 12), np.int32)
    out[:, 0:4] = ls[:, :4]
    out[:, 4:8] = lm[:, :4]
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    return (out & 0xFF).astype(np.uint8)


def _unpack_k4_scales(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_scale_min_k4`` for j = 0..7: (sc, m), int32 [nb, 8]."""
    q = q.astype(np.int32)
    sc = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _qkx_superblocks(rows, qw, nmax, ref_params):
    """Q4_K/Q5_K up to the levels: (d, dmin, 12 scale bytes, levels [nb, 256])."""
    blocks, Q, nb = _superblocks(rows, qw)
    X = _lanes(blocks, 32)
    if qw is None:  # quantize_row_q{4,5}_K_ref
        av_x = np.sqrt(seqsum(X * X, 0) / F32(32))
        W = av_x + np.abs(X)
        scale, the_min, L = make_qkx(X, W, nmax, *ref_params)
        scales, mins = scale.reshape(nb, 8), the_min.reshape(nb, 8)
        max_scale = running(scales.T, np.greater, 0.0)
        max_min = running(mins.T, np.greater, 0.0)
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, ZERO)
        inv_min = np.where(max_min > 0, F32(63) / max_min, ZERO)
        ls = np.minimum(63, nearest_int(inv_scale[:, None] * scales) & 0xFF)
        lm = np.minimum(63, nearest_int(inv_min[:, None] * mins) & 0xFF)
        d_block, m_block = max_scale / F32(63), max_min / F32(63)
    else:  # quantize_row_q{4,5}_K_impl
        sigma2 = _sigma2(blocks, 2)
        W = _imatrix_weights(X, _lanes(Q, 32), sigma2, 32)
        sw = seqsum(W, 0)
        scale, the_min, L = make_qkx(X, W, nmax, -0.9, 0.05, 36)
        sw8 = sw.reshape(nb, 8).T
        d_block, ls = make_qp_quants(scale.reshape(nb, 8).T, 63, sw8)
        m_block, lm = make_qp_quants(the_min.reshape(nb, 8).T, 63, sw8)
        ls, lm = ls.T, lm.T
        if nmax == 31:  # Q5_K clamps (ls = MIN(63, ls)), Q4_K does not
            ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    packed = _pack_k4_scales(ls, lm)
    sc, m = _unpack_k4_scales(packed)
    d = (f16_round(d_block)[:, None] * as_f32(sc)).reshape(-1)
    dm = (f16_round(m_block)[:, None] * as_f32(m)).reshape(-1)
    L = _requantize(X, L, d, dm, 0, nmax)
    return d_block, m_block, packed, _blocks(L, nb).astype(np.uint8)


def q4_k(rows: np.ndarray, qw=None) -> np.ndarray:
    d, dmin, scales, L = _qkx_superblocks(rows, qw, 15, (-1.0, 0.1, 20))
    nb = L.shape[0]
    g = L.reshape(nb, 4, 2, 32)
    out = np.concatenate([f16_bytes(d), f16_bytes(dmin), scales, (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(nb, 128)], axis=1)
    return out.reshape(rows.shape[0], -1)


def q5_k(rows: np.ndarray, qw=None) -> np.ndarray:
    d, dmin, scales, L = _qkx_superblocks(rows, qw, 31, (-0.5, 0.1, 15))
    nb = L.shape[0]
    qh = np.packbits(L.reshape(nb, 8, 32) >> 4, axis=1, bitorder="little").reshape(nb, 32)  # bit s of qh[j]: sub-block s
    g = (L & 0x0F).reshape(nb, 4, 2, 32)
    out = np.concatenate([f16_bytes(d), f16_bytes(dmin), scales, qh, (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(nb, 128)], axis=1)
    return out.reshape(rows.shape[0], -1)


# ----------------------------------------------------------------------------- Q6_K

def q6_k(rows: np.ndarray, qw=None) -> np.ndarray:
    blocks, Q, nb = _superblocks(rows, qw)
    X = _lanes(blocks, 16)
    # quantize_row_q6_K_impl passes the importance array as make_qx_quants' weights as is
    scale, L = make_qx_quants(X, 32, X * X if qw is None else _lanes(Q, 16))
    scales = scale.reshape(nb, 16)
    max_abs, max_scale = first_absmax(scales.T)
    zero_block = max_abs < GROUP_MAX_EPS
    iscale = F32(-128) / np.where(zero_block, ONE, max_scale)
    d16 = ONE / iscale
    sc = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)  # int8_t store
    d = (f16_round(d16)[:, None] * as_f32(sc)).reshape(-1)
    Lq = _blocks(_requantize(X, L, d, None, -32, 31, 32), nb).astype(np.uint8).reshape(nb, 2, 4, 32)
    lo, hi = Lq & 0x0F, Lq >> 4
    ql = np.concatenate([np.concatenate([lo[:, h, 0] | (lo[:, h, 2] << 4), lo[:, h, 1] | (lo[:, h, 3] << 4)], axis=1)
                         for h in range(2)], axis=1)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), f16_bytes(d16)], axis=1)
    out[zero_block] = 0  # memset(&y[i], 0, ...), d = 0
    return out.reshape(rows.shape[0], -1)


# ----------------------------------------------------------------------------- Q2_K

def q2_k(rows: np.ndarray, qw=None) -> np.ndarray:
    blocks, Q, nb = _superblocks(rows, qw)
    X = _lanes(blocks, 16)
    if qw is None:  # quantize_row_q2_K_ref
        scale, the_min, L = make_qkx(X, np.abs(X), 3, -0.5, 0.1, 15, use_mad=True)
        scales, mins = scale.reshape(nb, 16), the_min.reshape(nb, 16)
        max_scale = running(scales.T, np.greater, 0.0)
        max_min = running(mins.T, np.greater, 0.0)
        has_s, has_m = max_scale > 0, max_min > 0
        ls = np.where(has_s[:, None], nearest_int((F32(15) / np.where(has_s, max_scale, ONE))[:, None] * scales), 0)
        lm = np.where(has_m[:, None], nearest_int((F32(15) / np.where(has_m, max_min, ONE))[:, None] * mins), 0)
        packed = ((ls | (lm << 4)) & 0xFF).astype(np.uint8)  # y.scales[j] = l; y.scales[j] |= l << 4
        d_block = np.where(has_s, max_scale / F32(15), ZERO)
        m_block = np.where(has_m, max_min / F32(15), ZERO)
    else:  # quantize_row_q2_K_impl
        sigma2 = _sigma2(blocks, 1)
        W = _imatrix_weights(X, _lanes(Q, 16), sigma2, 16)
        sw = seqsum(W, 0)
        scale, the_min, L = make_qkx(X, W, 3, -0.9, 0.05, 36)
        sw16 = sw.reshape(nb, 16).T
        d_block, ls = make_qp_quants(scale.reshape(nb, 16).T, 15, sw16)
        m_block, lm = make_qp_quants(the_min.reshape(nb, 16).T, 15, sw16)
        packed = ((ls.T.astype(np.int32) | (lm.T.astype(np.int32) << 4)) & 0xFF).astype(np.uint8)
    p = packed.astype(np.int32)
    d = (f16_round(d_block)[:, None] * as_f32(p & 0xF)).reshape(-1)
    dm = (f16_round(m_block)[:, None] * as_f32(p >> 4)).reshape(-1)
    Lq = _blocks(_requantize(X, L, d, dm, 0, 3), nb)
    out = np.concatenate([packed, pack_2bit(Lq), f16_bytes(d_block), f16_bytes(m_block)], axis=1)
    return out.reshape(rows.shape[0], -1)


# ----------------------------------------------------------------------------- Q3_K

def _pack_q3_scales(l: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit values [nb, 16] (0..63) -> the 12 scale bytes of Q3_K."""
    l = l.astype(np.int32)
    out = np.zeros((l.shape[0], 12), np.int32)
    out[:, 0:8] = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
    hi = l >> 4
    for j in range(16):
        out[:, 8 + j % 4] |= hi[:, j] << (2 * (j // 4))
    return (out & 0xFF).astype(np.uint8)


def _unpack_q3_scales(s: np.ndarray) -> np.ndarray:
    """The signed sub-scales [nb, 16] the requantization reads back (``sc - 32``, int8)."""
    s = s.astype(np.int32)
    low = np.concatenate([s[:, :8] & 0xF, s[:, :8] >> 4], axis=1)
    hi = np.stack([(s[:, 8 + j % 4] >> (2 * (j // 4))) & 3 for j in range(16)], axis=1)
    v = ((low | (hi << 4)) - 32) & 0xFF  # int8_t sc = (...) - 32
    return np.where(v > 127, v - 256, v)


def q3_k(rows: np.ndarray, qw=None) -> np.ndarray:
    blocks, Q, nb = _superblocks(rows, qw)
    X = _lanes(blocks, 16)
    if qw is None:  # quantize_row_q3_K_ref
        scale, L = make_q3_quants(X, 4)
        scales = scale.reshape(nb, 16)
        _, max_scale = first_absmax(scales.T)
        has = max_scale != 0
        iscale = F32(-32) / np.where(has, max_scale, ONE)
        l = nearest_int(iscale[:, None] * scales) & 0xFF  # int8_t l = nearest_int(...)
        l = np.where(l > 127, l - 256, l)
        l = np.where(has[:, None], np.clip(l, -32, 31) + 32, 0)
        packed = _pack_q3_scales(l)
        d_block = np.where(has, ONE / iscale, ZERO)
    else:  # quantize_row_q3_K_impl
        sigma2 = _sigma2(blocks, 2)
        W = _imatrix_weights(X, _lanes(Q, 16), sigma2, 16)
        sw = seqsum(W, 0)
        scale, L = make_qx_quants(X, 4, W)
        d_block, ls = make_qx_quants(scale.reshape(nb, 16).T, 32, sw.reshape(nb, 16).T)
        packed = _pack_q3_scales(ls.T)
    d = (f16_round(d_block)[:, None] * as_f32(_unpack_q3_scales(packed))).reshape(-1)
    Lq = _blocks(_requantize(X, L, d, None, -4, 3, 4), nb)
    hmask = np.packbits((Lq > 3).reshape(nb, 8, 32).astype(np.uint8), axis=1, bitorder="little").reshape(nb, 32)
    Lq = np.where(Lq > 3, Lq - 4, Lq)
    out = np.concatenate([hmask, pack_2bit(Lq), packed, f16_bytes(d_block)], axis=1)
    return out.reshape(rows.shape[0], -1)
