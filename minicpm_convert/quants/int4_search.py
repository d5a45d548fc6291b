"""The data-free INT4 group search: (scale, zero, codes) of every group, one fixed sequence of
float32 operations, run by the compiled kernel (csrc/int4.c, 8 or 16 groups side by side) or by
this NumPy port, its oracle: both give the same bits (tests/quants/test_int4_compiled.py).

For a group of n values x with error weights w (|x| + the group's rms, llama.cpp's Q4_K choice,
or the caller's per-column weights), the candidates are:
- plain rounding: s0 = (max - min)/15 over the range with 0 inside (sym: +-absmax), zero 8 (sym)
  or round(-min/s0) clamped to 1..15 (GPTQ v1 cannot store zero 0: a group without negative values
  maps [0, max] onto codes 1..15 instead);
- scales range/t over a grid of divisors t, coarse to fine: the coarse grid, then the best t so
  far +-0.25 and +-0.125; each with the least-squares refit of its scale
  (asym: scale and zero) for the codes it gives.
Each candidate is scored by its weighted squared error, expanded in the group's sums so that a
candidate and its refit cost one rounding pass; plain rounding is scored on its own codes, so the
choice is never worse than it in that measure. Every sum runs in index order (no pairwise or
threaded reduction), every scale is the float16 value a loader sees (never 0).

`search_groups` also returns, per group, the squared error of the chosen codes and of plain
rounding and the sum of squares, for the export's error report.
"""

from __future__ import annotations

import numpy as np

QMAX = 15
SYM_ZERO = 8
FP16_TINY = np.float32(2.0 ** -24)  # smallest positive float16: stands in for a scale that underflows
CLIP = np.float32(16)  # x/s is clipped to +-16 before rounding: every code is in range by then
MAX_GROUP = 256  # the kernel's per-group buffers

SYM_COARSE = (5.5, 6.0, 6.5, 7.0, 7.5, 8.0, 8.5)
SYM_FINE = (0.25, 0.125)
SYM_PLAIN = 7.5  # s0 = absmax / 7.5: the best divisor before any other is tried
ASYM_COARSE = (12.0, 12.5, 13.0, 13.5, 14.0, 14.5, 15.0, 15.5, 16.0, 16.5, 17.0)
ASYM_FINE = (0.25, 0.125)
ASYM_PLAIN = 15.0

F32 = np.float32
_ZERO, _ONE, _TWO = F32(0), F32(1), F32(2)


def fp16_scale(s: np.ndarray) -> np.ndarray:
    """The float16 value a loader will see, as float32; FP16_TINY for 0 or a negative value."""
    with np.errstate(over="ignore"):
        s16 = s.astype(np.float16).astype(np.float32)
    return np.where(s16 > 0, s16, FP16_TINY)


