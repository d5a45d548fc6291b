"""Reference forward pass of MiniCPM (muP) and Llama in float32, layer by layer.

It reads weights through one interface, `WeightSource`, so the same code runs on the original
checkpoint, a Llama-format export, a GGUF file or an INT4 folder. A Llama model is a MiniCPM model
whose three scalars are 1 (`ModelSpec` of model_type llama), so there is one forward pass.
Only one layer's weights are in memory at a time, and the head is applied in row chunks.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch

from .names import moe_prefix
from .spec import ModelSpec

HEAD_CHUNK_ROWS = 8192

# Called with (weight name, the activations [tokens, in_features] that multiply it), for every
# weight matrix of every block, in the order the forward pass uses them: what an importance
# matrix accumulates and what GPTQ's Hessians are made of. MoE experts see only their tokens.
Capture = Callable[[str, torch.Tensor], None]


def _linear(x: torch.Tensor, w: torch.Tensor, name: str, capture: Capture | None) -> torch.Tensor:
    if capture is not None:
        capture(name, x)
    return x @ w.T


class WeightSource(Protocol):
    spec: ModelSpec

    def has(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of a weight, float32, in Hugging Face layout and naming."""
        ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def longrope(spec: ModelSpec, length: int) -> tuple[torch.Tensor, float]:
    """(1/ext_factors, cos/sin scale) of LongRoPE (MiniCPM4): long factors beyond the original length."""
    scaling = spec.rope_scaling
    orig = scaling.get("original_max_position_embeddings") or spec.raw.get("original_max_position_embeddings")
    factors = scaling["long_factor"] if length > orig else scaling["short_factor"]
    ratio = spec.max_position_embeddings / orig
    scale = math.sqrt(1 + math.log(ratio) / math.log(orig)) if ratio > 1 else 1.0
    return 1.0 / torch.tensor(factors, dtype=torch.float32), scale


def rope_tables(spec: ModelSpec, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for the half-split ("rotate_half") layout, computed in float32.

    Dynamic NTK scaling (MiniCPM-2B-128k) changes nothing below max_position_embeddings, which
    verify enforces, so only LongRoPE alters the tables here.
    """
    hd = spec.rope_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    t = positions.float()[:, None]
    scale = 1.0
    if spec.rope_type == "longrope":
        inv_ext, scale = longrope(spec, len(positions))
        t = t * inv_ext[None, :]
    freqs = t * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention(spec: ModelSpec, h: torch.Tensor, source: "WeightSource", p: str, cos, sin,
              capture: Capture | None = None) -> torch.Tensor:
    t = h.shape[0]
    hd, nh, nkv = spec.head_dim, spec.num_attention_heads, spec.num_key_value_heads
    lin = lambda x, w: _linear(x, source.read(p + f"self_attn.{w}_proj.weight"),  # noqa: E731
                               p + f"self_attn.{w}_proj.weight", capture)
    q = lin(h, "q").view(t, nh, hd).transpose(0, 1)
    k = lin(h, "k").view(t, nkv, hd).transpose(0, 1)
    v = lin(h, "v").view(t, nkv, hd).transpose(0, 1)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if nkv != nh:
        k = k.repeat_interleave(nh // nkv, dim=0)
        v = v.repeat_interleave(nh // nkv, dim=0)
    scores = (q @ k.transpose(1, 2)) / (hd ** 0.5)
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return lin(out.transpose(0, 1).reshape(t, nh * hd), "o")


def causal_softmax_attention(q, k, v, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over [heads, tokens, dim], causal; returns [tokens, heads * v_dim]."""
    t = q.shape[1]
    scores = (q @ k.transpose(1, 2)) * scale
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).reshape(t, -1)


def mla_attention(spec: ModelSpec, h: torch.Tensor, source: "WeightSource", p: str, cos, sin,
                  capture: Capture | None = None) -> torch.Tensor:
    """MiniCPM3's multi-head latent attention: low-rank q and kv; RoPE on each head's rope part,
    whose key part is one vector shared by all heads."""
    m, t, nh = spec.mla, h.shape[0], spec.num_attention_heads
    w = lambda name: source.read(p + f"self_attn.{name}.weight")  # noqa: E731
    lin = lambda x, name: _linear(x, w(name), p + f"self_attn.{name}.weight", capture)  # noqa: E731
    q = lin(rms_norm(lin(h, "q_a_proj"), w("q_a_layernorm"), spec.rms_norm_eps), "q_b_proj")
    q = q.view(t, nh, m.qk_head_dim).transpose(0, 1)
    q_pass, q_rot = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
    kv_a = lin(h, "kv_a_proj_with_mqa")
    kv_latent, k_rot = kv_a.split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
    kv = lin(rms_norm(kv_latent, w("kv_a_layernorm"), spec.rms_norm_eps), "kv_b_proj")
    k_pass, v = kv.view(t, nh, m.qk_nope_head_dim + m.v_head_dim).transpose(0, 1).split(
        [m.qk_nope_head_dim, m.v_head_dim], dim=-1)
    q_rot, k_rot = apply_rope(q_rot, cos, sin), apply_rope(k_rot[None], cos, sin).expand(nh, t, -1)
    out = causal_softmax_attention(torch.cat((q_pass, q_rot), -1), torch.cat((k_pass, k_rot), -1), v,
                                   m.qk_head_dim ** -0.5)
    return lin(out, "o_proj")


