"""Which GGML type each tensor gets: llama-quantize's plan (`llama_tensor_get_type`, no imatrix).

Float files follow llama.cpp's converter: 2-D weights in the file's type, 1-D tensors in F32.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F

BLOCK = {T.F32: 1, T.F16: 1, T.BF16: 1, T.Q8_0: 32, T.Q4_0: 32, T.Q5_0: 32, T.Q5_1: 32,
         T.Q4_K: 256, T.Q5_K: 256, T.Q6_K: 256}
FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


@dataclass(frozen=True)
class FileType:
    name: str
    ftype: F
    default: T


FILE_TYPES = {ft.name: ft for ft in (
    FileType("f32", F.ALL_F32, T.F32),
    FileType("f16", F.MOSTLY_F16, T.F16),
    FileType("bf16", F.MOSTLY_BF16, T.BF16),
    FileType("q8_0", F.MOSTLY_Q8_0, T.Q8_0),
    FileType("q4_0", F.MOSTLY_Q4_0, T.Q4_0),
    FileType("q4_K_M", F.MOSTLY_Q4_K_M, T.Q4_K),
    FileType("q5_K_M", F.MOSTLY_Q5_K_M, T.Q5_K),
    FileType("q6_K", F.MOSTLY_Q6_K, T.Q6_K),
)}
ALIASES = {"q4km": "q4_K_M", "q5km": "q5_K_M", "q4_k_m": "q4_K_M", "q5_k_m": "q5_K_M", "q6_k": "q6_K"}


def file_type(name: str) -> FileType | None:
    name = ALIASES.get(name, ALIASES.get(name.lower(), name))
    return FILE_TYPES.get(name)


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], ft: FileType, n_layers: int, tied: bool,
                n_expert: int = 0) -> T:
    """GGML type of one GGUF tensor; `shape` in rows x columns (ne[0] is the last entry).

    MoE (`n_expert`): the router `ffn_gate_inp` is never quantized (llama.cpp's converter writes it
    F32); stacked experts [n_expert, rows, cols] follow the ffn_* rules with the layer read from the
    name; and llama-quantize has extra rules for exactly 8 experts (Mixtral, MiniCPM-MoE-8x2B).
    """
    if len(shape) < 2 or name.endswith("_norm.weight") or not name.endswith("weight") or "ffn_gate_inp" in name:
        return T.F32
    if ft.default in (T.F32, T.F16, T.BF16):
        return ft.default
    ncols = shape[-1]
    new = ft.default
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    more_bits_file = ft.ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M)
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        # The head (or the tied embedding serving as head) gets more bits.
        if ncols % BLOCK[new] != 0:
            new = T.Q8_0
        elif new != T.Q8_0:
            new = T.Q6_K
    elif more_bits_file and name.endswith(("attn_v.weight", "attn_kv_b.weight", "ffn_down.weight", "ffn_down_exps.weight")) \
            and use_more_bits(layer, n_layers):
        new = T.Q6_K
    if n_expert == 8:  # "bumping this to Q8_0 trades just ~128MB" (llama_tensor_get_type_impl)
        if name.endswith(("attn_v.weight", "attn_k.weight")):
            new = T.Q8_0
        elif name.endswith("attn_output.weight") and ft.ftype == F.MOSTLY_Q4_K_M:
            new = T.Q5_K
    return fallback(new, ncols)


def fallback(qtype: T, ncols: int) -> T:
    """llama-quantize's `tensor_type_fallback` for rows that do not fill whole blocks."""
    if ncols % BLOCK[qtype] == 0:
        return qtype
    qtype = FALLBACK.get(qtype, qtype)
    return qtype if ncols % BLOCK[qtype] == 0 else T.F16


def sort_key(gguf_name: str) -> tuple[int, str]:
    """llama.cpp's weight order: tensors outside blocks first, then by block, then by name."""
    layer = int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else -1
    return layer, gguf_name
