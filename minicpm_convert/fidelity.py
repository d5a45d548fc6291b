"""Weight-level proof of an export: every tensor, decoded to float32 in Hugging Face layout,
against what the source says it must hold, within a bound its storage type guarantees.

The bound is derived from the format, so it holds for any weights and any correct encoder
(ours, llama.cpp's with or without an importance matrix, one that quantized f16-rounded values):

- float casts (f32, f16, bf16): one rounding of each value, |e| <= |x| * 2^-p (p = 24, 11, 8)
  plus the smallest subnormal step; checked element by element.
- GGML block types: within each block (32 values, or a 256-value super-block for k-quants) a
  correct encoder puts every value within `tau * (max - min)` of the source value: half a
  quantization step (= range / levels) for rounding, up to 1.5 steps where its scale search
  clips the extremes (llama.cpp's `make_qkx*` / importance-weighted searches), plus the
  rounding of the sub-block scales to their few bits (k-quants). A wrong layout (a neighbour's
  rows, permuted rope rows, swapped nibbles, a doubled scale, a transposed matrix) moves values
  by a sizeable part of the range, far outside.
- INT4 groups (GPTQ, AWQ, compressed-tensors) chosen from the weights alone (rounding, a scale
  search): a group is judged by its RMS error (at most one step of the group's grid) and its mean
  error (at most half a step: a zero off by one is exactly one).
- INT4 groups from an error-compensating encoder (GPTQ with calibration data, `int4-g*/gptq`: the
  export says so, or does not say how it was made): it moves single weights, and whole groups, by
  several steps where the inputs are weak, to cancel errors in the layer's output (measured on a
  trained 135M model: groups up to 5.6 steps RMS, rows up to 2.6). What it does not do is move a
  whole tensor, or the mean of a row's groups: so the tensor is judged by its RMS error in steps
  of each group's grid (at most one: SmolLM2-135M's GPTQ export measured <= 0.52 over its 210
  projections; the same codes with a scale 1.5x too large >= 1.36, a zero off by one >= 2.0,
  reversed nibbles >= 3.5) and each row by the RMS of its
  groups' mean errors (at most half a step: GPTQ measured <= 0.31, a zero off by one gives 1.0
  in every group). A single wrong row can hide in that; the text check (and, for rescaled
  exports, the check of the rescaling against the source, `int4_rescale.check_against`) is the
  rest of the proof.

Tensors are compared in row chunks, so memory stays at a few chunks of one tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# Per GGML type: values per block, the span its grid covers (`sym`: +-max|x|; `range`: min..max;
# `range0`: min..max extended to 0, as k-quants clamp their minimum at 0), the quantization levels
# across that span, the steps of slack for clipping searches, the extra error (as a fraction of
# the span) from rounding k-quant sub-block scales to their bits relative to the super-block's
# largest (a scale off by half a unit moves a value by levels / (2 * (2^bits - 1)) steps), and the
# largest product of codes that multiplies an f16 scale (whose absolute rounding floor is 2^-25:
# values below ~1e-6 cannot be told apart by any encoder of the type).
_GGML = {
    #         block, span,    levels, clip, extra,                codes x f16 scale
    "Q8_0":   (32, "sym", 254, 1.0, 0.0, 127),
    "Q4_0":   (32, "sym", 16, 1.5, 0.0, 8),  # d = max/-8: the value at -max maps to code 16, clamped to 15
    "Q4_1":   (32, "range", 15, 1.5, 0.0, 16),
    "Q5_0":   (32, "sym", 32, 1.5, 0.0, 16),
    "Q5_1":   (32, "range", 31, 1.5, 0.0, 32),
    "Q3_K":   (256, "sym", 8, 1.5, 1 / 64, 4 * 32),  # 6-bit signed scales
    "Q4_K":   (256, "range0", 15, 1.5, 1 / 126 + 1 / 126, 15 * 63 + 63),  # 6-bit scales and mins
    "Q5_K":   (256, "range0", 31, 1.5, 1 / 126 + 1 / 126, 31 * 63 + 63),
    "Q6_K":   (256, "sym", 64, 1.5, 1 / 254, 32 * 127),  # 8-bit scales
    # IQ4: 16 non-uniform levels (llama.cpp's kvalues_iq4nl); the widest gap is 24 of 240, a tenth
    "IQ4_NL": (32, "sym", 10, 1.5, 0.0, 127),
    "IQ4_XS": (256, "sym", 10, 1.5, 1 / 126, 127 * 63),  # 6-bit sub-block scales
}
# The 2-3-bit codebook types (lattice points of 4 or 8 values with signs, ternary values) reach
# errors of the size of the weights on heavy-tailed or constant blocks even from a correct encoder
# (measured: a tensor's relative RMS error up to 0.9), so they are held, tensor by tensor, to a
# relative RMS error of at most 1 (never worse than zeros): that catches a wrong grid index, bits
# in the wrong order or another tensor's data, not a subtle permutation, which the text figures show.
# Q2_K (2.6 bits: 4 levels per 16 values, 4-bit scales) belongs here too: a doubled scale or an
# importance-weighted encoding moves its values by half the block's span either way.
CODEBOOK_TYPES = frozenset({"Q2_K", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "TQ1_0", "TQ2_0"})
CODEBOOK_REL_RMS = 1.0
# A file quantized with an importance matrix (llama-quantize's `quantize.imatrix.*` keys) was
# encoded to favour the important columns, at the others' expense: single values may then be
# many steps off, so each block is judged by its RMS error relative to its RMS value. A correct
# importance-weighted encoder measured at most 0.56 on LLM-like importance (log-normal spread
# plus outlier channels 10^4 times the rest); a neighbour's rows, swapped nibbles or a doubled
# scale give 1 or more.
IMATRIX_BLOCK_RMS = 0.8
# Mantissa bits of the float storage types (the value's relative rounding is 2^-bits) and the
# smallest positive subnormal (the absolute floor of the rounding).
_FLOATS = {"F32": (24, 2.0 ** -149), "float32": (24, 2.0 ** -149), "F16": (11, 2.0 ** -24),
           "float16": (11, 2.0 ** -24), "BF16": (8, 2.0 ** -133), "bfloat16": (8, 2.0 ** -133)}
# A value computed in another order (folding in float64, say) may differ from ours by a few
# float32 roundings before its own storage rounding.
_F32_SLACK = 2.0 ** -20
INT4_RMS_STEPS = 1.0
INT4_MEAN_STEPS = 0.5
COMPENSATED = "/gptq"  # the storage suffix of INT4 groups from an error-compensating encoder


@dataclass
class TensorCheck:
    name: str
    storage: str
    worst: float = 0.0  # largest error / bound over the tensor's elements or blocks (<= 1 passes)
    where: str = ""  # the row (and block) of the worst one
    rel_rms: float = 0.0  # ||x_hat - x|| / ||x||, for the report
    _sq_err: float = field(default=0.0, repr=False)
    _sq_steps: float = field(default=0.0, repr=False)  # compensated INT4: sum of (error / group step)^2
    _sq_ref: float = field(default=0.0, repr=False)
    _count: int = field(default=0, repr=False)

    @property
    def passed(self) -> bool:
        return self.worst <= 1.0

    def finish(self) -> "TensorCheck":
        self.rel_rms = math.sqrt(self._sq_err / self._sq_ref) if self._sq_ref > 0 else math.sqrt(self._sq_err)
        if self.storage.removesuffix("/imatrix") in CODEBOOK_TYPES:
            # plus the floor of an f16 scale, as for the block types: ~1e-6 per value
            bound = CODEBOOK_REL_RMS * math.sqrt(self._sq_ref) + 2.0 ** -20 * math.sqrt(self._count)
            self.worst = math.sqrt(self._sq_err) / bound
            self.where = "the whole tensor (relative RMS error)"
        if self.storage.startswith("int4-g") and self.storage.endswith(COMPENSATED) and self._count:
            tensor = math.sqrt(self._sq_steps / self._count) / INT4_RMS_STEPS
            if tensor > self.worst:
                self.worst, self.where = tensor, "the tensor as a whole (RMS error in steps of its groups' grids)"
        return self

    def as_dict(self) -> dict:
        return {"name": self.name, "storage": self.storage, "worst_over_bound": self.worst, "where": self.where,
                "rel_rms": self.rel_rms, "passed": self.passed}


def has_bound(storage: str) -> bool:
    base = storage.removesuffix("/imatrix")
    return storage in _FLOATS or base in _GGML or base in CODEBOOK_TYPES or storage.startswith("int4-g")


def int4_storage(group_size: int, sym: bool, compensated: bool = False) -> str:
    """`int4-g64-sym`, and `int4-g64-sym/gptq` for an error-compensating encoder's groups."""
    return f"int4-g{group_size}-{'sym' if sym else 'asym'}" + (COMPENSATED if compensated else "")


