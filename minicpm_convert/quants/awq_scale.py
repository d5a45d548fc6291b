"""AWQ's activation-aware scaling (Lin et al. 2023), searched on our INT4 grid (`int4.py`).

The input channels that carry large activations matter most to a layer's output; multiplying
those columns of W by s > 1 before quantizing (and dividing the input, in practice the
preceding RMSNorm's weight, by s) gives them a finer relative step at no change of function.
As AutoAWQ does, s = x^a / w^(1-a) ("duo scaling": x is the mean |activation| of each input
channel, w the mean of each column's |weight| relative to its group's maximum), normalised so
that max(s) * min(s) = 1, with a taken from a grid of GRID values in [0, 1) by the error of
round-to-nearest codes of W * s.

The error is measured as the output error over the calibration tokens, without running them
again: for W_hat = Q(W s) / s, sum_tokens ||(W_hat - W) x||^2 = tr(D H D^T), D = W_hat - W, H the
inputs' Hessian sum x x^T that GPTQ uses. AutoAWQ measures the output of the whole attention or
MLP module; the sum over the projections that share the input is what GPTQ minimises after it.
s = 1 (no scaling) is a candidate too, so the chosen scale never measures worse than none.
"""

from __future__ import annotations

import torch

from . import int4

GRID = 20
SCALE_FLOOR = 1e-4  # AutoAWQ's clamp: a channel no token reached is not scaled to zero


def duo_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = x^a / w^(1-a), clamped, normalised to max * min = 1 (AutoAWQ's formula)."""
    s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + SCALE_FLOOR)).clamp_min(SCALE_FLOOR)
    return s / (s.max() * s.min()).sqrt()


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over the output rows of |w| / the max |w| of its group: [in]."""
    w = torch.cat([t.to(torch.float32) for t in weights], dim=0)
    g = w.abs().reshape(-1, group_size)
    g = g / (g.amax(dim=1, keepdim=True) + 1e-6)
    return g.reshape(w.shape).mean(dim=0)


def output_error(weights: list[torch.Tensor], h: torch.Tensor, s: torch.Tensor, group_size: int,
                 sym: bool) -> float:
    """sum over the projections of tr(D H D^T), D = Q(W s) / s - W with round-to-nearest codes."""
    total = 0.0
    for w in weights:
        d = int4.dequantize(*int4.quantize_groups(w * s, group_size, sym, False), group_size) / s - w
        total += float(((d @ h) * d).sum(dtype=torch.float64))
    return total


def search(weights: list[torch.Tensor], h: torch.Tensor, x_mean: torch.Tensor, group_size: int,
           sym: bool, grid: int = GRID) -> tuple[torch.Tensor, float | None, list[float]]:
    """(s [in] float32, the chosen a (None: s = 1 measured best), the errors of s = 1 and of
    every a on the grid) for the projections `weights` [out_k, in] that share the input whose
    Hessian is `h` and mean |x| is `x_mean`."""
    w_mean = weight_mean(weights, group_size)
    x_mean = x_mean.to(torch.float32)
    h = h.to(torch.float32)
    ones = torch.ones_like(x_mean)
    best = (ones, output_error(weights, h, ones, group_size, sym), None)
    errors = [best[1]]
    for k in range(grid):
        alpha = k / grid
        s = duo_scales(x_mean, w_mean, alpha)
        err = output_error(weights, h, s, group_size, sym)
        errors.append(err)
        if err < best[1]:  # ties keep the earlier candidate (no scaling, then the smaller a)
            best = (s, err, alpha)
    return best[0], best[2], errors
