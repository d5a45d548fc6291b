"""The scale searches of llama.cpp's k-quants (ggml-quants.c), vectorised over groups.

Each function takes a group-major float32 array ``X[n, ...]`` (axis 0: the ``n`` values of a
group, the C loop index; the other axes: independent groups side by side) and returns what the C
function returns for every group at once, with the same float32 operations in the same order
(see :mod:`.numeric`).  Names and arguments follow the C functions.
"""

from __future__ import annotations

import numpy as np

from .numeric import F32, ONE, ZERO, as_f32, first_absmax, macro_max, nearest_int, running, seqsum

GROUP_MAX_EPS = F32(1e-15)


def make_qx_quants(X: np.ndarray, nmax: int, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=W)`` (pass ``W = X*X`` for ``qw == NULL``).

    Returns (scale, L) with L int32 levels ``l + nmax`` in [0, 2*nmax - 1] (0 for an all-zero group)."""
    amax, mx = first_absmax(X)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, ONE, mx)  # dummy divisor for the all-zero groups
    WX = W * X

    def trial(iscale):
        l = np.clip(nearest_int(iscale * X), -nmax, nmax - 1)
        fl = as_f32(l)
        return l, seqsum(WX * fl, 0), seqsum(W * fl * fl, 0)  # w*x[i]*l, w*l*l

    l, sumlx, suml2 = trial(F32(-nmax) / mx)
    L = l + nmax
    scale = np.where(suml2 != 0, sumlx / suml2, ZERO)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better, l + nmax, L)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    return np.where(zero, ZERO, scale), np.where(zero, 0, L)


def make_qkx(X: np.ndarray, W: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
             use_mad: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``make_qkx2_quants`` / ``make_qkx3_quants`` (same arithmetic once the weights are given;
    qkx3's ``max <= min`` is qkx2's ``max == min`` for finite data), ``nstep >= 1``.

    Returns (scale, the_min, L) with L int32 levels in [0, nmax]."""
    lo = running(X, np.less)
    hi = running(X, np.greater)
    sum_w = seqsum(W)
    sum_x = seqsum(W * X)
    lo = np.where(lo > 0, ZERO, lo)
    early = hi == lo  # L = 0, *the_min = -min, return 0
    mn = lo
    den = np.where(early, ONE, hi - mn)  # (max - min), kept in step with min

    def levels(iscale, m):
        return np.clip(nearest_int(iscale * (X - m)), 0, nmax)

    def error(fl, scale, m):
        diff = scale * fl + m - X
        diff = np.abs(diff) if use_mad else diff * diff
        return seqsum(W * diff, 0)

    iscale = F32(nmax) / den
    scale = ONE / iscale
    L = levels(iscale, mn)
    best = error(as_f32(L), scale, mn)
    for step in range(nstep + 1):
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / den
        laux = levels(iscale, mn)
        fl = as_f32(laux)
        wl = W * fl
        sum_l, sum_l2, sum_xl = seqsum(wl, 0), seqsum(wl * fl, 0), seqsum(wl * X, 0)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = np.where(pos, ZERO, this_min)
        this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        cur = error(fl, this_scale, this_min)
        better = (D > 0) & (cur < best) & ~early
        L = np.where(better, laux, L)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
        den = np.where(better, hi - mn, den)
    return np.where(early, ZERO, scale), -mn, np.where(early, 0, L)


def make_qp_quants(X: np.ndarray, nmax: int, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_qp_quants(n, nmax, x, L, quant_weights=W)`` for non-negative x (sub-block scales).

    Returns (scale, L) with L the uint8 levels C stores (a negative level wraps, as in C)."""
    mx = macro_max(X, 0.0)
    zero = mx < GROUP_MAX_EPS
    mx = np.where(zero, ONE, mx)
    iscale = F32(nmax) / mx
    scale = ONE / iscale
    diff = X - scale * as_f32(nearest_int(iscale * X) & 0xFF)  # the first L, as uint8
    best = seqsum(W * diff * diff, 0)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F32(0.1) * F32(step) + F32(nmax)) / mx
        scale_is = ONE / iscale_is
        diff = X - scale_is * as_f32(np.minimum(nmax, nearest_int(iscale_is * X)))
        mse = seqsum(W * diff * diff, 0)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, iscale_is, iscale)
    l = np.minimum(nmax, nearest_int(iscale * X))
    fl = as_f32(l)  # the sums take the int level, L keeps its uint8 store
    sumlx, suml2 = seqsum(W * X * fl, 0), seqsum(W * fl * fl, 0)
    L = l & 0xFF
    for _ in range(5):  # a pass that changes nothing leaves the state as it was: no early exit needed
        for i in range(X.shape[0]):
            w, x, li = W[i], X[i], as_f32(L[i])
            slx = sumlx - w * x * li
            sl2 = suml2 - w * li * li
            new_l = np.minimum(nmax, nearest_int(x * sl2 / slx))
            fn = as_f32(new_l)
            slx_n = slx + w * x * fn
            sl2_n = sl2 + w * fn * fn
            take = (slx > 0) & (sl2 > 0) & (new_l != L[i]) & (slx_n * slx_n * suml2 > sumlx * sumlx * sl2_n)
            L[i] = np.where(take, new_l & 0xFF, L[i])
            sumlx = np.where(take, slx_n, sumlx)
            suml2 = np.where(take, sl2_n, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, ZERO)
    return np.where(zero, ZERO, scale), np.where(zero, 0, L).astype(np.uint8)


def make_q3_quants(X: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: returns (scale, L) with L int32 levels
    ``l + nmax`` (0 for an all-zero group)."""
    amax, mx = first_absmax(X)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, ONE, mx)
    L = np.clip(nearest_int(F32(-nmax) / mx * X), -nmax, nmax - 1)
    W = X * X
    fl = as_f32(L)
    sumlx, suml2 = seqsum(W * X * fl, 0), seqsum(W * fl * fl, 0)
    for _ in range(5):  # as in make_qp_quants, an unchanged pass is a no-op
        for i in range(X.shape[0]):
            w, x, li = W[i], X[i], as_f32(L[i])
            slx = sumlx - w * x * li
            sl2 = suml2 - w * li * li
            new_l = np.clip(nearest_int(x * sl2 / slx), -nmax, nmax - 1)
            fn = as_f32(new_l)
            slx_n = slx + w * x * fn
            sl2_n = sl2 + w * fn * fn
            take = (slx > 0) & (new_l != L[i]) & (sl2_n > 0) & (slx_n * slx_n * suml2 > sumlx * sumlx * sl2_n)
            L[i] = np.where(take, new_l, L[i])
            sumlx = np.where(take, slx_n, sumlx)
            suml2 = np.where(take, sl2_n, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, ZERO)
    return np.where(zero, ZERO, scale), np.where(zero, 0, L + nmax)
