"""GPTQ on one weight: it lowers the output error that plain rounding and the data-free search
leave on correlated, heavy-tailed inputs; its codes, scales and zeros are in the INT4 layout's
ranges; act-order keeps every column in its own group (trivial g_idx); dead inputs give zeros;
the result is the same whatever the thread count."""

from __future__ import annotations

import pytest
import torch

from minicpm_convert.quants import gptq, int4
from minicpm_convert.stream import torch_threads


def layer(out=96, inp=256, tokens=2048, seed=0):
    """A weight and inputs with LLM-like statistics: low-rank correlated activations, a few
    outlier channels 20x the rest, heavy tails (Student-t noise)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    x = torch.randn(tokens, 16, generator=g) @ torch.randn(16, inp, generator=g)
    x += 0.3 * torch.distributions.StudentT(3.0).sample((tokens, inp))
    x[:, :4] *= 20
    return w, x


def output_error(w, x, parts, group_size):
    w_hat = int4.dequantize(*parts, group_size)
    return float(((w - w_hat) @ x.T).norm() / (w @ x.T).norm())


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_gptq_beats_rounding_and_search_on_the_output(group_size, sym):
    w, x = layer()
    h = x.T.double() @ x.double()
    rtn = output_error(w, x, int4.quantize_groups(w, group_size, sym, False), group_size)
    search = output_error(w, x, int4.quantize_groups(w, group_size, sym, True), group_size)
    for act_order in (False, True):
        found = output_error(w, x, gptq.gptq(w, h, group_size, sym, True, act_order=act_order), group_size)
        assert found < 0.6 * min(rtn, search), (act_order, found, rtn, search)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_layout_ranges(sym, act_order):
    w, x = layer(seed=1)
    codes, scales, zeros = gptq.gptq(w, x.T.double() @ x.double(), 64, sym, True, act_order=act_order)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape and int(codes.max()) <= 15
    assert scales.shape == zeros.shape == (w.shape[0], w.shape[1] // 64)
    assert (scales > 0).all() and torch.equal(scales, scales.half().float())
    if sym:
        assert (zeros == 8).all()
    else:
        assert int(zeros.min()) >= 1 and int(zeros.max()) <= 15


def test_act_order_static_groups_keep_each_column_in_its_group():
    """With static groups every scale comes from the original weights of its own columns (searched
    with each column weighted by its activation energy), so the scales equal that search's on the
    original weights and a column's code decodes with its own group's scale."""
    w, x = layer(seed=2)
    h = x.T.double() @ x.double()
    codes, scales, zeros = gptq.gptq(w, h, 64, True, True, act_order=True)
    diag = h.diagonal().float()
    for k in range(w.shape[1] // 64):
        energy = diag[k * 64:(k + 1) * 64]
        energy = energy / energy.mean().clamp_min(1e-30) + 1e-6
        _, want, _ = int4.quantize_groups(w[:, k * 64:(k + 1) * 64], 64, True, True, energy)
        assert torch.equal(scales[:, k:k + 1], want)
    packed = int4.pack_gptq(codes, scales, zeros, 64)
    assert torch.equal(packed["g_idx"], torch.arange(w.shape[1], dtype=torch.int32) // 64)


def test_dead_inputs_give_zero_weights():
    w, x = layer(seed=3)
    x[:, 10:20] = 0  # inputs no token reaches
    codes, scales, zeros = gptq.gptq(w, x.T.double() @ x.double(), 32, True, True)
    assert (int4.dequantize(codes, scales, zeros, 32)[:, 10:20] == 0).all()


def test_deterministic_across_thread_counts():
    w, x = layer(seed=4)
    h = x.T.double() @ x.double()
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(gptq.gptq(w, h, 64, True, True))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_rejects_bad_input():
    w, x = layer(seed=5)
    with pytest.raises(ValueError, match="Hessian of shape"):
        gptq.gptq(w, torch.eye(10), 64)
    with pytest.raises(ValueError, match="multiple of group size"):
        gptq.gptq(w[:, :100], torch.eye(100), 64)


def test_inverse_factor_matches_the_textbook_formula_and_damps_a_singular_hessian():
    # The in-place, identity-free factor must give the bits of (H + d*I)^-1's upper Cholesky
    # factor as written in the paper, in float32 as GPTQModel and llm-compressor compute it, and
    # stay close to the float64 factor; a rank-deficient H gets more damping rather than failing.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 96, generator=g, dtype=torch.float64)
    h = (x.T @ x).float()
    extra = gptq.DAMP * h.diagonal().mean().item()
    textbook = lambda m: torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(  # noqa: E731
        m + extra * torch.eye(96, dtype=m.dtype))), upper=True)
    kept = h.clone()
    got = gptq.inverse_hessian_factor(h)
    with torch_threads(1):  # as the factor is computed (test below)
        want = textbook(h)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(h, kept)  # without overwrite the caller's Hessian is untouched
    exact = textbook(h.double())
    assert ((got.double() - exact).norm() / exact.norm()).item() < 1e-5
    low = x[:, :10].T @ x[:, :10]
    singular = torch.zeros(96, 96, dtype=torch.float64)
    singular[:10, :10] = low  # 86 zero rows and columns: mean-diagonal damping alone keeps it definite
    singular[50, 50] = -1.0   # not even positive semi-definite: needs stronger damping
    u = gptq.inverse_hessian_factor(singular)
    assert torch.isfinite(u).all() and (u.diagonal() > 0).all()


def test_inverse_factor_has_the_same_bits_whatever_the_thread_count():
    """LAPACK's blocked Cholesky splits its updates by thread count (a 512^2 factor differs in the
    last bits between 1 and 2 threads, in float64 too); the factor runs on one thread so the
    export does not depend on it."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2048, 512, generator=g)
    h = x.T @ x
    before = torch.get_num_threads()
    try:
        got = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got.append(gptq.inverse_hessian_factor(h))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], got[1])