def compare_rows(check: TensorCheck, expected: torch.Tensor, got: torch.Tensor, row0: int) -> None:
    """Fold rows [row0, row0 + len) of one tensor into `check` (2-D: rows x columns; 1-D allowed)."""
    x = expected.double().reshape(expected.shape[0], -1) if expected.dim() > 1 else expected.double()[None]
    y = got.double().reshape(x.shape)
    e = y - x
    check._sq_err += float((e * e).sum())
    check._sq_ref += float((x * x).sum())
    check._count += x.numel()
    s = check.storage
    if s in _FLOATS:
        bits, floor = _FLOATS[s]
        bound = x.abs() * (2.0 ** -bits + _F32_SLACK) + floor
        ratio = e.abs() / bound
        _update(check, ratio, row0, 1)
    elif s.removesuffix("/imatrix") in CODEBOOK_TYPES:
        pass  # judged on the tensor's relative RMS error when it is complete (finish)
    elif s.endswith("/imatrix") and s.removesuffix("/imatrix") in _GGML:
        _imatrix_blocks(check, x, e, _GGML[s.removesuffix("/imatrix")][0], row0)
    elif s in _GGML:
        block, span, levels, clip, extra, codes = _GGML[s]
        _blocks(check, x, e, block, span, (clip / levels + extra) * (1 + 1e-6), codes * 2.0 ** -25, row0)
    elif s.startswith("int4-g"):
        group, _, kind = s.removeprefix("int4-g").removesuffix(COMPENSATED).partition("-")
        _int4_groups(check, x, e, int(group), kind == "sym", s.endswith(COMPENSATED), row0)
    else:  # pragma: no cover - callers check has_bound first
        raise ValueError(f"no bound for storage {s}")


