"""Function-preserving rescaling of a block before INT4 quantization (data-free, in the spirit of
SINQ's Sinkhorn-normalised quantization), kept in standard layouts.

A group of 4-bit codes shares one scale along W's input dimension, so an input column much larger
than its neighbours (an outlier channel) sets the step of every weight in its groups. Dividing
each input column j of o_proj by c_j and multiplying the matching output row of v_proj by c_j
leaves the block's function unchanged (attention is linear in v; with grouped key/value heads
every query head of a group shares its v row, so c is one value per v row); the same holds for
down_proj's columns against up_proj's rows (silu(gate) * up is linear in up). Row scales are free
for group quantization (each row has its own scales), so v and up lose nothing. `c` balances the
columns: alternating row and column normalisation of the matrix's standard deviations (Sinkhorn-
Knopp on the spread of values), its column part kept; it runs as one float64 pass over W per
iteration, compiled (csrc/balance.c: a 2B's 80 matrices took minutes as torch tensor operations)
with a NumPy oracle giving the same bits. Measured on a trained 135M model, g64: KL
0.35 -> 0.28 with the scale search (q/k/v and gate/up column scales, absorbed into the norms,
made it worse, so they are not applied).

The scales are written beside the export (`rescaling.safetensors`, one vector per pair, named
by the pair's key, the method in its metadata) so `verify` holds the export to the rescaled
source: both tensors of a pair follow from one vector, so a wrong or tampered vector cannot pass
as function-preserving. And since the vector is a function of the source, verify computes it
again for a GPTQ export (`check_against`), whose looser weight bound could let one tampered entry
through (a data-free export's per-group bound fails it).

With calibration data, AWQ's activation-aware scales (`quants/awq_scale.py`, `to-int4 --method
awq` or `awq-gptq`) go in the same file under the key of the norm they are folded into
(`NormScale`: the norm's weight times c, the columns of the projections it feeds divided by c).
They depend on the calibration text, so verify cannot compute them again; it does not need to:
the norm is stored in float16, and verify holds it to the source's norm times c at float16's
own bound, so a wrong entry fails on the norm (the file's metadata names the methods, joined
by '+').
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ...quants.registry import compiled_module
from ...spec import ModelSpec

FILE = "rescaling.safetensors"
SINKHORN_ITERS = 10
# The file's metadata names how the vectors were computed; verify recomputes the ones it knows
# (a file without metadata predates it and was made by this method).
METHOD = f"sinkhorn-std-{SINKHORN_ITERS}"
AWQ_METHOD = "awq-calibrated"  # not recomputable: pinned by the float16 norms (module docstring)
# balance() gives the same bits compiled or not, but exports made before the kernel (torch float64:
# other summation orders) or by a later float32 kernel may differ in the last bits.
RECOMPUTE_RTOL = 1e-4


@dataclass(frozen=True)
class Pair:
    """Rows of `rows` times c, columns of `cols` divided by c (repeated `repeat` times in blocks
    of `block` columns: a GQA group's query heads share one v row)."""
    key: str
    rows: str
    cols: str
    repeat: int = 1
    block: int = 1

    def column_scale(self, c: torch.Tensor) -> torch.Tensor:
        if self.repeat == 1:
            return c
        return c.reshape(-1, 1, self.block).expand(-1, self.repeat, self.block).reshape(-1)

    def stacked_columns(self, w: torch.Tensor) -> torch.Tensor:
        """`cols`' weight with the columns that share a scale stacked as rows: [rows*repeat, len(c)]."""
        if self.repeat == 1:
            return w
        out = w.shape[0]
        return (w.reshape(out, -1, self.repeat, self.block).permute(2, 0, 1, 3)
                .reshape(self.repeat * out, -1))


@dataclass(frozen=True)
class NormScale:
    """The RMSNorm weight `norm` times c, the columns of every projection in `cols` divided by c."""
    key: str
    norm: str
    cols: tuple[str, ...]


def norm_scales(spec: ModelSpec) -> list[NormScale]:
    """Every (input_layernorm -> q/k/v, post_attention_layernorm -> gate/up) of a Llama-format model."""
    found = []
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        found.append(NormScale(p + "input_layernorm", p + "input_layernorm.weight",
                               tuple(p + f"self_attn.{k}_proj.weight" for k in "qkv")))
        found.append(NormScale(p + "post_attention_layernorm", p + "post_attention_layernorm.weight",
                               (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")))
    return found


def pairs(spec: ModelSpec) -> list[Pair]:
    """Every (v -> o, up -> down) pair of a Llama-format model (the MLP's pairs as its family
    names them: every expert's w3 -> w2 in the Mixtral layout)."""
    from ...families import family_of
    family = family_of(spec)
    found = []
    rep = spec.num_attention_heads // spec.num_key_value_heads
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        found.append(Pair(p + "self_attn.o_proj", p + "self_attn.v_proj.weight", p + "self_attn.o_proj.weight",
                          rep, spec.head_dim))
        found.extend(Pair(*names) for names in family.int4_mlp_pairs(spec, p))
    return found


def balance(w: torch.Tensor, iters: int = SINKHORN_ITERS) -> torch.Tensor:
    """Column scale c (RMS 1, float32) making the rows and columns of W / c equally spread.

    Sinkhorn-Knopp on the standard deviations: `iters` times, every row of W / (r c) is divided
    by its spread, then every column. In float64 from W as float32 (a float64 W is rounded to
    float32 first); the compiled kernel (csrc/balance.c) when it is built, else `_balance_numpy`,
    which gives the same bits."""
    x = np.ascontiguousarray(w.detach().to(torch.float32).numpy())
    rows, cols = x.shape
    ext = compiled_module()
    if ext is None:
        c = _balance_numpy(x, iters)
    else:
        c = np.empty(cols, np.float64)
        ext.balance(x, rows, cols, iters, c)
    return torch.from_numpy(c.astype(np.float32))


def _balance_numpy(w: np.ndarray, iters: int = SINKHORN_ITERS) -> np.ndarray:
    """balance()'s float64 c (the compiled kernel's oracle: the same operations in the same order).

    Each row scale r_i is std_j(W_ij / c_j) and each column scale c_j is std_i(W_ij / r_i) (the
    old r_i * std_j(W_ij / (r_i c_j)) without the factors that cancel). std is the unbiased one
    from the sums of d and d^2, d = x - x_0 (shifted by the line's first value, the sums do not
    cancel when a line's mean is far from zero), every sum sequential in index order (explicit
    loops, not np.sum's pairwise order), x being W times a reciprocal (1/c_j, 1/r_i).

    A column whose mean is many times its spread (10 times in a 256 x 96 test; 5 times did not)
    makes the iteration collapse: its c_j falls about tenfold per iteration and every other c
    with it (the rows are spread by that column alone), rounding decides the values, and here
    they reach the 1e-30 clamp, so the matrix comes out unscaled (the torch formula, whose clamp
    bounded the ratio of two iterations, gave a vanishing c_j instead)."""
    rows, cols = w.shape
    with np.errstate(all="ignore"):  # as C: a degenerate matrix gives NaN/inf, made dead below
        w64 = w.astype(np.float64)
        wt = np.ascontiguousarray(w64.T)
        c = np.ones(cols)
        ic = np.ones(cols)
        x = np.empty(rows)
        y = np.empty(cols)
        for _ in range(iters):
            s1, s2 = np.zeros(rows), np.zeros(rows)
            k = wt[0] * ic[0]  # each row's first value, its shift
            for j in range(cols):  # the row sums, over j in order
                np.multiply(wt[j], ic[j], out=x)
                x -= k
                s1 += x
                s2 += np.multiply(x, x, out=x)
            ir = 1.0 / _spread(s1, s2, cols)
            s1, s2 = np.zeros(cols), np.zeros(cols)
            k = w64[0] * ir[0]  # each column's first value, its shift
            for i in range(rows):  # the column sums, over i in order
                np.multiply(w64[i], ir[i], out=y)
                y -= k
                s1 += y
                s2 += np.multiply(y, y, out=y)
            c = _spread(s1, s2, rows)
            ic = 1.0 / c
        # dead columns keep scale 1: a non-finite c, or a column of zeros
        c = np.where(~np.isfinite(c) | ~(w != 0).any(0), 1.0, c)
        sq = 0.0
        for v in (c * c).tolist():
            sq += v
        return c / np.sqrt(sq / cols)


def _spread(s1: np.ndarray, s2: np.ndarray, n: int) -> np.ndarray:
    """The unbiased standard deviation from the sums of n (shifted) values and of their squares,
    clamped below at 1e-30 as the torch code was (a NaN, as for n = 1, stays: the column is dead)."""
    v = (s2 - s1 * s1 / n) / (n - 1.0)
    v = np.where(v < 0, 0.0, v)  # rounding below zero (a constant line): std 0
    return np.maximum(np.sqrt(v), 1e-30)


def compute(jobs: dict, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """key -> c of every pair, from the Llama-format jobs (threads over pairs, order kept)."""
    from ...stream import ordered_map

    def one(pair: Pair) -> tuple[str, torch.Tensor]:
        return pair.key, balance(pair.stacked_columns(jobs[pair.cols].read_all()))
    return dict(ordered_map(one, pairs(spec)))


def check(scales: dict[str, torch.Tensor], spec: ModelSpec, shapes: dict, where: str) -> list[str]:
    """Problems of a rescaling file: unknown keys, wrong lengths, non-positive or non-finite values."""
    known = {p.key: p.rows for p in pairs(spec)} | {n.key: n.norm for n in norm_scales(spec)}
    problems = []
    for key, c in scales.items():
        rows = known.get(key)
        if rows is None:
            problems.append(f"{where}: unknown rescaling '{key}'")
        elif c.ndim != 1 or c.shape[0] != shapes[rows][0]:
            problems.append(f"{where}: rescaling '{key}' has shape {list(c.shape)}, expected [{shapes[rows][0]}]")
        elif not (torch.isfinite(c).all() and (c > 0).all()):
            problems.append(f"{where}: rescaling '{key}' holds a value that is not a positive number")
    return problems


def check_against(scales: dict[str, torch.Tensor], method: str | None, jobs: dict, spec: ModelSpec,
                  where: str) -> list[str]:
    """Problems of a rescaling file against the source it was computed from (`jobs`: the
    source's Llama-format jobs): every pair's vector as `compute` gives it. [] for a method this
    version does not know (a later one's: it cannot be recomputed here). AWQ's norm scales are
    not recomputed (they come from the calibration text; the float16 norms pin them)."""
    parts = (method or METHOD).split("+")
    if METHOD not in parts or not set(parts) <= {METHOD, AWQ_METHOD}:
        return []
    problems = []
    expected = compute(jobs, spec)
    for key in expected.keys() - scales.keys():
        problems.append(f"{where}: rescaling '{key}' is missing (the export was rescaled: every pair is)")
    for key, c in scales.items():
        want = expected.get(key)
        if want is None:
            continue  # an AWQ norm scale, or an unknown key (check()'s to report)
        off = ((c - want).abs() > RECOMPUTE_RTOL * want.abs()).nonzero()
        if len(off):
            i = int(off[0])
            problems.append(f"{where}: rescaling '{key}' entry {i} is {float(c[i]):.6g}, the source gives "
                            f"{float(want[i]):.6g} ({len(off)} entries differ)")
    return sorted(problems)


def apply(jobs: list, spec: ModelSpec, scales: dict[str, torch.Tensor]) -> list:
    """The jobs with every pair's rows multiplied and columns divided (float32, before any cast);
    a tensor in two (v_proj, up_proj: rows by their pair, columns by the norm's AWQ scale) gets
    its rows multiplied first."""
    if not scales:
        return jobs
    rows, cols = {}, {}
    for pair in pairs(spec):
        c = scales.get(pair.key)
        if c is not None:
            rows[pair.rows] = c
            cols[pair.cols] = pair.column_scale(c)
    for norm in norm_scales(spec):
        c = scales.get(norm.key)
        if c is not None:
            rows[norm.norm] = c
            cols.update(dict.fromkeys(norm.cols, c))
    out = []
    for job in jobs:
        read = job.read
        if job.name in rows:
            c = rows[job.name]
            if len(job.shape) == 1:  # a norm's weight
                read = lambda a, b, r=read, c=c: r(a, b) * c[a:b]  # noqa: E731
            else:
                read = lambda a, b, r=read, c=c: r(a, b) * c[a:b, None]  # noqa: E731
        if job.name in cols:
            read = lambda a, b, r=read, c=cols[job.name]: r(a, b) / c  # noqa: E731
        out.append(job if read is job.read else replace(job, read=read))
    return out
