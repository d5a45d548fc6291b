"""AWQ's activation-aware scale search on one input shared by several projections: its error is
the output error the tokens themselves give; on LLM-like inputs (a few outlier channels) it lowers
that error well below plain rounding's, by scaling the outlier channels up; it never measures worse
than no scaling; the same inputs give the same scales."""

from __future__ import annotations

import pytest
import torch

from minicpm_convert.quants import awq_scale, int4
from tests.quants import test_gptq


def layer(out=96, seed=0):
    """test_gptq's LLM-like weight and inputs, its Student-t draw seeded too (it takes torch's
    global generator, whose state would otherwise depend on the tests run before)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return test_gptq.layer(out=out, seed=seed)


def test_error_is_the_output_error_of_the_tokens():
    w, x = layer(seed=3)
    s = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(0)) + 0.5
    w_hat = int4.dequantize(*int4.quantize_groups(w * s, 64, True, False), 64) / s
    direct = float((((w_hat - w) @ x.T).double() ** 2).sum())
    assert awq_scale.output_error([w], x.T @ x, s, 64, True) == pytest.approx(direct, rel=1e-3)


@pytest.mark.parametrize("sym", [True, False])
def test_scales_the_outlier_channels_and_lowers_the_output_error(sym):
    w, x = layer()
    w2 = layer(out=64, seed=5)[0]
    h = x.T @ x
    s, alpha, errors = awq_scale.search([w, w2], h, x.abs().sum(0), 64, sym)
    assert alpha is not None  # s = 1 is not the best here
    found = awq_scale.output_error([w, w2], h, s, 64, sym)
    assert found == min(errors) and found < 0.7 * errors[0], (found, errors[0])
    assert s[:4].min() > 1.3 * s[4:].max()  # layer() makes channels 0-3 the outliers
    assert s.dtype == torch.float32 and (s > 0).all()


def test_no_scaling_when_the_inputs_are_even():
    """White inputs give AWQ nothing to exploit: s = 1 stays if no a measures better."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 128, generator=g) * 0.02
    x = torch.randn(4096, 128, generator=g)
    s, alpha, errors = awq_scale.search([w], x.T @ x, x.abs().sum(0), 64, True)
    assert awq_scale.output_error([w], x.T @ x, s, 64, True) == min(errors) <= errors[0]
    if alpha is None:
        assert torch.equal(s, torch.ones(128))


def test_deterministic():
    w, x = layer(seed=4)
    first = awq_scale.search([w], x.T @ x, x.abs().sum(0), 32, True)
    again = awq_scale.search([w.clone()], (x.T @ x).clone(), x.abs().sum(0), 32, True)
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
