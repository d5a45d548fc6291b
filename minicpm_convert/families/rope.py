"""RoPE tables (half-split "rotate_half" layout, float32) and the rope scalings MiniCPM uses.

- none / dynamic NTK (MiniCPM-2B-128k): plain tables; dynamic NTK changes nothing below
  max_position_embeddings, which verify enforces.
- LongRoPE (MiniCPM4, MiniCPM3): frequencies divided by per-dimension factors (long ones past
  the original length), cos/sin scaled by sqrt(1 + ln(max/orig) / ln(orig)).
"""

from __future__ import annotations

import math

import torch

from ..errors import ConvertError
from ..spec import ModelSpec


def inv_freq(spec: ModelSpec) -> torch.Tensor:
    hd = spec.rope_dim
    return 1.0 / (spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))


def tables(freqs: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def plain_rope(spec: ModelSpec, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return tables(positions.float()[:, None] * inv_freq(spec)[None, :])


def original_length(spec: ModelSpec) -> int:
    """LongRoPE's original context (in rope_scaling, or top-level in some configs)."""
    return spec.rope_scaling.get("original_max_position_embeddings") or spec.raw["original_max_position_embeddings"]


def longrope_factors(spec: ModelSpec, length: int) -> tuple[torch.Tensor, float]:
    """(1/ext_factors, cos/sin scale): long factors beyond the original length."""
    orig = original_length(spec)
    factors = spec.rope_scaling["long_factor"] if length > orig else spec.rope_scaling["short_factor"]
    ratio = spec.max_position_embeddings / orig
    scale = math.sqrt(1 + math.log(ratio) / math.log(orig)) if ratio > 1 else 1.0
    return 1.0 / torch.tensor(factors, dtype=torch.float32), scale


def longrope(spec: ModelSpec, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inv_ext, scale = longrope_factors(spec, len(positions))
    t = positions.float()[:, None] * inv_ext[None, :]
    return tables(t * inv_freq(spec)[None, :], scale)


def check_longrope(scaling: dict, rope_dim: int, cfg: dict, where: str) -> None:
    for key in ("short_factor", "long_factor"):
        factors = scaling.get(key)
        if (not isinstance(factors, list) or len(factors) != rope_dim // 2
                or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in factors)):
            raise ConvertError(f"{where}: rope_scaling.{key} must be a list of {rope_dim // 2} positive numbers")
    orig = scaling.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
    if not isinstance(orig, int) or isinstance(orig, bool) or orig <= 0:
        raise ConvertError(f"{where}: rope_scaling.original_max_position_embeddings must be a positive integer")


def longrope_factor_jobs(spec: ModelSpec) -> list:
    """LongRoPE's factor lists as the two f32 GGUF tensors llama.cpp reads (as its converter writes them)."""
    from ..stream import TensorJob

    jobs = []
    for which in ("long", "short"):
        values = torch.tensor(spec.rope_scaling[f"{which}_factor"], dtype=torch.float32)
        jobs.append((f"rope_factors_{which}.weight",
                     TensorJob(f"rope_factors_{which}", tuple(values.shape), torch.float32,
                               lambda start, stop, v=values: v[start:stop])))
    return jobs


def longrope_from_gguf(fields, tensor_data) -> dict:
    """rope_scaling of a GGUF file carrying rope_factors_long/short (llama.cpp's LongRoPE)."""
    factors = {name: tensor_data(name) for name in ("rope_factors_long.weight", "rope_factors_short.weight")}
    if any(v is None for v in factors.values()):
        raise ConvertError(f"{fields.path}: LongRoPE file without rope_factors_long/short tensors")
    return {"rope_type": "longrope", "long_factor": factors["rope_factors_long.weight"],
            "short_factor": factors["rope_factors_short.weight"],
            "original_max_position_embeddings": int(fields.number("rope.scaling.original_context_length",
                                                                  fields.number("context_length")))}


def stated_rope(spec: ModelSpec) -> dict | None:
    """The rope scaling as every format states it (GGUF has no dynamic NTK: none)."""
    if spec.rope_type != "longrope":
        return None
    return {"type": "longrope", "long_factor": list(spec.rope_scaling["long_factor"]),
            "short_factor": list(spec.rope_scaling["short_factor"]), "original": int(original_length(spec))}
