"""The Llama architecture (`LlamaForCausalLM`, model_type llama): MiniCPM5 1B/2B, and every
Llama-format export this tool writes (muP folded in, so plain residuals and no logit divisor).

MiniCPM5 states `head_dim` (128, not hidden / heads) and has no muP keys: nothing to fold, and
MiniCPM's defaults (12 / 1.4 / 256) must not apply. to-llama is then a validated copy with our
metadata; GGUF is arch `llama` (with `attention.key_length/value_length` = head_dim); the rope
scalings our exports carry (LongRoPE, dynamic NTK) are read as the MiniCPM family reads them.
"""

from __future__ import annotations

from ..spec import ModelSpec, get_key
from . import register, rope
from .base import GgufFields, common_config_fields
from .blocks import decoder_shapes, dense_mlp_names, gqa_attention, swiglu
from .minicpm import MiniCPMBase, _is_longrope


@register
class Llama(MiniCPMBase):
    name = "llama"
    title = "Llama architecture (MiniCPM5; Llama-format exports)"
    examples = "MiniCPM5-1B, MiniCPM5-2B; the output of to-llama"
    model_types = ("llama",)
    gguf_archs = ("llama",)
    llama_format = True

    def matches(self, cfg: dict) -> bool:
        return cfg.get("model_type") == "llama"

    def parse(self, cfg: dict, where: str) -> ModelSpec:
        fields = common_config_fields(cfg, where, eps_default=1e-6 if _is_longrope(cfg) else 1e-5)
        if _is_longrope(cfg):
            rope.check_longrope(fields["rope_scaling"], fields["head_dim"], cfg, where)
        return ModelSpec(family=self.name, scale_emb=1.0, scale_depth=None, dim_model_base=None,
                         tie_word_embeddings=get_key(cfg, "tie_word_embeddings", bool, where, default=False),
                         **fields)

    def support(self, command: str) -> str:
        return {
            "to-llama": "yes: a validated copy with our metadata",
            "to-gguf": "yes: arch `llama` (`attention.key_length/value_length` = head_dim); MiniCPM5's byte-level "
                       "BPE `tokenizer.json` as a `gpt2` vocabulary with pre-tokenizer `minicpm5`",
            "to-gguf --arch llama": "yes (the same file)",
        }.get(command, "yes")

    def expected_shapes(self, spec: ModelSpec):
        return decoder_shapes(spec)

    def attention(self, spec, x, source, prefix, rope_tables, capture):
        return gqa_attention(spec, x, source, prefix, rope_tables, capture)

    def mlp(self, spec, x, source, prefix, capture):
        return swiglu(x, source, dense_mlp_names(prefix), capture)

    def gguf_arch(self, spec: ModelSpec, requested: str | None) -> str:
        return "llama"  # there are no scalars for arch minicpm to carry

    def gguf_matches(self, fields: GgufFields) -> bool:
        return not fields.number("expert_count", 0)

    def from_gguf(self, fields: GgufFields, common: dict) -> ModelSpec:
        return ModelSpec(family=self.name, rope_scaling=self.gguf_rope_scaling(fields), scale_depth=None,
                         dim_model_base=None, **common)
