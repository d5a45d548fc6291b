"""Which GGML type each tensor gets: llama-quantize's plan, ported from `llama_tensor_get_type`
(src/llama-quant.cpp) for every file type we write, with its per-tensor options
(`--output-tensor-type`, `--token-embedding-type`, `--tensor-type REGEX=TYPE`, `--pure`,
`--leave-output-tensor`), its counters over the file's tensors, its fallbacks for rows that do not
fill whole blocks, and its refusals of very-low-bit types without an importance matrix.

The plan takes model facts (:class:`ModelFacts`: architecture, layer/head/expert counts, the
tensors in file order), never a model family.  Float files follow llama.cpp's converter, as
llama-quantize leaves them: 2-D weights in the file's type, 1-D tensors in F32.  A tensor that is
not quantized keeps F32, the type llama-quantize sees in the f32 GGUF our files are compared with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F

from ...errors import ConvertError
from ...quants import SUPPORTED


@dataclass(frozen=True)
class FileType:
    name: str  # our spelling, e.g. q4_K_M
    ftype: F  # general.file_type
    default: T  # llama_ftype_get_default_type


FILE_TYPES = {ft.name: ft for ft in (
    FileType("f32", F.ALL_F32, T.F32),
    FileType("f16", F.MOSTLY_F16, T.F16),
    FileType("bf16", F.MOSTLY_BF16, T.BF16),
    FileType("q8_0", F.MOSTLY_Q8_0, T.Q8_0),
    FileType("q4_0", F.MOSTLY_Q4_0, T.Q4_0),
    FileType("q4_1", F.MOSTLY_Q4_1, T.Q4_1),
    FileType("q5_0", F.MOSTLY_Q5_0, T.Q5_0),
    FileType("q5_1", F.MOSTLY_Q5_1, T.Q5_1),
    FileType("q2_K", F.MOSTLY_Q2_K, T.Q2_K),
    FileType("q2_K_S", F.MOSTLY_Q2_K_S, T.Q2_K),
    FileType("q3_K_S", F.MOSTLY_Q3_K_S, T.Q3_K),
    FileType("q3_K_M", F.MOSTLY_Q3_K_M, T.Q3_K),
    FileType("q3_K_L", F.MOSTLY_Q3_K_L, T.Q3_K),
    FileType("q4_K_S", F.MOSTLY_Q4_K_S, T.Q4_K),
    FileType("q4_K_M", F.MOSTLY_Q4_K_M, T.Q4_K),
    FileType("q5_K_S", F.MOSTLY_Q5_K_S, T.Q5_K),
    FileType("q5_K_M", F.MOSTLY_Q5_K_M, T.Q5_K),
    FileType("q6_K", F.MOSTLY_Q6_K, T.Q6_K),
    FileType("iq4_nl", F.MOSTLY_IQ4_NL, T.IQ4_NL),
    FileType("iq4_xs", F.MOSTLY_IQ4_XS, T.IQ4_XS),
    FileType("iq3_xxs", F.MOSTLY_IQ3_XXS, T.IQ3_XXS),
    FileType("iq3_xs", F.MOSTLY_IQ3_XS, T.IQ3_S),
    FileType("iq3_s", F.MOSTLY_IQ3_S, T.IQ3_S),
    FileType("iq3_m", F.MOSTLY_IQ3_M, T.IQ3_S),
    FileType("iq2_xxs", F.MOSTLY_IQ2_XXS, T.IQ2_XXS),
    FileType("iq2_xs", F.MOSTLY_IQ2_XS, T.IQ2_XS),
    FileType("iq2_s", F.MOSTLY_IQ2_S, T.IQ2_XS),
    FileType("iq2_m", F.MOSTLY_IQ2_M, T.IQ2_S),
    FileType("tq1_0", F.MOSTLY_TQ1_0, T.TQ1_0),
    FileType("tq2_0", F.MOSTLY_TQ2_0, T.TQ2_0),
)}
# llama-quantize's own aliases (Q3_K/Q4_K/Q5_K mean the _M mixes) and ours
ALIASES = {"q3_k": "q3_K_M", "q4_k": "q4_K_M", "q5_k": "q5_K_M", "q4km": "q4_K_M", "q5km": "q5_K_M"}


def file_type(name: str) -> FileType | None:
    """A file type by any spelling llama-quantize accepts (case-insensitive, or its number)."""
    key = name.strip().lower()
    by_lower = {n.lower(): ft for n, ft in FILE_TYPES.items()}
    if key in ALIASES:
        return FILE_TYPES[ALIASES[key]]
    if key in by_lower:
        return by_lower[key]
    if key.isdigit():
        return next((ft for ft in FILE_TYPES.values() if int(ft.ftype) == int(key)), None)
    return None


def tensor_type_name(name: str) -> T | None:
    """A GGML type by its ggml name, case-insensitive (llama-quantize's parse_ggml_type); only the
    types we can write."""
    key = name.strip().upper()
    return next((t for t in SUPPORTED if t.name == key), None)


def sort_key(gguf_name: str) -> tuple[int, str]:
    """llama.cpp's weight order (weight_name_comparer): outside blocks first, then by block, then by name."""
    m = re.match(r"blk\.(\d+)\.", gguf_name)
    return (int(m.group(1)) if m else -1), gguf_name


# ------------------------------------------------------------------------------ model and options

@dataclass(frozen=True)
class ModelFacts:
    """What llama-quantize's plan reads of a model: hparams and the tensors (name, shape with the
    row length last) in file order."""
    arch: str  # general.architecture
    n_layers: int
    n_head: int
    n_head_kv: int
    tensors: tuple[tuple[str, tuple[int, ...]], ...]
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """LLM_TYPE_70B, the one model size the plan asks about (llama arch, 80 layers, GQA)."""
        return self.arch == "llama" and self.n_layers == 80 and self.n_head != self.n_head_kv and self.n_expert != 8


@dataclass(frozen=True)
class Options:
    """llama-quantize's per-tensor options (llama_model_quantize_params)."""
    file_type: FileType
    imatrix: bool = False  # an importance matrix is given (has_imatrix)
    output_tensor_type: T | None = None
    token_embedding_type: T | None = None
    tensor_types: tuple[tuple[str, T], ...] = ()  # (regex, type), first match wins
    pure: bool = False
    leave_output_tensor: bool = False  # quantize_output_tensor = false


# ------------------------------------------------------------------------------ categories

class Cat(Enum):
    TOKEN_EMBD = "token_embd"
    ATTENTION_Q = "attn_q"
    ATTENTION_V = "attn_v"
    ATTENTION_K = "attn_k"
    ATTENTION_QKV = "attn_qkv"
    ATTENTION_KV_B = "attn_kv_b"
    ATTENTION_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OUTPUT = "output"
    OTHER = "other"


def category(name: str) -> Cat:
    """tensor_get_category: the first substring that matches, in llama.cpp's order."""
    if name == "output.weight":
        return Cat.OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return Cat.TOKEN_EMBD
    for sub, cat in (("attn_qkv.weight", Cat.ATTENTION_QKV), ("attn_kv_b.weight", Cat.ATTENTION_KV_B),
                     ("attn_v.weight", Cat.ATTENTION_V), ("attn_k.weight", Cat.ATTENTION_K),
                     ("attn_q.weight", Cat.ATTENTION_Q), ("attn_output.weight", Cat.ATTENTION_OUTPUT),
                     ("ffn_up", Cat.FFN_UP), ("ffn_gate", Cat.FFN_GATE), ("ffn_down", Cat.FFN_DOWN)):
        if sub in name:
            return cat
    return Cat.OTHER


ATTN_V_LIKE = (Cat.ATTENTION_V, Cat.ATTENTION_QKV, Cat.ATTENTION_KV_B)

# tensor_allows_quantization: names never quantized (architecture-independent ones; the GLM5-next
# and BailingMoE3/MXFP4 special cases concern file types and architectures we do not write)
_NEVER = ("ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
          "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
          "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
          "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
          "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
          "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
          "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos",
          ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd")


def n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: dimensions up to the last one larger than 1 (ne order: the row length first)."""
    ne = list(reversed(shape))
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def allows_quantization(name: str, shape: tuple[int, ...], opts: Options) -> bool:
    if n_dims(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return False
    if opts.leave_output_tensor and name == "output.weight":
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not any(s in name for s in _NEVER)


def requires_imatrix(name: str, qtype: T, ft: FileType) -> bool:
    """tensor_requires_imatrix: llama-quantize refuses these without an importance matrix."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    if qtype in (T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S):
        return True
    return qtype == T.Q2_K and ft.ftype == F.MOSTLY_Q2_K_S


def block_size(qtype: T) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def is_quantized(qtype: T) -> bool:
    return qtype not in (T.F32, T.F16, T.BF16)


_FALLBACK = {T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL,
             T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL, T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0,
             T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def fallback(qtype: T, ncols: int) -> tuple[T, str | None]:
    """tensor_type_fallback: (type, why) for rows that do not fill whole blocks of ``qtype``."""
    if ncols % block_size(qtype) == 0:
        return qtype, None
    new = _FALLBACK.get(qtype, qtype)  # a 32-weight type has no smaller block: F16 below
    why = f"{ncols} columns not divisible by {block_size(qtype)} ({qtype.name})"
    if ncols % block_size(new) != 0:
        return T.F16, why + " -> F16 (unusual shape)"
    return new, f"{why} -> {new.name}"


# ------------------------------------------------------------------------------ the plan

@dataclass(frozen=True)
class TensorChoice:
    name: str
    shape: tuple[int, ...]
    type: T
    how: str  # "not quantized", "default", "rule", "--pure", "--tensor-type RE", "--output-tensor-type", ...
    fallback: str | None  # why the type fell back, if it did
    requires_imatrix: bool

    @property
    def n_weights(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.type]
        return self.n_weights // block * size


@dataclass
class _Counters:  # quantize_state_impl
    n_attention_wv: int
    n_layers: int
    tied: bool
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0


@dataclass
class Plan:
    file_type: FileType
    tensors: list[TensorChoice]
    has_imatrix: bool
    facts: ModelFacts = field(repr=False)

    def types(self) -> dict[str, T]:
        return {t.name: t.type for t in self.tensors}

    @property
    def n_weights(self) -> int:
        return sum(t.n_weights for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.tensor_bytes / self.n_weights if self.n_weights else 0.0

    @property
    def fallbacks(self) -> list[TensorChoice]:
        return [t for t in self.tensors if t.fallback]

    @property
    def needs_imatrix(self) -> list[TensorChoice]:
        return [t for t in self.tensors if t.requires_imatrix]

    def check(self) -> None:
        """llama-quantize's refusal: "this quantization requires an importance matrix"."""
        if not self.has_imatrix and self.needs_imatrix:
            t = self.needs_imatrix[0]
            raise ConvertError(f"--quant {self.file_type.name}: {t.name} would be {t.type.name}, which needs an "
                               f"importance matrix (--imatrix FILE), as llama-quantize requires "
                               f"({len(self.needs_imatrix)} such tensors)")


def make_plan(facts: ModelFacts, opts: Options) -> Plan:
    """llama-quantize's type for every tensor, in file order (its counters depend on that order)."""
    ft = opts.file_type
    cats = [category(name) for name, _ in facts.tensors]
    c = _Counters(n_attention_wv=sum(cat in ATTN_V_LIKE for cat in cats), n_layers=facts.n_layers,
                  tied=Cat.OUTPUT not in cats)
    patterns = [(re.compile(p.lower()), t) for p, t in opts.tensor_types]
    out = []
    for (name, shape), cat in zip(facts.tensors, cats):
        if not allows_quantization(name, shape, opts):
            out.append(TensorChoice(name, shape, T.F32, "not quantized", None, False))
            continue
        qtype, how, why = _tensor_type(facts, opts, c, patterns, name, shape, cat)
        out.append(TensorChoice(name, shape, qtype, how, why, requires_imatrix(name, qtype, ft)))
    return Plan(ft, out, opts.imatrix, facts)


def _tensor_type(facts, opts, c, patterns, name, shape, cat) -> tuple[T, str, str | None]:
    """llama_tensor_get_type: (type, how it was chosen, fallback reason)."""
    ncols = shape[-1]
    if opts.token_embedding_type is not None and cat == Cat.TOKEN_EMBD:
        named = name == "per_layer_token_embd.weight" and any(p.search(name) for p, _ in patterns)
        if not named:
            return _fits(opts.token_embedding_type, ncols, name, "--token-embedding-type"), "--token-embedding-type", None
    if opts.output_tensor_type is not None and cat == Cat.OUTPUT:
        return _fits(opts.output_tensor_type, ncols, name, "--output-tensor-type"), "--output-tensor-type", None
    new = opts.file_type.default
    if not is_quantized(new):
        return new, "default", None
    how = "default"
    manual = next(((p, t) for p, t in patterns if p.search(name)), None)
    if manual is not None:
        new, how = manual[1], f"--tensor-type {manual[0].pattern}"
    elif opts.pure:
        how = "--pure"
    else:
        chosen = _rules(facts, opts, c, name, shape, cat, new)
        how = "default" if chosen == new else "rule"
        new = chosen
    final, why = fallback(new, ncols)
    return final, how, why


def _fits(qtype: T, ncols: int, name: str, option: str) -> T:
    """The explicit type options skip llama-quantize's fallback (it would write a broken tensor)."""
    if ncols % block_size(qtype):
        raise ConvertError(f"{option} {qtype.name}: {name} has rows of {ncols}, not a multiple of "
                           f"{block_size(qtype)}")
    return qtype


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _layer(facts: ModelFacts, counter: int, name: str) -> tuple[int, int]:
    """layer_info: the counter, or for MoE models the layer in the name (experts are not consecutive)."""
    if max(1, facts.n_expert) > 1:
        m = re.match(r"blk\.(-?\d+)\.", name)
        if not m:
            raise ConvertError(f"{name}: failed to determine the layer")
        i = int(m.group(1))
        if not 0 <= i < facts.n_layers:
            raise ConvertError(f"{name}: bad layer {i}, must be in [0, {facts.n_layers})")
        return i, facts.n_layers
    return counter, facts.n_layers


def _rules(facts: ModelFacts, opts: Options, c: _Counters, name: str, shape, cat: Cat, new: T) -> T:
    """llama_tensor_get_type_impl, branch for branch (Falcon's rules included: the arch is a fact)."""
    ft = opts.file_type.ftype
    falcon = facts.arch == "falcon"
    iq2_family = (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_M)
    if cat == Cat.OUTPUT or (c.tied and cat == Cat.TOKEN_EMBD):
        if opts.output_tensor_type is not None:
            return opts.output_tensor_type
        if falcon or shape[-1] % block_size(new) != 0:
            return T.Q8_0
        if ft in (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ2_S,
                  F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_M):
            return T.Q5_K
        return T.Q6_K if new != T.Q8_0 else new
    if cat == Cat.TOKEN_EMBD:
        if opts.token_embedding_type is not None:
            return opts.token_embedding_type
        if ft in (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
            return T.Q2_K
        if ft in (F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ3_XXS):
            return T.IQ3_S
        if ft in (F.MOSTLY_TQ1_0, F.MOSTLY_TQ2_0):
            return T.Q4_K
        return new
    if ft in iq2_family:
        s_or_m = ft in (F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M)
        if cat in ATTN_V_LIKE:
            if facts.n_gqa >= 4 or facts.n_expert >= 4:
                new = T.Q4_K
            else:
                new = T.IQ3_S if s_or_m else T.Q2_K
            c.i_attention_wv += 1
        elif facts.n_expert == 8 and cat == Cat.ATTENTION_K:
            new = T.Q4_K
        elif cat == Cat.FFN_DOWN:
            if c.i_ffn_down < c.n_layers // 8:
                new = T.IQ3_S if s_or_m else T.Q2_K
            c.i_ffn_down += 1
        elif cat == Cat.ATTENTION_OUTPUT:
            if facts.n_expert == 8:
                new = T.Q5_K
            elif ft in (F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
                new = T.IQ2_XXS
            elif s_or_m:
                new = T.IQ3_S
        return new
    if cat in ATTN_V_LIKE:
        gqa = facts.n_gqa
        if ft == F.MOSTLY_Q2_K:
            new = T.Q4_K if gqa >= 4 else T.Q3_K
        elif ft == F.MOSTLY_Q2_K_S and gqa >= 4:
            new = T.Q4_K
        elif ft == F.MOSTLY_IQ3_XXS:
            new = T.Q4_K if gqa >= 4 else (T.IQ3_S if not opts.imatrix else T.IQ3_XXS)
        elif ft in (F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_S) and gqa >= 4:
            new = T.Q4_K
        elif ft == F.MOSTLY_IQ3_M:
            new = T.Q4_K
        elif ft == F.MOSTLY_Q3_K_M:
            new = T.Q5_K if c.i_attention_wv < 2 else T.Q4_K
        elif ft == F.MOSTLY_Q3_K_L:
            new = T.Q5_K
        elif ft in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and gqa >= 4:
            new = T.Q5_K
        elif ft in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and use_more_bits(c.i_attention_wv, c.n_attention_wv):
            new = T.Q6_K
        elif ft == F.MOSTLY_Q4_K_S and c.i_attention_wv < 4:
            new = T.Q5_K
        if facts.is_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K  # 8 heads share attn_v in the 70B: more bits for little size
        if facts.n_expert == 8:
            new = T.Q8_0  # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
        c.i_attention_wv += 1
        return new
    if cat == Cat.ATTENTION_K:
        if facts.n_expert == 8:
            return T.Q8_0
        if ft == F.MOSTLY_IQ3_XS:
            return T.IQ3_XXS
        if ft == F.MOSTLY_IQ3_XXS:
            return T.IQ2_S
        return new
    if cat == Cat.ATTENTION_Q:
        if ft == F.MOSTLY_IQ3_XS:
            return T.IQ3_XXS
        if ft == F.MOSTLY_IQ3_XXS:
            return T.IQ2_S
        return new
    if cat == Cat.FFN_DOWN:
        i, n = _layer(facts, c.i_ffn_down, name)
        if ft == F.MOSTLY_Q2_K:
            new = T.Q3_K
        elif ft == F.MOSTLY_Q2_K_S:
            if i < n // 8:
                new = T.Q4_K
        elif ft == F.MOSTLY_IQ3_XXS and not opts.imatrix:
            new = T.Q4_K if i < n // 8 else T.Q3_K
        elif ft == F.MOSTLY_Q3_K_M:
            new = T.Q5_K if i < n // 16 else (T.Q4_K if not falcon or use_more_bits(i, n) else T.Q3_K)
        elif ft == F.MOSTLY_IQ3_M and (i < n // 8 or (facts.n_expert == 8 and use_more_bits(i, n))):
            new = T.Q4_K
        elif ft == F.MOSTLY_Q3_K_L:
            new = T.Q4_K if falcon else T.Q5_K
        elif ft == F.MOSTLY_Q4_K_M:
            if falcon:
                new = T.Q6_K if i < n // 16 else (T.Q5_K if use_more_bits(i, n) else T.Q4_K)
            elif use_more_bits(i, n):
                new = T.Q6_K
        elif i < n // 8 and ft in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and not opts.imatrix:
            new = T.Q5_K
        elif ft == F.MOSTLY_Q5_K_M and use_more_bits(i, n):
            new = T.Q6_K
        elif ft == F.MOSTLY_Q4_K_S and not falcon and i < n // 8:
            new = T.Q5_K
        elif ft in (F.MOSTLY_Q4_0, F.MOSTLY_Q5_0) and opts.imatrix and i < n // 8:
            # "Guard against craziness in the first few ffn_down layers ... even with imatrix"
            new = T.Q4_1 if ft == F.MOSTLY_Q4_0 else T.Q5_1
        c.i_ffn_down += 1
        return new
    if cat == Cat.ATTENTION_OUTPUT:
        if not falcon:
            if facts.n_expert == 8:
                if ft in (F.MOSTLY_Q2_K, F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M,
                          F.MOSTLY_IQ4_NL, F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M, F.MOSTLY_IQ3_S, F.MOSTLY_IQ3_M,
                          F.MOSTLY_IQ4_XS):
                    new = T.Q5_K
            else:
                new = {F.MOSTLY_Q2_K: T.Q3_K, F.MOSTLY_IQ3_XXS: T.IQ3_S, F.MOSTLY_Q3_K_M: T.Q4_K,
                       F.MOSTLY_Q3_K_L: T.Q5_K, F.MOSTLY_IQ3_M: T.Q4_K}.get(ft, new)
        elif ft == F.MOSTLY_Q3_K_L:
            new = T.Q4_K
        return new
    if cat == Cat.ATTENTION_QKV:
        if ft in (F.MOSTLY_Q3_K_M, F.MOSTLY_Q3_K_L, F.MOSTLY_IQ3_M):
            return T.Q4_K
        if ft == F.MOSTLY_Q4_K_M:
            return T.Q5_K
        if ft == F.MOSTLY_Q5_K_M:
            return T.Q6_K
        return new
    if cat in (Cat.FFN_GATE, Cat.FFN_UP):
        counter = c.i_ffn_gate if cat == Cat.FFN_GATE else c.i_ffn_up
        i, n = _layer(facts, counter, name)
        if ft == F.MOSTLY_IQ3_XS and n // 8 <= i < 7 * n // 8:
            new = T.IQ3_XXS
        if cat == Cat.FFN_GATE:
            c.i_ffn_gate += 1
        else:
            c.i_ffn_up += 1
        return new
    return new


# ------------------------------------------------------------------------------ the command line

def parse_options(quant: str, *, imatrix: bool = False, output_tensor_type: str | None = None,
                  token_embedding_type: str | None = None, tensor_types: list[str] | tuple[str, ...] = (),
                  pure: bool = False, leave_output_tensor: bool = False) -> Options:
    """to-gguf's quantization options, spelled as llama-quantize's (one place for all of them)."""
    ft = file_type(quant)
    if ft is None:
        raise ConvertError(f"--quant: unknown type {quant!r} (choose from {', '.join(FILE_TYPES)}, "
                           "or llama-quantize's spellings: Q4_K_M, q4_k_m, Q4_K, 15 ...)")

    def ggml_type(option: str, text: str) -> T:
        t = tensor_type_name(text)
        if t is None:
            names = ", ".join(sorted(x.name for x in SUPPORTED))
            raise ConvertError(f"{option}: unknown or unsupported ggml type {text!r} (one of {names})")
        return t

    overrides = []
    for item in tensor_types:
        pattern, sep, type_text = item.partition("=")
        if not sep or not pattern or not type_text:
            raise ConvertError(f"--tensor-type: expected REGEX=TYPE, e.g. attn_v=q8_0, got {item!r}")
        try:
            re.compile(pattern.lower())
        except re.error as e:
            raise ConvertError(f"--tensor-type: bad regular expression {pattern!r} ({e})") from None
        overrides.append((pattern.lower(), ggml_type("--tensor-type", type_text)))
    return Options(ft, imatrix=imatrix,
                   output_tensor_type=ggml_type("--output-tensor-type", output_tensor_type) if output_tensor_type else None,
                   token_embedding_type=ggml_type("--token-embedding-type", token_embedding_type) if token_embedding_type else None,
                   tensor_types=tuple(overrides), pure=pure, leave_output_tensor=leave_output_tensor)


# ------------------------------------------------------------------------------ the --dry-run report

def report(plan: Plan, header_bytes: int = 0) -> dict:
    """The plan as data: type per tensor, what fell back and why, bits per weight, file size
    (``header_bytes``: the metadata and tensor index before the data; tensors are 32-byte aligned)."""
    padded = sum(-(-t.nbytes // 32) * 32 for t in plan.tensors)
    return {
        "file_type": plan.file_type.name,
        "importance_matrix": plan.has_imatrix,
        "tensors": [{"name": t.name, "shape": list(t.shape), "type": t.type.name, "how": t.how,
                     "fallback": t.fallback, "bytes": t.nbytes, "needs_imatrix": t.requires_imatrix}
                    for t in plan.tensors],
        "fallbacks": len(plan.fallbacks),
        "weights": plan.n_weights,
        "tensor_bytes": plan.tensor_bytes,
        "bits_per_weight": round(plan.bits_per_weight, 4),
        "file_bytes": -(-header_bytes // 32) * 32 + padded if header_bytes else None,
        "needs_imatrix": [t.name for t in plan.needs_imatrix],
    }


def format_report(r: dict) -> str:
    """The report as the text --dry-run prints."""
    rows = [(t["name"], "x".join(map(str, reversed(t["shape"]))), t["type"], t["how"], t["fallback"] or "")
            for t in r["tensors"]]
    head = ("tensor", "ggml shape", "type", "chosen by", "fallback")
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(4)]
    lines = [("  ".join(str(v).ljust(w) for v, w in zip(row[:4], widths)) + "  " + row[4]).rstrip()
             for row in [head, *rows]]
    size = r["file_bytes"] if r["file_bytes"] is not None else r["tensor_bytes"]
    lines.append(f"{len(rows)} tensors, {r['weights']:,} weights, {r['bits_per_weight']:.2f} bits per weight, "
                 f"{'file' if r['file_bytes'] else 'tensor data'} {size / 2**20:.2f} MiB ({size:,} bytes); "
                 f"{r['fallbacks']} fell back")
    for k, f in enumerate(r.get("files", []), 1):  # a split set (to-gguf --split-max-*)
        lines.append(f"file {k} of {len(r['files'])}: {f['tensors']} tensors, {f['bytes'] / 2**20:.2f} MiB "
                     f"({f['bytes']:,} bytes)")
    if r["needs_imatrix"] and not r["importance_matrix"]:
        lines.append(f"warning: {len(r['needs_imatrix'])} tensors need an importance matrix (--imatrix FILE); "
                     f"writing this file will be refused without one")
    return "\n".join(lines)
