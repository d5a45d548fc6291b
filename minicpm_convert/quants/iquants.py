"""NumPy ports of llama.cpp's IQ ("importance") types: IQ4_NL, IQ4_XS (non-linear 4-bit levels)
and IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S (signs plus a point of a lattice codebook, see
:mod:`.iq_grids`).

``iq3_s(rows, qw)``: float32 ``[nrows, n]`` and the importance array ``qw [n]`` (or None) ->
the bytes ``ggml_quantize_chunk`` writes (``quantize_iq*`` in ggml-quants.c).  Sub-blocks are
processed side by side (lane-major, see :mod:`.numeric`); the codebook search keeps C's order:
the first strictly better trial scale wins, a neighbour search keeps the first strictly closest
candidate.  These are the oracle of the compiled kernels (slow, but exact on any input llama.cpp
accepts); where llama.cpp would abort (no codebook point within float range) they raise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT

from . import iq_grids
from .numeric import F32, FLT_MAX, ONE, ZERO, as_f32, f16_bytes, first_absmax, inv_or_zero, macro_max, nearest_int, seqsum
from .searches import GROUP_MAX_EPS, make_qp_quants

QK_K = 256
GRID_OF = {QT.IQ2_XXS: "IQ2_XXS", QT.IQ2_XS: "IQ2_XS", QT.IQ2_S: "IQ2_S", QT.IQ3_XXS: "IQ3_XXS", QT.IQ3_S: "IQ3_S"}


def tables_for(qtype: QT) -> iq_grids.Tables:
    return iq_grids.tables(GRID_OF[QT(qtype)])


def _lanes(rows: np.ndarray, n: int) -> np.ndarray:
    """[nrows, m] -> [n, nrows*m/n]: column j is the j-th group of n consecutive values."""
    return np.ascontiguousarray(rows.reshape(-1, n).T)


def _sumx2(rows: np.ndarray, size: int) -> np.ndarray:
    """``sumx2 = 0; for (size) sumx2 += x*x;`` per super-block of ``size``."""
    S = rows.reshape(-1, size).T
    return seqsum(S * S, 0)


def _sigma2(rows: np.ndarray, size: int, factor: float) -> np.ndarray:
    """``sigma2 = factor*sumx2/QK_K`` (IQ2/IQ3)."""
    return F32(factor) * _sumx2(rows, size) / F32(size)


def _sigma2_iq4(rows: np.ndarray, size: int) -> np.ndarray:
    """``sigma2 = sumx2; sigma2 *= 2.f/super_block_size`` (IQ4)."""
    return _sumx2(rows, size) * (F32(2) / F32(size))


def _weights(rows, qw, block, sigma2, size):
    """(X, W) lanes of ``block`` values: ``qw * sqrtf(sigma2 + x*x)``, or ``x*x`` without qw."""
    X = _lanes(rows, block)
    if qw is None:
        return X, X * X
    Q = _lanes(np.broadcast_to(qw, rows.shape), block)
    return X, Q * np.sqrt(np.repeat(sigma2, size // block) + X * X)


# ===================================================================================== IQ4

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
_KV = KVALUES.astype(F32)


def best_index_int8(x: np.ndarray) -> np.ndarray:
    """``best_index_int8(16, kvalues_iq4nl, x)``: the nearest level (a tie or NaN takes the upper)."""
    mu = np.clip(np.searchsorted(_KV, x, side="right"), 1, 15)  # _KV[mu-1] <= x < _KV[mu]
    i = np.where(x - _KV[mu - 1] < _KV[mu] - x, mu - 1, mu)
    i = np.where(x <= _KV[0], 0, np.where(x >= _KV[15], 15, i))
    return np.where(np.isnan(x), 15, i)


def _iq4_scales(X: np.ndarray, W: np.ndarray, ntry: int = 7) -> np.ndarray:
    """Per 32-weight block, the scale ``quantize_row_iq4_nl_impl`` searches (0 for a zero block)."""
    amax, mx = first_absmax(X)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, ONE, mx)

    def sums(iscale):
        q = _KV[best_index_int8(iscale * X)]
        wq = W * q
        return seqsum(wq * X, 0), seqsum(wq * q, 0)  # w*q*xb[j], w*q*q

    sumqx, sumq2 = sums(ONE / (-mx / F32(KVALUES[0])))  # d = -max/values[0] (ntry > 0), id = 1/d
    d = np.where(sumq2 > 0, sumqx / sumq2, ZERO)
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        sumqx, sumq2 = sums(F32(itry + int(KVALUES[0])) / mx)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = np.where(better, sumqx / sumq2, d)
        best = np.where(better, d * sumqx, best)
    return np.where(zero, ZERO, d)


def _pack_iq4(L: np.ndarray) -> np.ndarray:
    """Levels [32, blocks] -> ``q4[16i + j] = L[32i + j] | L[32i + 16 + j] << 4`` [blocks, 16]."""
    L = L.T.astype(np.uint8)
    return L[:, :16] | (L[:, 16:] << 4)


def iq4_nl(rows: np.ndarray, qw=None) -> np.ndarray:
    """``quantize_iq4_nl`` (ntry 7, also without an importance array)."""
    X, W = _weights(rows, qw, 32, _sigma2_iq4(rows, 32), 32)
    d = _iq4_scales(X, W)
    L = best_index_int8(inv_or_zero(d) * X)
    return np.concatenate([f16_bytes(d), _pack_iq4(L)], axis=1).reshape(rows.shape[0], -1)


def iq4_xs(rows: np.ndarray, qw=None) -> np.ndarray:
    """``quantize_iq4_xs``: eight block scales as 6-bit multiples of one fp16 scale per 256."""
    X, W = _weights(rows, qw, 32, _sigma2_iq4(rows, QK_K), QK_K)
    nb = X.shape[1] // 8
    scales = _iq4_scales(X, W).reshape(nb, 8)
    _, max_scale = first_absmax(scales.T)
    d = -max_scale / F32(32)
    l = np.clip(nearest_int(inv_or_zero(d)[:, None] * scales), -32, 31)
    dl = (d[:, None] * as_f32(l)).reshape(-1)
    L = best_index_int8(inv_or_zero(dl) * X)
    l = l + 32
    scales_h = ((l >> 4) << (2 * np.arange(8))).sum(axis=1).astype("<u2").view(np.uint8).reshape(nb, 2)
    scales_l = (l[:, 0::2] & 0xF) | ((l[:, 1::2] & 0xF) << 4)
    return np.concatenate([f16_bytes(d), scales_h, scales_l.astype(np.uint8), _pack_iq4(L).reshape(nb, 128)],
                          axis=1).reshape(rows.shape[0], -1)


# ============================================================================ IQ3 / IQ2 grids

@dataclass(frozen=True)
class _Grid:
    """What differs between the codebook quantizers (quantize_row_iq{2_xxs,2_xs,2_s,3_xxs,3_s}_impl)."""
    qtype: QT
    block: int  # weights per sub-block (one scale)
    kmax: int  # kMaxQ: levels 0 .. kmax-1
    trials: tuple[int, int, float]  # is = first..last, id = (2*kMaxQ-1 + is*step) / max
    sigma: float  # sigma2 = sigma*sumx2/QK_K
    eps: float | None  # a sub-block with max < eps is zero (None: only max == 0, IQ3_S)
    parity: bool  # 7 sign bits per 8 (an odd count of negatives flips the least important one)
    on_grid_start: bool  # is_on_grid before the trials
    refine_all: bool  # the final pass re-snaps every group, not only those that were off the grid
    qp_start: bool = False  # IQ2_XXS: start from make_qp_quants' scale, trials over its eff_max


IQ2_XXS = _Grid(QT.IQ2_XXS, 32, 3, (-6, 6, 0.1), 1, GROUP_MAX_EPS, True, True, True, qp_start=True)
IQ2_XS = _Grid(QT.IQ2_XS, 16, 3, (-9, 9, 0.1), 1, GROUP_MAX_EPS, True, True, False)
IQ2_S = _Grid(QT.IQ2_S, 16, 3, (-9, 9, 0.1), 2, F32(1e-8), False, True, False)
IQ3_XXS = _Grid(QT.IQ3_XXS, 32, 8, (-15, 15, 0.2), 2, F32(1e-8), True, True, False)
IQ3_S = _Grid(QT.IQ3_S, 32, 8, (-9, 9, 0.2), 2, None, False, False, True)


def _signs(g: _Grid, X: np.ndarray, W: np.ndarray):
    """(xval, signs): |x| per weight and one sign byte per 8 weights [block/8, lanes]."""
    neg = ~(X >= 0)
    xval = np.where(neg, -X, X)
    n8, M = X.shape[0] // 8, X.shape[1]
    negs = neg.reshape(n8, 8, M)
    bit = (1 << np.arange(8))[None, :, None]
    s = (negs * bit).sum(axis=1)
    if g.parity:
        a = (W * X * X).reshape(n8, 8, M)  # weight*xb*xb; the first strict minimum is flipped
        m, imin = a[:, 0], np.zeros((n8, M), np.int64)
        for i in range(1, 8):
            take = a[:, i] < m
            m = np.where(take, a[:, i], m)
            imin = np.where(take, i, imin)
        odd = negs.sum(axis=1) % 2 == 1
        k, j = np.nonzero(odd)
        x3 = xval.reshape(n8, 8, M)
        x3[k, imin[k, j], j] = -x3[k, imin[k, j], j]
        s = np.where(odd, s ^ (1 << imin), s) & 127
    return xval, s.astype(np.uint8)


class _Search:
    """The codebook of one type, applied to lanes of sub-blocks."""

    def __init__(self, g: _Grid, xval: np.ndarray, W: np.ndarray, active: np.ndarray):
        self.g, self.T = g, tables_for(g.qtype)
        self.group = self.T.group
        self.G = g.block // self.group
        self.xval, self.W, self.active = xval, W, active
        self.x3 = xval.reshape(self.G, self.group, -1)
        self.w3 = np.sqrt(W).reshape(self.G, self.group, -1)  # waux

    def levels(self, iscale: np.ndarray) -> np.ndarray:
        """``MAX(0, MIN(kMaxQ-1, nearest_int(0.5f*(id*xval - 1))))`` for every weight."""
        return np.clip(nearest_int(F32(0.5) * (iscale * self.xval - ONE)), 0, self.g.kmax - 1)

    def point(self, L: np.ndarray) -> np.ndarray:
        """The codebook index of each group of levels [G, lanes], -1 off the grid."""
        L3 = L.reshape(self.G, self.group, -1)
        u = np.zeros(L3[:, 0].shape, np.int64)
        for i in range(self.group):
            u |= L3[:, i].astype(np.int64) << (self.T.bits * i)
        return u, self.T.index[u]

    def snap(self, L: np.ndarray, scale: np.ndarray, which: np.ndarray) -> np.ndarray:
        """``iq{2,3}_find_best_neighbour`` for the groups ``which`` [G, lanes] that are off the
        grid: their levels become the candidate point nearest (weighted by waux) to xval/scale.
        Returns the codebook index of every group (-1 where not looked up)."""
        u, idx = self.point(L)
        gk, lk = np.nonzero(which & (idx < 0))
        if gk.size:
            cand = self.T.candidates(u[gk, lk])
            pg = self.T.grid[cand].astype(F32)  # [K, width, group]
            xv, wa, sc = self.x3[gk, :, lk], self.w3[gk, :, lk], scale[lk][:, None]
            d2 = np.zeros(cand.shape, F32)
            for i in range(self.group):
                diff = sc * pg[:, :, i] - xv[:, None, i]
                d2 += wa[:, None, i] * diff * diff
            d2 = np.where(d2 < FLT_MAX, d2, np.inf)  # best_d2 starts at FLT_MAX; NaN never wins
            j = d2.argmin(axis=1)
            if not np.isfinite(d2[np.arange(j.size), j]).all():
                raise ValueError(f"{self.g.qtype.name}: no codebook point within float range "
                                 "(llama.cpp aborts on this input)")
            best = cand[np.arange(j.size), j]
            idx[gk, lk] = best
            L3 = L.reshape(self.G, self.group, -1)
            L3[gk, :, lk] = (self.T.grid[best].astype(np.int32) - 1) // 2
        return idx

    def sums(self, L: np.ndarray):
        q = as_f32(2 * L + 1)
        return seqsum(self.W * self.xval * q, 0), seqsum(self.W * q * q, 0)  # w*xval*q, w*q*q


def _grid_search(g: _Grid, X: np.ndarray, W: np.ndarray):
    """The sub-block loop of a codebook quantizer for lanes X, W [block, lanes].

    Returns (scale [lanes], levels [block, lanes], signs [block/8, lanes], codebook index
    [groups, lanes], processed [lanes]); skipped (zero) sub-blocks have scale 0."""
    xval, signs = _signs(g, X, W)
    mx = macro_max(xval)
    active = (mx != 0) if g.eps is None else ~(mx < g.eps)
    if g.qp_start:  # IQ2_XXS
        scale, _ = make_qp_quants(xval, g.kmax + 1, W)
        denom = scale * F32(g.kmax)  # eff_max
        active &= ~(denom <= 0)
    else:
        scale = mx / F32(2 * g.kmax - 1)
        denom = mx
    denom = np.where(active, denom, ONE)
    S = _Search(g, xval, W, active)
    L = np.zeros(X.shape, np.int32)
    on_grid = np.full((S.G, X.shape[1]), g.on_grid_start)
    best = np.zeros(X.shape[1], F32)
    first, last, step = g.trials
    every = np.broadcast_to(active, on_grid.shape)
    for t in range(first, last + 1):
        iscale = (F32(2 * g.kmax - 1) + F32(t) * F32(step)) / denom
        laux = S.levels(iscale)
        on_aux = S.point(laux)[1] >= 0
        S.snap(laux, ONE / iscale, every)
        sumqx, sumq2 = S.sums(laux)
        better = active & (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        scale = np.where(better, sumqx / sumq2, scale)
        best = np.where(better, scale * sumqx, best)
        L = np.where(better, laux, L)
        on_grid = np.where(better, on_aux, on_grid)

    # the final pass at the chosen scale (IQ2_XXS: always; others: if a group was off the grid)
    redo = active & (scale > 0)
    if not g.qp_start:
        redo &= (~on_grid).any(axis=0)
    groups = np.broadcast_to(redo, on_grid.shape) & (True if g.refine_all or g.qp_start else ~on_grid)
    if groups.any():
        lr = S.levels(inv_or_zero(np.where(redo, scale, ZERO)))
        S.snap(lr, scale, groups)
        L = np.where(np.repeat(groups, S.group, axis=0), lr, L)
        sumqx, sumq2 = S.sums(L)
        scale = np.where(redo & (sumq2 > 0), sumqx / sumq2, scale)

    flip = active & (scale < 0)  # "should never happen": flip the scale and the signs
    scale = np.where(flip, -scale, scale)
    signs = np.where(flip, ~signs & (127 if g.parity else 255), signs).astype(np.uint8)
    _, index = S.point(L)
    if (index[:, active] < 0).any():
        raise ValueError(f"{g.qtype.name}: levels off the codebook (llama.cpp aborts on this input)")
    # a skipped sub-block writes neither codebook indices nor signs
    return np.where(active, scale, ZERO), L, np.where(active, signs, 0), np.where(active, index, 0), active


def _superblock_scales(scales: np.ndarray, fudge: float, top: int = 15):
    """(d bytes, 4-bit scales [nb, n], nonzero [nb]): ``d = max_scale/31`` stored as fp16 of
    ``d*fudge``, scales ``nearest_int(0.5f*(scale/d - 1))`` clamped to [0, 15]."""
    max_scale = macro_max(scales.T, 0.0)
    nonzero = max_scale != 0
    d = max_scale / F32(31)
    iscale = ONE / np.where(nonzero, d, ONE)
    l = np.clip(nearest_int(F32(0.5) * (iscale[:, None] * scales - ONE)), 0, top)
    dh = f16_bytes(np.where(nonzero, d * F32(fudge), ZERO))
    return dh, np.where(nonzero[:, None], l, 0), nonzero


def _codebook(g: _Grid, rows: np.ndarray, qw):
    X, W = _weights(rows, qw, g.block, _sigma2(rows, QK_K, g.sigma), QK_K)
    if qw is None and g.qtype == QT.IQ2_S:  # weight[i] = 0.25f*sigma2 + xb[i]*xb[i]
        W = F32(0.25) * np.repeat(_sigma2(rows, QK_K, g.sigma), QK_K // g.block) + X * X
    scale, L, signs, index, active = _grid_search(g, X, W)
    nb = rows.size // QK_K
    per = QK_K // g.block
    return nb, per, scale.reshape(nb, per), signs, index, active


def _u32(words: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(words.astype("<u4")).view(np.uint8).reshape(words.shape[0], -1)


def iq2_xxs(rows: np.ndarray, qw=None) -> np.ndarray:
    nb, per, scales, signs, index, _ = _codebook(IQ2_XXS, rows, qw)
    dh, l, nonzero = _superblock_scales(scales, 1.0)
    # per sub-block: word 0 = 4 grid indices (8 bits each), word 1 = 4 x 7 sign bits | scale << 28
    grid = (index.astype(np.uint32) << (8 * np.arange(4))[:, None]).sum(axis=0).reshape(nb, per)
    sgn = (signs.astype(np.uint32) << (7 * np.arange(4))[:, None]).sum(axis=0).reshape(nb, per)
    words = np.stack([grid, sgn | (l.astype(np.uint32) << 28)], axis=2).reshape(nb, 2 * per)
    words[~nonzero] = 0
    return np.concatenate([dh, _u32(words)], axis=1).reshape(rows.shape[0], -1)


def iq2_xs(rows: np.ndarray, qw=None) -> np.ndarray:
    nb, per, scales, signs, index, _ = _codebook(IQ2_XS, rows, qw)
    dh, l, nonzero = _superblock_scales(scales, 1.0)
    q2 = (index.astype(np.uint16) | (signs.astype(np.uint16) << 9)).T.reshape(nb, 2 * per)  # [ib][k]
    q2[~nonzero] = 0
    sc = (l[:, 0::2] | (l[:, 1::2] << 4)).astype(np.uint8)
    qs = np.ascontiguousarray(q2.astype("<u2")).view(np.uint8).reshape(nb, -1)
    return np.concatenate([dh, qs, sc], axis=1).reshape(rows.shape[0], -1)


def iq2_s(rows: np.ndarray, qw=None) -> np.ndarray:
    nb, per, scales, signs, index, active = _codebook(IQ2_S, rows, qw)
    dh, l, _ = _superblock_scales(scales, 0.9875)
    idx = index.T.reshape(nb, 2 * per)  # i8 = 2*ib + k
    act = np.repeat(active.reshape(nb, per), 2, axis=1)
    qs = np.where(act, idx & 255, 0).astype(np.uint8)
    qh = (np.where(act, idx >> 8, 0).reshape(nb, 8, 4) << (2 * np.arange(4))).sum(axis=2).astype(np.uint8)
    sg = np.where(act, signs.T.reshape(nb, 2 * per), 0).astype(np.uint8)
    sc = (l[:, 0::2] | (l[:, 1::2] << 4)).astype(np.uint8)
    return np.concatenate([dh, qs, sg, qh, sc], axis=1).reshape(rows.shape[0], -1)


def iq3_xxs(rows: np.ndarray, qw=None) -> np.ndarray:
    nb, per, scales, signs, index, _ = _codebook(IQ3_XXS, rows, qw)
    dh, l, nonzero = _superblock_scales(scales, 1.0125)
    qs = index.T.reshape(nb, 8 * per).astype(np.uint8)  # q3[8*ib + k]
    sgn = (signs.astype(np.uint32) << (7 * np.arange(4))[:, None]).sum(axis=0).reshape(nb, per)
    words = sgn | (l.astype(np.uint32) << 28)
    out = np.concatenate([dh, qs, _u32(words)], axis=1)
    out[~nonzero, 2:] = 0  # memset(qs, 0, quant_size)
    return out.reshape(rows.shape[0], -1)


def iq3_s(rows: np.ndarray, qw=None) -> np.ndarray:
    nb, per, scales, signs, index, active = _codebook(IQ3_S, rows, qw)
    dh, l, _ = _superblock_scales(scales, 1.033)
    act = active.reshape(nb, per)
    idx = index.T.reshape(nb, per, 8)
    sg = signs.T.reshape(nb, per, 4)
    # qs and signs advance only past processed sub-blocks (a zero one 'continue's before the
    # pointer increments): they are packed in processing order, the rest stays zero
    qs = np.zeros((nb, per, 8), np.uint8)
    sb = np.zeros((nb, per, 4), np.uint8)
    slot = np.cumsum(act, axis=1) - 1
    b, i = np.nonzero(act)
    qs[b, slot[b, i]] = idx[b, i] & 255
    sb[b, slot[b, i]] = sg[b, i]
    qh = np.where(act[:, :, None], (idx >> 8) << np.arange(8), 0).sum(axis=2).astype(np.uint8)  # qh[ib] bit k
    sc = (l[:, 0::2] | (l[:, 1::2] << 4)).astype(np.uint8)
    return np.concatenate([dh, qs.reshape(nb, -1), qh, sb.reshape(nb, -1), sc], axis=1).reshape(rows.shape[0], -1)