def mlp(h: torch.Tensor, source: "WeightSource", names: tuple[str, str, str],
        capture: Capture | None = None) -> torch.Tensor:
    """SwiGLU: down(silu(gate(h)) * up(h)); `names` are the gate, up and down weights."""
    gate, up, down = names
    act = torch.nn.functional.silu(_linear(h, source.read(gate), gate, capture)) * _linear(h, source.read(up), up, capture)
    return _linear(act, source.read(down), down, capture)


def route(h: torch.Tensor, router: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniCPM-MoE routing in float32: softmax over all experts, keep the top k, renormalise.

    Returns (weights [tokens, k] summing to 1, expert ids [tokens, k]).
    """
    probs = torch.softmax((h @ router.T).float(), dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts


def moe_mlp(h: torch.Tensor, source: "WeightSource", moe: str, top_k: int,
            capture: Capture | None = None) -> torch.Tensor:
    """Sum over each token's top-k experts of weight x SwiGLU expert (`{moe}experts.E.w1/w3/w2`,
    gate/up/down); an expert's weights are read only when some token uses it."""
    router = moe + "gate.weight"
    if capture is not None:
        capture(router, h)
    weights, experts = route(h, source.read(router), top_k)
    out = torch.zeros_like(h)
    for e in experts.unique().tolist():
        tok, slot = (experts == e).nonzero(as_tuple=True)
        names = tuple(f"{moe}experts.{e}.{w}.weight" for w in ("w1", "w3", "w2"))
        out.index_add_(0, tok, mlp(h[tok], source, names, capture) * weights[tok, slot, None])
    return out


def embed(source: WeightSource, tokens: list[int]) -> torch.Tensor:
    """Embedding rows of the tokens times scale_emb: the input of block 0."""
    rows = [source.read("model.embed_tokens.weight", i, i + 1) for i in tokens]
    return torch.cat(rows, dim=0) * source.spec.scale_emb


def decoder_layer(source: WeightSource, i: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                  capture: Capture | None = None) -> torch.Tensor:
    """Block i on the hidden states h [tokens, hidden]; `rope` is rope_tables() of the positions."""
    spec = source.spec
    cos, sin = rope
    r = spec.residual_scale
    p = f"model.layers.{i}."
    with torch.no_grad():
        x = rms_norm(h, source.read(p + "input_layernorm.weight"), spec.rms_norm_eps)
        if spec.mla:
            a = mla_attention(spec, x, source, p, cos, sin, capture)
        else:
            a = attention(spec, x, source, p, cos, sin, capture)
        h = h + a * r
        x = rms_norm(h, source.read(p + "post_attention_layernorm.weight"), spec.rms_norm_eps)
        if spec.num_experts:
            m = moe_mlp(x, source, p + moe_prefix(spec), spec.num_experts_per_tok, capture)
        else:
            m = mlp(x, source, tuple(p + f"mlp.{w}_proj.weight" for w in ("gate", "up", "down")), capture)
        return h + m * r


def final_logits(source: WeightSource, h: torch.Tensor) -> torch.Tensor:
    """Final norm, the logit divisor and the head (applied in row chunks of the vocabulary)."""
    spec = source.spec
    with torch.no_grad():
        h = rms_norm(h, source.read("model.norm.weight"), spec.rms_norm_eps) / spec.logit_scale
        head = "lm_head.weight" if source.has("lm_head.weight") else "model.embed_tokens.weight"
        vocab = source.shape(head)[0]
        chunks = [h @ source.read(head, s, min(vocab, s + HEAD_CHUNK_ROWS)).T
                  for s in range(0, vocab, HEAD_CHUNK_ROWS)]
        return torch.cat(chunks, dim=1)


def forward(source: WeightSource, tokens: list[int], capture: Capture | None = None) -> torch.Tensor:
    """Logits [len(tokens), vocab] in float32."""
    if not tokens:
        raise ValueError("no tokens")
    with torch.no_grad():
        h = embed(source, tokens)
        rope = rope_tables(source.spec, torch.arange(len(tokens)))
        for i in range(source.spec.num_hidden_layers):
            h = decoder_layer(source, i, h, rope, capture)
        return final_logits(source, h)
