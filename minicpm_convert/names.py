"""The one table of tensor names between formats, and the check of a checkpoint's tensor set.

Hugging Face (MiniCPM and Llama share names) on the left, GGUF (llama.cpp) on the right. Which
tensors a model has, and their shapes, is its family's knowledge (`Family.expected_shapes`).
"""

from __future__ import annotations

import re

from .errors import ConvertError

GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    # MiniCPM3's multi-head latent attention (GGUF arch minicpm3)
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.kv_b_proj.weight": "attn_kv_b.weight",
    # MiniCPM-MoE: the router, and each expert kind stacked over experts into one 3-D tensor
    # [n_expert, rows, cols] (`mlp.experts.wN.weight` names the stack; see `expert_parts`).
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.experts.w1.weight": "ffn_gate_exps.weight",
    "mlp.experts.w3.weight": "ffn_up_exps.weight",
    "mlp.experts.w2.weight": "ffn_down_exps.weight",
}
# A MiniCPM-MoE expert (`mlp.experts.E.wN`, w1 gate, w3 up, w2 down) and its Mixtral spelling
# (`block_sparse_moe.experts.E.wN`, what to-llama writes for MoE).
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(w[123])\.weight$")
MIXTRAL_PREFIX = "block_sparse_moe."


def expert_parts(name: str) -> tuple[int, int, str] | None:
    """(layer, expert, 'w1'|'w2'|'w3') of a per-expert weight name, else None."""
    m = _EXPERT.match(name)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def stacked_name(layer: int, w: str) -> str:
    """The Hugging Face-style name of one layer's experts of one kind stacked (GGUF's 3-D tensor)."""
    return f"model.layers.{layer}.mlp.experts.{w}.weight"


def to_mixtral(name: str) -> str:
    """MiniCPM-MoE name -> Mixtral name (router and experts move to block_sparse_moe)."""
    return name.replace(".mlp.experts.", "." + MIXTRAL_PREFIX + "experts.").replace(
        ".mlp.gate.weight", "." + MIXTRAL_PREFIX + "gate.weight")
# The seven Linear layers of a decoder block (what INT4 quantizes).
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_GGUF_TO_HF_GLOBAL = {v: k for k, v in GLOBAL_NAMES.items()}
_GGUF_TO_HF_LAYER = {v: k for k, v in LAYER_NAMES.items()}

# Buffers some checkpoints carry that are recomputed at load time, never weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def hf_to_gguf(name: str) -> str:
    name = name.replace("." + MIXTRAL_PREFIX, ".mlp.")
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    m = _HF_LAYER.match(name)
    if m and m.group(2) in LAYER_NAMES:
        return f"blk.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"
    raise KeyError(name)


def gguf_to_hf(name: str) -> str:
    if name in _GGUF_TO_HF_GLOBAL:
        return _GGUF_TO_HF_GLOBAL[name]
    m = _GGUF_LAYER.match(name)
    if m and m.group(2) in _GGUF_TO_HF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_TO_HF_LAYER[m.group(2)]}"
    raise KeyError(name)


def layer_index(name: str) -> int | None:
    m = _HF_LAYER.match(name) or _GGUF_LAYER.match(name)
    return int(m.group(1)) if m else None


def check_tensor_set(spec, present: dict[str, tuple[int, ...]], where: str) -> list[str]:
    """Compare a checkpoint's tensors with what its config implies; return the canonical order.

    A tied model that still ships lm_head.weight is accepted (the head is then used as given).
    """
    from .families import family_of

    held = max((i for n in present if (i := layer_index(n)) is not None), default=-1) + 1
    if spec.num_hidden_layers > held:  # before listing a (perhaps absurdly large) expected set
        raise ConvertError(f"{where}: missing tensor 'model.layers.{held}.input_layernorm.weight' (config.json "
                           f"num_hidden_layers is {spec.num_hidden_layers}, the weights hold {held} layers)")
    expected = family_of(spec).expected_shapes(spec)
    if spec.tie_word_embeddings and "lm_head.weight" in present:
        expected["lm_head.weight"] = (spec.vocab_size, spec.hidden_size)
    names = [n for n in present if not n.endswith(IGNORED_SUFFIXES)]
    missing = [n for n in expected if n not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConvertError(f"{where}: missing tensor '{missing[0]}'{more}")
    unexpected = [n for n in names if n not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConvertError(f"{where}: unexpected tensor '{unexpected[0]}'{more} for this config")
    for name, shape in expected.items():
        if tuple(present[name]) != shape:
            raise ConvertError(f"{where}: tensor '{name}' has shape {list(present[name])}, "
                               f"config.json implies {list(shape)}")
    return list(expected)
