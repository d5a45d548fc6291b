"""The one reference forward pass, in float32, layer by layer, over any source.

It reads weights through one interface, `WeightSource`, so the same code runs on the original
checkpoint, a Llama-format export, a GGUF file or an INT4 folder. The skeleton (embedding times
scale_emb, pre-norm blocks whose two branches are scaled by the residual scale, final norm, logit
divisor, head) is common to every family; each block's attention and MLP are the family's
(`families/`). A Llama model is a MiniCPM model whose three scalars are 1. Only one layer's
weights are in memory at a time, and the head is applied in row chunks.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from .families import family_of
from .families.blocks import rms_norm
from .spec import ModelSpec

HEAD_CHUNK_ROWS = 8192

# Called with (weight name, the activations [tokens, in_features] that multiply it), for every
# weight matrix of every block, in the order the forward pass uses them: what an importance
# matrix accumulates and what GPTQ's Hessians are made of. MoE experts see only their tokens.
Capture = Callable[[str, torch.Tensor], None]


class WeightSource(Protocol):
    spec: ModelSpec

    def has(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of a weight, float32, in Hugging Face layout and naming."""
        ...


def embed(source: WeightSource, tokens: list[int]) -> torch.Tensor:
    """Embedding rows of the tokens times scale_emb: the input of block 0."""
    rows = [source.read("model.embed_tokens.weight", i, i + 1) for i in tokens]
    return torch.cat(rows, dim=0) * source.spec.scale_emb


def rope_tables(spec: ModelSpec, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the positions (half-split layout, float32), with the family's rope scaling."""
    return family_of(spec).rope_tables(spec, positions)


def decoder_layer(source: WeightSource, i: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                  capture: Capture | None = None) -> torch.Tensor:
    """Block i on the hidden states h [tokens, hidden]; `rope` is rope_tables() of the positions."""
    spec = source.spec
    family = family_of(spec)
    r = spec.residual_scale
    p = f"model.layers.{i}."
    with torch.no_grad():
        x = rms_norm(h, source.read(p + "input_layernorm.weight"), spec.rms_norm_eps)
        h = h + family.attention(spec, x, source, p, rope, capture) * r
        x = rms_norm(h, source.read(p + "post_attention_layernorm.weight"), spec.rms_norm_eps)
        return h + family.mlp(spec, x, source, p, capture) * r


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