def _update(check: TensorCheck, ratio: torch.Tensor, row0: int, block: int) -> None:
    """Record the worst entry of ratio [rows, n] (n: elements or blocks of `block` values)."""
    flat = ratio.reshape(-1)
    if flat.numel() == 0:
        return
    i = int(torch.argmax(torch.nan_to_num(flat, nan=math.inf)))
    worst = float(flat[i]) if not math.isnan(float(flat[i])) else math.inf
    if worst > check.worst:
        row, col = divmod(i, ratio.shape[-1])
        check.worst = worst
        check.where = f"row {row0 + row}" + (f", block {col} (columns {col * block}..{col * block + block - 1})"
                                             if block > 1 else f", column {col}")


def _span(xb: torch.Tensor, kind: str) -> torch.Tensor:
    """The span of values a block's grid covers, per block."""
    if kind == "sym":
        return 2 * xb.abs().amax(-1)
    hi, lo = xb.amax(-1), xb.amin(-1)
    if kind == "range0":
        hi, lo = hi.clamp(min=0), lo.clamp(max=0)
    return hi - lo


def _blocks(check: TensorCheck, x: torch.Tensor, e: torch.Tensor, block: int, span_kind: str, tau: float,
            floor: float, row0: int) -> None:
    rows, cols = x.shape
    if cols % block:  # a row llama.cpp could not have stored in this type
        check.worst, check.where = math.inf, f"row length {cols} is not a multiple of the block size {block}"
        return
    xb, eb = x.reshape(rows, cols // block, block), e.reshape(rows, cols // block, block)
    span = _span(xb, span_kind)
    # A constant block (span 0) must decode exactly up to the f16 rounding of its scale or minimum.
    bound = tau * span + xb.abs().amax(-1) * 2.0 ** -10 + floor
    _update(check, eb.abs().amax(-1) / bound, row0, block)


def _imatrix_blocks(check: TensorCheck, x: torch.Tensor, e: torch.Tensor, block: int, row0: int) -> None:
    rows, cols = x.shape
    if cols % block:
        check.worst, check.where = math.inf, f"row length {cols} is not a multiple of the block size {block}"
        return
    xb, eb = x.reshape(rows, cols // block, block), e.reshape(rows, cols // block, block)
    bound = IMATRIX_BLOCK_RMS * xb.pow(2).mean(-1).sqrt() + xb.abs().amax(-1) * 2.0 ** -10 + 2.0 ** -20
    _update(check, eb.pow(2).mean(-1).sqrt() / bound, row0, block)


def _int4_groups(check: TensorCheck, x: torch.Tensor, e: torch.Tensor, group: int, sym: bool, compensated: bool,
                 row0: int) -> None:
    rows, cols = x.shape
    xb, eb = x.reshape(rows, cols // group, group), e.reshape(rows, cols // group, group)
    # The step of the group's grid: 15 steps over +-amax (symmetric, zero 8), or over the range
    # extended to hold 0 (asymmetric: the zero is a code).
    if sym:
        span = 2 * xb.abs().amax(-1)
    else:
        span = xb.amax(-1).clamp(min=0) - xb.amin(-1).clamp(max=0)
    step = span / 15 + 2.0 ** -24  # a float16 scale cannot be smaller
    if not compensated:
        rms = eb.pow(2).mean(-1).sqrt() / (INT4_RMS_STEPS * step)
        mean = eb.mean(-1).abs() / (INT4_MEAN_STEPS * step)
        _update(check, torch.maximum(rms, mean), row0, group)
        return
    in_steps = eb / step.unsqueeze(-1)
    check._sq_steps += float(in_steps.square().sum())  # the tensor's RMS, judged in finish()
    row_mean = torch.nan_to_num(in_steps.mean(-1).square().mean(-1).sqrt() / INT4_MEAN_STEPS, nan=math.inf)
    i = int(torch.argmax(row_mean))
    if float(row_mean[i]) > check.worst:
        check.worst, check.where = float(row_mean[i]), f"row {row0 + i} (RMS of its groups' mean errors, in steps)"
