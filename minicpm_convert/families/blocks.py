"""The Llama blocks several families share, in float32: RMSNorm, rotary attention with grouped
key/value heads, the SwiGLU MLP. Each reads its weights through a `WeightSource` and reports the
input of every weight matrix to `capture` (importance matrices, GPTQ)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..spec import ModelSpec

if TYPE_CHECKING:  # pragma: no cover
    from ..reference import Capture, WeightSource


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def linear(x: torch.Tensor, source: "WeightSource", name: str, capture: "Capture | None") -> torch.Tensor:
    """x @ W.T for the weight `name`; `capture(name, x)` sees the input first."""
    if capture is not None:
        capture(name, x)
    return x @ source.read(name).T


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def causal_softmax_attention(q, k, v, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over [heads, tokens, dim], causal; returns [tokens, heads * v_dim]."""
    t = q.shape[1]
    scores = (q @ k.transpose(1, 2)) * scale
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).reshape(t, -1)


def gqa_attention(spec: ModelSpec, x: torch.Tensor, source: "WeightSource", prefix: str, rope,
                  capture: "Capture | None") -> torch.Tensor:
    """Rotary attention, q/k/v/o projections, key/value heads shared by groups of query heads."""
    cos, sin = rope
    t = x.shape[0]
    hd, nh, nkv = spec.head_dim, spec.num_attention_heads, spec.num_key_value_heads
    p = prefix + "self_attn."
    q = linear(x, source, p + "q_proj.weight", capture).view(t, nh, hd).transpose(0, 1)
    k = linear(x, source, p + "k_proj.weight", capture).view(t, nkv, hd).transpose(0, 1)
    v = linear(x, source, p + "v_proj.weight", capture).view(t, nkv, hd).transpose(0, 1)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if nkv != nh:
        k = k.repeat_interleave(nh // nkv, dim=0)
        v = v.repeat_interleave(nh // nkv, dim=0)
    out = causal_softmax_attention(q, k, v, hd ** -0.5)
    return linear(out, source, p + "o_proj.weight", capture)


def swiglu(x: torch.Tensor, source: "WeightSource", names: tuple[str, str, str],
           capture: "Capture | None") -> torch.Tensor:
    """down(silu(gate(x)) * up(x)); `names` are the gate, up and down weights."""
    gate, up, down = names
    act = torch.nn.functional.silu(linear(x, source, gate, capture)) * linear(x, source, up, capture)
    return linear(act, source, down, capture)


def dense_mlp_names(prefix: str) -> tuple[str, str, str]:
    return tuple(f"{prefix}mlp.{w}_proj.weight" for w in ("gate", "up", "down"))


Shapes = dict[str, tuple[int, ...]]


def gqa_shapes(spec: ModelSpec, p: str) -> Shapes:
    h, hd = spec.hidden_size, spec.head_dim
    q, kv = spec.num_attention_heads * hd, spec.num_key_value_heads * hd
    return {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q)}


def swiglu_shapes(spec: ModelSpec, p: str) -> Shapes:
    h, inter = spec.hidden_size, spec.intermediate_size
    return {p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter)}


def decoder_shapes(spec: ModelSpec, attention=gqa_shapes, mlp=swiglu_shapes) -> Shapes:
    """Every tensor of a Llama-shaped checkpoint in canonical order; a family passes its own
    attention and MLP parts (each `fn(spec, 'model.layers.N.')` -> shapes)."""
    h = spec.hidden_size
    shapes: Shapes = {"model.embed_tokens.weight": (spec.vocab_size, h)}
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes.update(attention(spec, p))
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes.update(mlp(spec, p))
    shapes["model.norm.weight"] = (h,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    return shapes
