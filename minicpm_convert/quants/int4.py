"""4-bit group quantization of Linear weights, and the two on-disk packings of it.

Pure functions over torch tensors, vectorised across groups. A weight `w` [out, in] is cut
along its input dimension into groups of `group_size` values; each group gets one scale `s`
and one integer zero `z`, and each value a code `q` in 0..15, so that `w ~ s * (q - z)`.

- Symmetric: z = 8, s = 2*absmax/15 (GPTQ's sym convention; codes -8..7 around zero).
- Asymmetric: the range [min(x,0), max(x,0)], s = (max-min)/15, z = round(-min/s), clamped to
  [1, 15]: GPTQ v1 stores z-1 in a nibble, so z = 0 would underflow into the neighbour.
- An all-zero group gets s = 2/15 (GPTQ's xmin=-1, xmax=1), so no scale is ever 0.
- Scales are stored as float16 and every loader dequantizes with that float16 value, so codes
  are chosen against the float16-rounded scale, and `dequantize` is what a loader computes.

`search=True` tries a grid of scales per group (and a least-squares refit of scale and zero for
the codes each one gives, in the spirit of llama.cpp's make_qkx2_quants) and keeps the one
with the least weighted squared error; plain rounding is always one of the candidates.
"""

from __future__ import annotations

import torch

from .numeric import exact_sqrt

BITS = 4
QMAX = 15
SYM_ZERO = 8
PACK = 32 // BITS  # codes per int32 word
FP16_TINY = 2.0 ** -24  # smallest positive float16: stands in for a scale that underflows

# Candidate divisors of the group's range: plain rounding uses 7.5 (sym: absmax/7.5) and 15
# (asym: (max-min)/15); the search also tries tighter ranges (clipping outliers) and looser.
SYM_DIVISORS = [7.5 + 0.125 * k for k in range(-16, 9)]  # 5.5 .. 8.5
ASYM_DIVISORS = [15.0 + 0.25 * k for k in range(-12, 9)]  # 12 .. 17


def fp16_scale(s: torch.Tensor) -> torch.Tensor:
    """The float16 value a loader will see, as float32; never 0 (a 0 scale cannot divide)."""
    s16 = s.to(torch.float16).to(torch.float32)
    return torch.where(s16 > 0, s16, torch.full_like(s16, FP16_TINY))


def _codes(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(x / s) + z, 0, QMAX)


def _importance(x: torch.Tensor) -> torch.Tensor:
    """Per-value weights of the search's error: |x| plus the group's rms (llama.cpp's Q4_K choice),
    so large values count more, but no value counts for nothing."""
    return x.abs() + exact_sqrt(x.square().mean(1, keepdim=True))  # not torch.sqrt: see exact_sqrt


