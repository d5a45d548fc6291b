"""AutoAWQ's GEMM packing of 4-bit group codes (the layout transformers, via gptqmodel, and vLLM load).

The codes, scales and zeros are those of `int4.quantize_groups` (or GPTQ's), with
`w = scale * (code - zero)`; only the packing differs from GPTQ v1 (facts §7):

- `qweight` int32 [in, out/8]: one row per input feature, 8 output columns per word;
- `qzeros` int32 [in/g, out/8]: the zeros as they are (0..15; GPTQ v1 stores zero-1);
- `scales` float16 [in/g, out].

Within a word, nibble i (bits 4i..4i+3) holds output column 8k + AWQ_ORDER[i] of its group of 8
(AutoAWQ's `WQLinear_GEMM.from_linear` and `awq/utils/packing_utils.py`; vLLM's `auto_awq.py`
undoes it with `[0, 4, 1, 5, 2, 6, 3, 7]`), for qweight and qzeros alike.
"""

from __future__ import annotations

import torch

from .int4 import PACK, pack_nibbles, unpack_nibbles

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column AWQ_ORDER[i] of its 8
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j sits in nibble AWQ_REVERSE_ORDER[j]


def pack_awq_columns(values: torch.Tensor) -> torch.Tensor:
    """Pack the last dimension (output columns), 8 values 0..15 per int32 word in AWQ's order."""
    *lead, n = values.shape
    if n % PACK:
        raise ValueError(f"cannot pack {n} columns into whole int32 words (need a multiple of {PACK})")
    order = torch.tensor(AWQ_ORDER)
    return pack_nibbles(values.reshape(*lead, n // PACK, PACK)[..., order].reshape(*lead, n))


def unpack_awq_columns(words: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_awq_columns: uint8 values, the last dimension 8 times longer."""
    *lead, n = words.shape
    nibbles = unpack_nibbles(words).reshape(*lead, n, PACK)
    return nibbles[..., torch.tensor(AWQ_REVERSE_ORDER)].reshape(*lead, n * PACK)


def pack_awq(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
             ) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM tensors of one Linear from codes [out,in], scales [out,in/g], zeros [out,in/g]."""
    out, inp = codes.shape
    if inp % group_size or scales.shape != (out, inp // group_size) or zeros.shape != scales.shape:
        raise ValueError(f"codes {list(codes.shape)}, scales {list(scales.shape)} and zeros "
                         f"{list(zeros.shape)} do not match group size {group_size}")
    return {
        "qweight": pack_awq_columns(codes.T.contiguous()),
        "qzeros": pack_awq_columns(zeros.T.contiguous()),
        "scales": scales.T.to(torch.float16).contiguous(),
    }


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(codes [out,in], scales f32 [out,in/g], zeros [out,in/g], group size) of an AWQ GEMM layer."""
    inp, out8 = qweight.shape
    groups = scales.shape[0]
    if groups == 0 or inp % groups:
        raise ValueError(f"scales has {groups} groups, which do not divide the {inp} input rows")
    if tuple(qzeros.shape) != (groups, out8) or tuple(scales.shape) != (groups, out8 * PACK):
        raise ValueError(f"qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)} and scales "
                         f"{list(scales.shape)} are not one AWQ layer")
    codes = unpack_awq_columns(qweight).T.contiguous()
    zeros = unpack_awq_columns(qzeros).T.contiguous()
    return codes, scales.T.to(torch.float32).contiguous(), zeros, inp // groups
