"""GGUF's row layout of the rotary projections: llama.cpp's rope pairs adjacent dimensions,
Hugging Face's rotate_half pairs dimension i with i + head_dim/2 (llama.cpp's `LlamaModel.permute`)."""

from __future__ import annotations

import torch


def permute_rows(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's half-split rotary layout -> ggml's adjacent pairs (llama.cpp's LlamaModel.permute)."""
    rows = t.shape[0]
    return t.reshape(n_heads, 2, rows // n_heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def unpermute_rows(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows = t.shape[0]
    return t.reshape(n_heads, rows // n_heads // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def qk_heads(spec, hf_name: str) -> int | None:
    if hf_name.endswith("self_attn.q_proj.weight"):
        return spec.num_attention_heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        return spec.num_key_value_heads
    return None
