"""GPTQ (Frantar et al. 2022) for one Linear weight, written from the paper and the published
descriptions of GPTQModel and llm-compressor, on our 4-bit group grid (`int4.py`).

Given the Hessian H = sum x x^T of the layer's inputs (the calibration activations that multiply
W), the columns of W are quantized one after another and the error of each is spread over the
columns not yet quantized, along the inverse Hessian's Cholesky factor, so that the *output*
error ||(W - W_hat) X|| rather than the weight error is what gets minimised:

- damping: H + damp * mean(diag H) * I (a column no token reached gets H_jj = 1 and weight 0);
- lazy batches: columns go in blocks of `block`; inside a block the update is column by column,
  the rest of W is updated once per block with one matrix product;
- group scales: chosen when the group's first column comes up, from the columns as they are by
  then (error from earlier groups included), by our scale search (`int4.quantize_groups`), not
  min/max;
- act-order with static groups (the default, as llm-compressor's actorder=static): columns are
  visited by decreasing H_jj, but every group's scale is fixed up front from the original
  weights, so a column keeps its own group, codes are stored in the original order and `g_idx`
  stays arange(in) // group_size (v1 loaders, Marlin). These scales are searched with each
  column's error weighted by its activation energy H_jj (what the output error weighs it by)
  rather than by |w|: measured on SmolLM2-135M (64 x 256 calibration tokens, held-out text),
  layer 28's down_proj output error 0.147 -> 0.104 of plain rounding's, others 0-5% lower;
  act-order itself took q_proj of layer 5 from 0.39 to 0.32.

The result is codes, float16-valued scales and zeros in `int4.quantize_groups`' layout.
"""

from __future__ import annotations

import torch

from ..stream import torch_threads
from . import int4

DAMP = 0.01
BLOCK = 128


def inverse_hessian_factor(h: torch.Tensor | list, damp: float = DAMP, *, overwrite: bool = False
                           ) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, float32 (GPTQ's Hinv).

    In float32, as GPTQModel and llm-compressor compute it (the damping bounds the condition
    number; float64 doubled the 2B's peak here: two 5760^2 matrices of 265 MB), with at most two
    [in, in] matrices alive at once besides the caller's `h`; `overwrite=True` lets it damp a
    float32 `h` in place (its contents are then undefined). `h` may also be a list holding the
    Hessian as its only reference: it is taken out, and freed once factorised, so two matrices
    are the peak overall.

    On one thread: LAPACK's blocked factorisations split their updates by thread count, so their
    last bits (float64's too, hidden before by the rounding to float32) depend on it, and the
    export must not. It costs 8.3 s instead of 4.4 s for a 5760^2 Hessian (2 cores), about 1.5% of
    a 2B block's calibration."""
    with torch_threads(1):
        return _inverse_hessian_factor(h, damp, overwrite)


def _inverse_hessian_factor(h: torch.Tensor | list, damp: float, overwrite: bool) -> torch.Tensor:
    if isinstance(h, list):
        h = h.pop().to(torch.float32)
    else:
        h = h.to(torch.float32) if overwrite else h.to(torch.float32, copy=True)
    mean = h.diagonal().mean().item()
    extra = damp * (mean if mean > 0 else 1.0)
    diag = h.diagonal().clone()
    for attempt in range(6):  # more damping until the factorisation succeeds (rank-deficient H)
        h.diagonal().copy_(diag + extra)  # H + extra*I without an identity matrix
        l, info = torch.linalg.cholesky_ex(h)
        if info.item() == 0 and torch.isfinite(l.diagonal()).all():
            break
        del l
        extra *= 10
    else:
        raise ValueError("the Hessian is not positive definite even with strong damping")
    del h  # freed if it came in a list; otherwise the caller's reference stays (garbage with overwrite)
    inv = torch.cholesky_inverse(l)
    del l
    return torch.linalg.cholesky(inv, upper=True)


def gptq(w: torch.Tensor, h: torch.Tensor | list, group_size: int, sym: bool = True, search: bool = True,
         damp: float = DAMP, block: int = BLOCK, act_order: bool = True
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [out,in], scales f32 [out,in/g], zeros uint8 [out,in/g]) of `w` [out,in]
    quantized with the input Hessian `h` [in,in]: a tensor (copied), or a list holding a float32
    one as its only reference, which is taken and worked on in place (the caller's last use of a
    Hessian: one [in, in] less at the peak, 133 MB for a 2B's down_proj)."""
    out, inp = w.shape
    h = h.pop().to(torch.float32) if isinstance(h, list) else h.to(torch.float32, copy=True)
    if inp % group_size:
        raise ValueError(f"input size {inp} is not a multiple of group size {group_size}")
    if h.shape != (inp, inp):
        raise ValueError(f"Hessian of shape {tuple(h.shape)} for a weight with {inp} inputs")
    w = w.detach().to(torch.float32).clone()
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf")
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    groups = inp // group_size
    block = max(group_size, block // group_size * group_size)
    scales = torch.empty(out, groups)
    zeros = torch.empty(out, groups, dtype=torch.uint8)

    def fix_group(k: int, cols: torch.Tensor, energy: torch.Tensor | None = None) -> None:
        _, s, z = int4.quantize_groups(cols, group_size, sym, search, energy)
        scales[:, k], zeros[:, k] = s[:, 0], z[:, 0]

    perm = None
    if act_order:
        diag = h.diagonal().clone()  # contiguous: a strided view sums in another order
        for k in range(groups):  # static groups: every scale from the original weights
            energy = diag[k * group_size:(k + 1) * group_size]
            # relative to the group's mean (scale-free), never 0 (a dead column still has a value)
            energy = energy / energy.mean().clamp_min(1e-30) + 1e-6
            fix_group(k, w[:, k * group_size:(k + 1) * group_size], energy)
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        w = w[:, perm]
        h = h.index_select(0, perm)
        h = h.index_select(1, perm)
    held = [h]
    del h
    hinv = inverse_hessian_factor(held, damp)  # takes the only reference: h is freed once factorised
    group_of = (perm if perm is not None else torch.arange(inp)) // group_size
    codes = torch.empty(out, inp, dtype=torch.uint8)
    for b0 in range(0, inp, block):
        b1 = min(inp, b0 + block)
        w1 = w[:, b0:b1].clone()
        err = torch.zeros_like(w1)
        h1 = hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            k = int(group_of[col])
            if perm is None and col % group_size == 0:
                fix_group(k, w1[:, j:j + group_size])  # blocks hold whole groups
            s, z = scales[:, k], zeros[:, k].to(torch.float32)
            x = w1[:, j]
            q = torch.clamp(torch.round(x / s) + z, 0, int4.QMAX)
            codes[:, col] = q.to(torch.uint8)
            e = (x - (q - z) * s) / h1[j, j]
            w1[:, j:] -= e.unsqueeze(1) * h1[j, j:].unsqueeze(0)
            err[:, j] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, scales, zeros
