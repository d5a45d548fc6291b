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

`search=True` runs the data-free group search of `int4_search.py` (a grid of scales, each with
its least-squares refit, scored by weighted squared error; plain rounding is one candidate), in
the compiled kernel when it is built, else in NumPy: both give the same bits.
"""

from __future__ import annotations

import numpy as np
import torch

from . import int4_search

BITS = 4
QMAX = 15
SYM_ZERO = 8
PACK = 32 // BITS  # codes per int32 word
FP16_TINY = 2.0 ** -24  # smallest positive float16: stands in for a scale that underflows


def quantize_groups_with_errors(w: torch.Tensor, group_size: int, sym: bool = True, search: bool = True,
                                column_weights: torch.Tensor | None = None):
    """quantize_groups' (codes, scales, zeros), and the squared errors of those codes and of plain
    rounding, and the sum of squares, per group: float32 [out, in/g, 3]."""
    out, inp = w.shape
    if inp % group_size:
        raise ValueError(f"input size {inp} is not a multiple of group size {group_size}")
    if column_weights is not None and inp != group_size:
        raise ValueError("column_weights applies to one group of columns")
    x = w.detach().to(torch.float32).reshape(-1, group_size).contiguous().numpy()
    if not np.isfinite(x).all():
        raise ValueError("weight contains NaN or Inf")
    # contiguous: the compiled search reads the buffer as is (a Hessian's diagonal is a strided view)
    cw = None if column_weights is None else column_weights.detach().to(torch.float32).reshape(-1).contiguous().numpy()
    codes, scales, zeros, errors = int4_search.search_groups(x, sym, search, cw)
    groups = inp // group_size
    return (torch.from_numpy(codes).reshape(out, inp), torch.from_numpy(scales).reshape(out, groups),
            torch.from_numpy(zeros).reshape(out, groups), torch.from_numpy(errors).reshape(out, groups, 3))


def quantize_groups(w: torch.Tensor, group_size: int, sym: bool = True, search: bool = True,
                    column_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [out,in] 0..15, scales f32 [out,in/g] (float16 values), zeros uint8 [out,in/g]).
    `column_weights` [group_size], positive: the search's error weight of each column (one group
    of columns, e.g. GPTQ's activation energy), instead of |x| + the group's rms."""
    return quantize_groups_with_errors(w, group_size, sym, search, column_weights)[:3]


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
    # uint32 in NumPy: a quarter of the memory traffic of int64 shifts and a sum, on one thread
    v = values.to(torch.uint8).contiguous().numpy().reshape(-1, PACK).astype(np.uint32)
    words = v[:, 0].copy()
    for i in range(1, PACK):
        words |= v[:, i] << np.uint32(BITS * i)
    # The top nibble makes words >= 2^31: the bit pattern is kept, read as signed int32.
    return torch.from_numpy(words.view(np.int32)).reshape(*lead, n // PACK)


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
        "qweight": pack_nibbles(codes).T.contiguous(),
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
