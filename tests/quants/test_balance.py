"""int4_rescale.balance: the compiled kernel (csrc/balance.c) against its oracle, the NumPy
port, bit for bit; and both against the torch float64 formula they replace (the old exports'),
which sums in other orders and keeps factors that cancel, so it agrees to rounding only."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from minicpm_convert.formats.hf import int4_rescale
from minicpm_convert.quants import registry
from minicpm_convert.quants.numeric import exact_sqrt

compiled = pytest.mark.skipif(registry.compiled_module() is None, reason="the C extension is not built")


def torch_balance(w: np.ndarray, iters: int = int4_rescale.SINKHORN_ITERS) -> np.ndarray:
    """The formula as it was before the kernel (float64 torch; r and c carried along)."""
    w = torch.from_numpy(w).to(torch.float64)
    r = torch.ones(w.shape[0], 1, dtype=torch.float64)
    c = torch.ones(1, w.shape[1], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # var of one value (rows or cols = 1): NaN, made dead below
        for _ in range(iters):
            r = r * exact_sqrt((w / r / c).var(1, keepdim=True)).clamp_min(1e-30)
            c = c * exact_sqrt((w / r / c).var(0, keepdim=True)).clamp_min(1e-30)
    c = c.squeeze(0)
    dead = ~torch.isfinite(c) | (w.abs().amax(0) == 0)
    c = torch.where(dead, torch.ones_like(c), c)
    return (c / exact_sqrt(c.square().mean())).numpy()


def matrix(rows: int, cols: int, kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    if kind == "outliers":  # a few outlier input channels, one huge
        w[:, rng.integers(0, cols, 3)] *= 30
        w[:, cols // 2] *= 1e4
    elif kind == "zeros":  # a dead column (scale 1) and a zero row
        w[:, 1] = 0
        w[min(2, rows - 1)] = 0
        w[:, -1] *= 50
    elif kind == "offset":  # a column's mean 5 times its spread (unshifted, S2 - S1^2/n cancels)
        w[:, 0] += 0.1
    elif kind == "collapse":  # 50 times: Sinkhorn drives its c towards 0 (see test_collapse)
        w[:, 0] += 1.0
    return w


CASES = [
    (64, 128, "outliers"), (300, 77, "zeros"), (77, 300, "outliers"), (7, 13, "zeros"),  # 7: a row block of 3
    (513, 1000, "outliers"), (256, 96, "offset"), (2, 2, "plain"), (1, 5, "plain"), (5, 1, "plain"),
]


def c_of(w: np.ndarray, iters: int = int4_rescale.SINKHORN_ITERS) -> np.ndarray:
    out = np.empty(w.shape[1])
    registry.compiled_module().balance(w, *w.shape, iters, out)
    return out


@compiled
@pytest.mark.parametrize("rows,cols,kind", CASES + [(256, 96, "collapse")])
def test_compiled_is_the_oracle(rows, cols, kind):
    w = matrix(rows, cols, kind)
    for iters in (0, 1, int4_rescale.SINKHORN_ITERS):
        got, want = c_of(w, iters), int4_rescale._balance_numpy(w, iters)
        assert got.view(np.int64).tolist() == want.view(np.int64).tolist(), (iters, np.abs(got - want).max())


@pytest.mark.parametrize("rows,cols,kind", CASES)
def test_oracle_is_the_torch_formula(rows, cols, kind):
    w = matrix(rows, cols, kind)
    got, want = int4_rescale._balance_numpy(w), torch_balance(w)
    assert np.all(np.isfinite(got)) and np.all(got > 0)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=0)
    if rows == 1 or cols == 1:  # the spread of one value is NaN: every column is dead
        assert np.all(got == 1.0)


def test_collapse():
    """A column whose mean is far above its spread drives its c towards 0 at every iteration
    (rows are then spread by that column alone). Rounding decides the values there (the torch
    formula and this one part after a few iterations); here every c reaches the 1e-30 clamp and
    the matrix comes out unscaled, where the torch formula (its clamp bounded the ratio of two
    iterations) gave a vanishing c_0."""
    w = matrix(256, 96, "collapse")
    assert np.all(int4_rescale._balance_numpy(w) == 1.0)
    assert torch_balance(w)[0] < 1e-6
    np.testing.assert_allclose(int4_rescale._balance_numpy(w, 4), torch_balance(w, 4), rtol=1e-9, atol=0)


@compiled
def test_balance_is_the_same_with_and_without_c(monkeypatch):
    w = torch.from_numpy(matrix(96, 160, "outliers"))
    with_c = int4_rescale.balance(w)
    monkeypatch.setattr(int4_rescale, "compiled_module", lambda: None)
    without = int4_rescale.balance(w)
    assert with_c.dtype == without.dtype == torch.float32
    assert torch.equal(with_c, without)
    assert torch.equal(int4_rescale.balance(w.to(torch.bfloat16)), int4_rescale.balance(w.to(torch.bfloat16).float()))


@compiled
def test_threads_give_the_same_scales():
    ws = [matrix(200 + 8 * k, 300, "outliers", seed=k) for k in range(6)]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(c_of, ws))
    for w, c in zip(ws, together):
        assert c.view(np.int64).tolist() == c_of(w).view(np.int64).tolist()


@compiled
def test_wrong_sizes_are_refused():
    w = matrix(8, 16, "plain")
    bal = registry.compiled_module().balance
    with pytest.raises(ValueError):
        bal(w, 8, 15, 10, np.empty(15))  # not rows x cols
    with pytest.raises(ValueError):
        bal(w, 8, 16, 10, np.empty(15))  # out too short
    with pytest.raises(ValueError):
        bal(w, 0, 16, 10, np.empty(16))
    with pytest.raises(ValueError):
        bal(w, 8, 16, -1, np.empty(16))