def _range(x: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(xmin, xmax) of each group with 0 inside; an all-zero group becomes [-1, 1]."""
    xmin = torch.clamp(x.amin(1, keepdim=True), max=0)
    xmax = torch.clamp(x.amax(1, keepdim=True), min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    return torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)


def _asym_zero(xmin: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(-xmin / s), 1, QMAX)


class _Search:
    """Best (scale, zero) per group so far, by weighted squared error.

    For codes q of one candidate, the error of any (s, z) on those codes is a quadratic in the
    group sums below, so a candidate and its least-squares refit cost one rounding pass. The
    refit is scored on the candidate's codes; nearest-rounding with its own scale can only do
    better, so the recorded error is an upper bound and plain rounding (candidate 0, scored
    exactly) is never beaten by a worse choice.
    """

    def __init__(self, x: torch.Tensor, weights: torch.Tensor):
        self.x, self.weights = x, weights
        self.wx = weights * x
        self.sw = weights.sum(1, keepdim=True)
        self.swx = self.wx.sum(1, keepdim=True)
        self.swxx = (self.wx * x).sum(1, keepdim=True)
        self.err = self.s = self.z = None

    def sums(self, s, z):
        """(sum w*q, sum w*q*q, sum w*x*q) per group, q the nearest codes for scale s and zero z."""
        q = torch.clamp_(torch.round_(self.x / s).add_(z), 0, QMAX)
        wq = self.weights * q
        return wq.sum(1, keepdim=True), (wq * q).sum(1, keepdim=True), (self.wx * q).sum(1, keepdim=True)

    def error(self, sums, s, z):
        swq, swqq, swxq = sums
        # sum w*(x - s*(q - z))^2 expanded
        cross = swxq - z * self.swx
        square = swqq - 2 * z * swq + z * z * self.sw
        return self.swxx - 2 * s * cross + s * s * square

    def refit_scale(self, sums, z):
        """The float16 scale minimising the error for fixed codes and zero."""
        swq, swqq, swxq = sums
        square = swqq - 2 * z * swq + z * z * self.sw
        return fp16_scale(torch.where(square > 0, (swxq - z * self.swx) / square.clamp_min(1e-30), 0.0))

    def offer(self, sums, s, z) -> None:
        err = self.error(sums, s, z)
        if self.err is None:
            self.err, self.s, self.z = err, s, z
            return
        better = err < self.err
        self.err = torch.where(better, err, self.err)
        self.s = torch.where(better, s, self.s)
        self.z = torch.where(better, z, self.z)


def _search_sym(x, weights, s0) -> torch.Tensor:
    search = _Search(x, weights)
    z = torch.full_like(s0, SYM_ZERO)
    search.offer(search.sums(s0, z), s0, z)
    absmax = torch.maximum(-x.amin(1, keepdim=True), x.amax(1, keepdim=True))
    for t in SYM_DIVISORS:
        s = fp16_scale(absmax / t)
        sums = search.sums(s, z)
        search.offer(sums, s, z)
        search.offer(sums, search.refit_scale(sums, z), z)
    return search.s


def _search_asym(x, weights, s0, z0, xmin, xmax) -> tuple[torch.Tensor, torch.Tensor]:
    search = _Search(x, weights)
    search.offer(search.sums(s0, z0), s0, z0)
    for t in ASYM_DIVISORS:
        s = fp16_scale((xmax - xmin) / t)
        z = _asym_zero(xmin, s)
        sums = search.sums(s, z)
        search.offer(sums, s, z)
        # Weighted least squares of x ~ a*q + b on these codes, back to an integer zero -b/a.
        swq, swqq, swxq = sums
        det = search.sw * swqq - swq * swq
        ok = det > 0
        det = torch.where(ok, det, 1.0)
        a = fp16_scale(torch.where(ok, (search.sw * swxq - swq * search.swx) / det, 0.0))
        b = (swqq * search.swx - swq * swxq) / det
        z2 = torch.where(ok, torch.clamp(torch.round(-b / a), 1, QMAX), z)
        search.offer(sums, search.refit_scale(sums, z2), z2)
    return search.s, search.z


def _quantize_block(x: torch.Tensor, sym: bool, search: bool, weights: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xmin, xmax = _range(x, sym)
    s = fp16_scale((xmax - xmin) / QMAX)
    if not torch.isfinite(s).all():
        raise ValueError("a group's scale is too large for float16")
    if not sym:
        # GPTQ v1 cannot store zero 0 (zeros are clamped to 1): a group without negative values
        # maps [0, max] onto codes 1..15, so its top is not cut by a step.
        s = torch.where(torch.round(-xmin / s) < 1, fp16_scale(xmax / (QMAX - 1)), s)
    z = torch.full_like(s, SYM_ZERO) if sym else _asym_zero(xmin, s)
    if search:
        weights = _importance(x) if weights is None else weights.expand_as(x)
        if sym:
            s = _search_sym(x, weights, s)
        else:
            s, z = _search_asym(x, weights, s, z, xmin, xmax)
    return _codes(x, s, z), s, z


# Groups per block of the search: its temporaries stay in cache (a big speed-up on large tensors).
BLOCK_VALUES = 1 << 18


def quantize_groups(w: torch.Tensor, group_size: int, sym: bool = True, search: bool = True,
                    column_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [out,in] 0..15, scales f32 [out,in/g] (float16 values), zeros uint8 [out,in/g]).
    `column_weights` [group_size], positive: the search's error weight of each column (one group
    of columns, e.g. GPTQ's activation energy), instead of |x| + the group's rms."""
    out, inp = w.shape
    if inp % group_size:
        raise ValueError(f"input size {inp} is not a multiple of group size {group_size}")
    x = w.detach().to(torch.float32).reshape(-1, group_size)
    if not torch.isfinite(x).all():
        raise ValueError("weight contains NaN or Inf")
    step = max(1, BLOCK_VALUES // group_size)
    if column_weights is not None and inp != group_size:
        raise ValueError("column_weights applies to one group of columns")
    cw = None if column_weights is None else column_weights.to(torch.float32).reshape(1, group_size)
    blocks = [_quantize_block(x[i:i + step], sym, search, cw) for i in range(0, x.shape[0], step)]
    codes, scales, zeros = (torch.cat(parts) for parts in zip(*blocks))
    groups = inp // group_size
    return (codes.to(torch.uint8).reshape(out, inp), scales.reshape(out, groups),
            zeros.to(torch.uint8).reshape(out, groups))


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 [out, in]: scale * (code - zero), group by group along the input dimension."""
    out, inp = codes.shape
    q = codes.to(torch.float32).reshape(out, inp // group_size, group_size)
    z = zeros.to(torch.float32).unsqueeze(-1)
    s = scales.to(torch.float32).unsqueeze(-1)
    return ((q - z) * s).reshape(out, inp)


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||W - W_hat|| / ||W|| (Frobenius), 0 for an all-zero W reproduced exactly."""
    num = (w.double() - w_hat.double()).norm().item()
    den = w.double().norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


# -- packing ---------------------------------------------------------------------------------
def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """Pack the last dimension, 8 values 0..15 per int32 word, value i in bits 4i..4i+3."""
    *lead, n = values.shape
    if n % PACK:
        raise ValueError(f"cannot pack {n} values into whole int32 words (need a multiple of {PACK})")
    v = values.to(torch.int64).reshape(*lead, n // PACK, PACK)
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64)
    words = (v << shifts).sum(-1)
    # The top nibble makes words >= 2^31: keep the bit pattern, reinterpret as signed int32.
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack_nibbles(words: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles: uint8 values, the last dimension 8 times longer."""
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32)
    v = (words.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF
    return v.reshape(*words.shape[:-1], words.shape[-1] * PACK).to(torch.uint8)


def pack_gptq(codes, scales, zeros, group_size) -> dict[str, torch.Tensor]:
    """GPTQ v1 (facts §7): qweight [in/8,out], qzeros [in/g,out/8] holding zero-1, scales, g_idx."""
    out, inp = codes.shape
    return {
        # word [j, o] holds codes[o, 8j .. 8j+7]: pack 8 consecutive input rows of W^T
        "qweight": pack_nibbles(codes.T.reshape(inp // PACK, PACK, out).transpose(1, 2)).reshape(inp // PACK, out),
        "qzeros": pack_nibbles(zeros.to(torch.int64).T - 1),
        "scales": scales.T.to(torch.float16).contiguous(),
        "g_idx": (torch.arange(inp, dtype=torch.int32) // group_size),
    }


def unpack_gptq(qweight, qzeros, scales, g_idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(codes [out,in], scales f32 [out,in/g], zeros [out,in/g], group size) of a GPTQ v1 layer."""
    in8, out = qweight.shape
    codes = unpack_nibbles(qweight.T.contiguous())  # [out, in]
    zeros = (unpack_nibbles(qzeros).to(torch.int32) + 1).T.to(torch.uint8)
    groups = scales.shape[0]
    group_size = in8 * PACK // groups
    trivial = torch.arange(in8 * PACK, dtype=torch.int32) // group_size
    if not torch.equal(g_idx.to(torch.int32), trivial):
        raise ValueError("g_idx is not arange(in)//group_size (act-order checkpoints are not supported)")
    return codes, scales.T.to(torch.float32).contiguous(), zeros.contiguous(), group_size


def pack_compressed(codes, scales, zeros, group_size, sym: bool) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized: weight_packed [out,in/8], weight_scale [out,in/g] fp16,
    weight_shape int64 [2]; asym adds weight_zero_point int32 [out/8, in/g] packed along the
    output dimension (compressed-tensors stores zero-8 as a signed int4 and adds 8 back when
    packing, so each nibble holds the unsigned zero)."""
    out, inp = codes.shape
    packed = {
        "weight_packed": pack_nibbles(codes),
        "weight_scale": scales.to(torch.float16).contiguous(),
        "weight_shape": torch.tensor([out, inp], dtype=torch.int64),
    }
    if not sym:
        packed["weight_zero_point"] = pack_nibbles(zeros.T).T.contiguous()
    return packed


def unpack_compressed(weight_packed, weight_scale, weight_shape, weight_zero_point=None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(codes, scales f32, zeros, group size) of a compressed-tensors pack-quantized layer."""
    out, inp = (int(d) for d in weight_shape.tolist())
    codes = unpack_nibbles(weight_packed)[:, :inp].contiguous()
    groups = weight_scale.shape[1]
    if weight_zero_point is None:
        zeros = torch.full((out, groups), SYM_ZERO, dtype=torch.uint8)
    else:
        zeros = unpack_nibbles(weight_zero_point.T.contiguous()).T[:out].contiguous()
    return codes, weight_scale.to(torch.float32), zeros, inp // groups
