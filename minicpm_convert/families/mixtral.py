"""The Mixtral layout (`MixtralForCausalLM`, model_type mixtral): what to-llama writes for
MiniCPM-MoE (`block_sparse_moe.*`, muP folded). verify reads it; the conversions start from
the MiniCPM-MoE original, which has everything this layout has."""

from __future__ import annotations

from ..spec import ModelSpec, get_key
from . import register
from .base import GgufFields, common_config_fields
from .minicpm_moe import MiniCPMMoE, parse_experts

CONVERT_THE_ORIGINAL = "this is a Llama-format (Mixtral) export; convert the MiniCPM-MoE original instead"


@register
class Mixtral(MiniCPMMoE):
    name = "mixtral"
    title = "Mixtral layout (MiniCPM-MoE's Llama-format export)"
    examples = "the output of to-llama on MiniCPM-MoE"
    model_types = ("mixtral",)
    gguf_archs = ("llama",)
    llama_format = True
    moe_prefix = "block_sparse_moe."

    def matches(self, cfg: dict) -> bool:
        return cfg.get("model_type") == "mixtral"

    def parse(self, cfg: dict, where: str) -> ModelSpec:
        return ModelSpec(family=self.name, scale_emb=1.0, scale_depth=None, dim_model_base=None,
                         tie_word_embeddings=get_key(cfg, "tie_word_embeddings", bool, where, default=False),
                         **common_config_fields(cfg, where), **parse_experts(cfg, where, "num_local_experts"))

    def refusal(self, spec: ModelSpec, command: str) -> str | None:
        return None if command == "verify" else CONVERT_THE_ORIGINAL

    def support(self, command: str) -> str:
        return "yes" if command == "verify" else "refused: convert the MiniCPM-MoE original"

    def gguf_arch(self, spec: ModelSpec, requested: str | None) -> str:
        return "llama"

    def from_gguf(self, fields: GgufFields, common: dict) -> ModelSpec:
        return ModelSpec(family=self.name, rope_scaling=self.gguf_rope_scaling(fields), scale_depth=None,
                         dim_model_base=None, **common, num_experts=int(fields.number("expert_count")),
                         num_experts_per_tok=int(fields.number("expert_used_count")))