def _round_clipped(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Nearest integer (ties to even) of v clipped to [lo, hi], as float32."""
    return np.rint(np.clip(v, F32(lo), F32(hi)))


def _levels(X: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Codes 0..15 (float32) of X [n, G] for scales s [G] and zeros z [G]: nearest rounding."""
    return np.clip(_round_clipped(X / s, -CLIP, CLIP) + z, _ZERO, F32(QMAX))


def _asym_zero(xmin: np.ndarray, s: np.ndarray) -> np.ndarray:
    return np.clip(_round_clipped(-xmin / s, 0, CLIP), _ONE, F32(QMAX))


class _Group:
    """One candidate pass and the running best, for G groups held as X [n, G]."""

    def __init__(self, X: np.ndarray, W: np.ndarray):
        self.X, self.W = X, W
        self.WX = W * X
        G = X.shape[1]
        self.sw, self.swx, self.swxx = (np.zeros(G, F32) for _ in range(3))
        for i in range(X.shape[0]):
            self.sw += W[i]
            self.swx += self.WX[i]
            self.swxx += self.WX[i] * X[i]
        self.err = self.s = self.z = self.t = None

    def sums(self, s, z):
        Q = _levels(self.X, s, z)
        G = self.X.shape[1]
        swq, swqq, swxq = (np.zeros(G, F32) for _ in range(3))
        for i in range(self.X.shape[0]):
            wq = self.W[i] * Q[i]
            swq += wq
            swqq += wq * Q[i]
            swxq += self.WX[i] * Q[i]
        return swq, swqq, swxq

    def error(self, sums, s, z):
        swq, swqq, swxq = sums
        cross = swxq - z * self.swx
        square = (swqq - _TWO * z * swq) + z * z * self.sw
        return (self.swxx - _TWO * s * cross) + s * s * square

    def refit_scale(self, sums, z):
        swq, swqq, swxq = sums
        num = swxq - z * self.swx
        square = (swqq - _TWO * z * swq) + z * z * self.sw
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return fp16_scale(np.where(square > 0, num / square, _ZERO))

    def offer(self, sums, s, z, t) -> None:
        with np.errstate(invalid="ignore", over="ignore"):
            err = self.error(sums, s, z)
        if self.err is None:
            self.err, self.s, self.z, self.t = err, s, z, t
            return
        better = err < self.err
        self.err = np.where(better, err, self.err)
        self.s = np.where(better, s, self.s)
        self.z = np.where(better, z, self.z)
        self.t = np.where(better, t, self.t)


def _try_sym(g: _Group, absmax, t) -> None:
    z = np.full_like(t, SYM_ZERO)
    s = fp16_scale(absmax / t)
    sums = g.sums(s, z)
    g.offer(sums, s, z, t)
    g.offer(sums, g.refit_scale(sums, z), z, t)


def _try_asym(g: _Group, xmin, xmax, t) -> None:
    s = fp16_scale((xmax - xmin) / t)
    z = _asym_zero(xmin, s)
    sums = g.sums(s, z)
    g.offer(sums, s, z, t)
    # Weighted least squares of x ~ a*q + b on these codes, back to an integer zero -b/a.
    swq, swqq, swxq = sums
    det = g.sw * swqq - swq * swq
    ok = det > 0
    det = np.where(ok, det, _ONE)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        a = fp16_scale(np.where(ok, (g.sw * swxq - swq * g.swx) / det, _ZERO))
        b = (swqq * g.swx - swq * swxq) / det
        z2 = np.where(ok, np.clip(_round_clipped(-b / a, 0, CLIP), _ONE, F32(QMAX)), z)
    g.offer(sums, g.refit_scale(sums, z2), z2, t)


def importance(X: np.ndarray) -> np.ndarray:
    """|x| + the group's rms, for X [n, G] (one group per column)."""
    sxx = np.zeros(X.shape[1], F32)
    for i in range(X.shape[0]):
        sxx += X[i] * X[i]
    return np.abs(X) + np.sqrt(sxx / F32(X.shape[0]))


def search_groups_numpy(x: np.ndarray, sym: bool, search: bool, column_weights: np.ndarray | None = None):
    """(codes uint8 [G, n], scales float32 [G], zeros uint8 [G], errors float32 [G, 3]) of the
    groups x [G, n] (float32, finite); errors: squared error of the chosen codes, of plain
    rounding, and the group's sum of squares. Raises ValueError if a scale overflows float16."""
    X = np.ascontiguousarray(x.T, dtype=F32)
    n, G = X.shape
    xmin = np.minimum(X.min(0, initial=0.0), _ZERO)
    xmax = np.maximum(X.max(0, initial=0.0), _ZERO)
    absmax = np.maximum(-xmin, xmax)
    if sym:
        xmax, xmin = absmax, -absmax
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = np.where(empty, F32(-1), xmin), np.where(empty, _ONE, xmax)
    with np.errstate(over="ignore"):
        s0 = fp16_scale((xmax - xmin) / F32(QMAX))
    if not np.isfinite(s0).all():
        raise ValueError("a group's scale is too large for float16")
    if sym:
        z0 = np.full(G, SYM_ZERO, F32)
    else:
        s0 = np.where(_round_clipped(-xmin / s0, 0, CLIP) < 1, fp16_scale(xmax / F32(QMAX - 1)), s0)
        z0 = _asym_zero(xmin, s0)
    s, z = s0, z0
    if search:
        W = np.broadcast_to(column_weights.astype(F32)[:, None], X.shape) if column_weights is not None \
            else importance(X)
        g = _Group(X, W)
        plain = F32(SYM_PLAIN if sym else ASYM_PLAIN)
        g.offer(g.sums(s0, z0), s0, z0, np.full(G, plain, F32))
        coarse, fine = (SYM_COARSE, SYM_FINE) if sym else (ASYM_COARSE, ASYM_FINE)

        def attempt(t):
            _try_sym(g, absmax, t) if sym else _try_asym(g, xmin, xmax, t)
        for t in coarse:
            attempt(np.full(G, t, F32))
        for d in fine:
            centre = g.t
            attempt(centre - F32(d))
            attempt(centre + F32(d))
        s, z = g.s, g.z
    Q, Q0 = _levels(X, s, z), _levels(X, s0, z0)
    errors = np.zeros((3, G), F32)
    for i in range(n):
        d = X[i] - s * (Q[i] - z)
        d0 = X[i] - s0 * (Q0[i] - z0)
        errors[0] += d * d
        errors[1] += d0 * d0
        errors[2] += X[i] * X[i]
    return (np.ascontiguousarray(Q.T).astype(np.uint8), s.astype(F32), z.astype(np.uint8),
            np.ascontiguousarray(errors.T))


def search_groups(x: np.ndarray, sym: bool, search: bool, column_weights: np.ndarray | None = None):
    """search_groups_numpy's result, from the compiled kernel when it is built."""
    from .registry import compiled_module

    c = compiled_module()
    if c is None or not hasattr(c, "int4_search"):
        return search_groups_numpy(x, sym, search, column_weights)
    x = np.ascontiguousarray(x, dtype=F32)
    G, n = x.shape
    codes = np.empty((G, n), np.uint8)
    scales = np.empty(G, F32)
    zeros = np.empty(G, np.uint8)
    errors = np.empty((G, 3), F32)
    cw = None if column_weights is None else np.ascontiguousarray(column_weights, dtype=F32)
    if c.int4_search(x, n, cw, int(sym), int(search), codes, scales, zeros, errors):
        raise ValueError("a group's scale is too large for float16")
    return codes, scales, zeros, errors
