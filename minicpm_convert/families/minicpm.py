"""MiniCPM 1/2/4/4.1, dense (`MiniCPMForCausalLM`, model_type minicpm): a Llama with three muP
scalars (facts §1) and one of three rope scalings (none, dynamic NTK, LongRoPE).

- embeddings times scale_emb; both residual branches times scale_depth / sqrt(L); the final
  hidden state divided by hidden / dim_model_base before a head tied to the (unscaled) embedding.
- Llama format folds the scalars into the weights (facts §3); GGUF arch `minicpm` keeps them as
  metadata, arch `llama` folds them as to-llama does.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from gguf import RopeScalingType

from ..names import hf_to_gguf
from ..spec import ModelSpec, get_key
from . import register, rope
from .base import Family, GgufFields, common_config_fields, llama_config_keys
from .blocks import decoder_shapes, dense_mlp_names, gqa_attention, swiglu

if TYPE_CHECKING:  # pragma: no cover
    from ..sources.checkpoint import Checkpoint
    from ..stream import TensorJob

ROPE_TYPES = (None, "dynamic", "longrope")


class MiniCPMBase(Family):
    """What every muP MiniCPM shares: the scalars, their folding, LongRoPE, the minicpm GGUF keys."""

    model_types = ("minicpm",)
    gguf_archs = ("minicpm",)

    def parse_mup(self, cfg: dict, where: str) -> dict:
        return dict(
            scale_emb=get_key(cfg, "scale_emb", float, where, default=1.0, positive=True),
            scale_depth=get_key(cfg, "scale_depth", float, where, default=1.0, positive=True),
            # Early MiniCPM4-8B configs omit dim_model_base: 256 is the released value, never 1.
            dim_model_base=get_key(cfg, "dim_model_base", float, where, default=256.0, positive=True),
            # This family ties the head to the embedding unless config says otherwise.
            tie_word_embeddings=get_key(cfg, "tie_word_embeddings", bool, where, default=True),
        )

    def facts(self, spec: ModelSpec) -> list[str]:
        if not spec.is_mup:
            return []
        return [f"muP: scale_emb {spec.scale_emb:g}, residual scale {spec.residual_scale:.6g} "
                f"(scale_depth {spec.scale_depth:g}/sqrt({spec.num_hidden_layers})), "
                f"logit divisor {spec.logit_scale:g} (hidden/dim_model_base)"]

    def rope_tables(self, spec: ModelSpec, positions: torch.Tensor):
        if spec.rope_type == "longrope":
            return rope.longrope(spec, positions)
        return rope.plain_rope(spec, positions)

    def refusal(self, spec: ModelSpec, command: str) -> str | None:
        if spec.hidden_act != "silu":
            return f"hidden_act '{spec.hidden_act}' is not supported (silu only)"
        if spec.rope_type not in ROPE_TYPES:
            return f"rope_scaling type {spec.rope_type!r} is not supported"
        if spec.rope_type == "longrope" and command.startswith("to-gguf") and rope.longrope_factors(spec, 1)[1] != 1.0:
            return ("max_position_embeddings > original_max_position_embeddings gives LongRoPE an attention "
                    "scale that llama.cpp does not apply")
        return None

    def warnings(self, spec: ModelSpec, command: str) -> list[str]:
        notes = []
        sparse = spec.raw.get("sparse_config")
        if isinstance(sparse, dict) and command != "verify":
            notes.append("uses dense attention; MiniCPM4's sparse attention (sparse_config) is not carried over, "
                         f"and MiniCPM4 itself attends densely below {sparse.get('dense_len', 'dense_len')} tokens")
        if spec.rope_type == "dynamic" and command.startswith("to-gguf"):
            notes.append("warning: llama.cpp has no dynamic NTK rope scaling; the file is exact up to "
                         f"{spec.max_position_embeddings} tokens (max_position_embeddings)")
        return notes

    # -- folding (facts §3), one implementation for to-llama, GGUF --arch llama and INT4 ------------
    def fold_factor(self, spec: ModelSpec, name: str) -> tuple[float | None, float | None]:
        """(multiplier, divisor) that folds the muP scalars into one tensor."""
        if not spec.is_mup:
            return None, None
        if name == "model.embed_tokens.weight":
            return spec.scale_emb, None
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            return spec.residual_scale, None
        if name == "lm_head.weight":
            return None, spec.logit_scale
        return None, None

    def export_name(self, spec: ModelSpec, name: str) -> str:
        """The Llama-format name of a source tensor."""
        return name

    def llama_jobs(self, ckpt: "Checkpoint") -> list["TensorJob"]:
        """Llama-format tensors: muP folded, head untied (a tied head is the *unscaled* embedding)."""
        from ..stream import TensorJob, reader

        spec = ckpt.spec
        jobs = []
        for name in ckpt.names():
            factor, divisor = self.fold_factor(spec, name)
            jobs.append(TensorJob(self.export_name(spec, name), ckpt.shape(name), ckpt.dtype(name),
                                  reader(ckpt, name, factor, divisor)))
        if "lm_head.weight" not in ckpt.names():
            emb = "model.embed_tokens.weight"
            _, divisor = self.fold_factor(spec, "lm_head.weight")
            jobs.append(TensorJob("lm_head.weight", ckpt.shape(emb), ckpt.dtype(emb), reader(ckpt, emb, None, divisor)))
        return jobs

    def llama_config(self, spec: ModelSpec, dtype: torch.dtype) -> dict:
        cfg = llama_config_keys(spec, dtype)
        if spec.rope_type == "longrope":
            # transformers' Llama reads LongRoPE as rope_type "longrope" with both factor lists.
            orig = rope.original_length(spec)
            cfg["rope_scaling"] = {"rope_type": "longrope", "short_factor": list(spec.rope_scaling["short_factor"]),
                                   "long_factor": list(spec.rope_scaling["long_factor"]),
                                   "original_max_position_embeddings": orig}
            cfg["original_max_position_embeddings"] = orig
        elif spec.rope_scaling is not None:
            cfg["rope_scaling"] = spec.rope_scaling
        return cfg

    # -- GGUF -------------------------------------------------------------------------------------
    def gguf_arch(self, spec: ModelSpec, requested: str | None) -> str:
        return requested or "minicpm"

    def gguf_rope_heads(self, spec: ModelSpec, hf_name: str) -> int | None:
        """Heads whose rows GGUF permutes to ggml's rope layout (q: query heads, k: key/value heads)."""
        if hf_name.endswith("self_attn.q_proj.weight"):
            return spec.num_attention_heads
        if hf_name.endswith("self_attn.k_proj.weight"):
            return spec.num_key_value_heads
        return None

    def gguf_tensor_jobs(self, ckpt: "Checkpoint", arch: str) -> list["TensorJob"]:
        """The tensors a GGUF of `arch` holds, in Hugging Face naming: as stored (arch minicpm,
        the scalars stay metadata) or folded (arch llama)."""
        from ..stream import source_stream

        return self.llama_jobs(ckpt) if arch == "llama" else source_stream(ckpt)

    def gguf_jobs(self, ckpt: "Checkpoint", arch: str) -> list[tuple[str, "TensorJob"]]:
        """(GGUF name, job), q/k rows marked for ggml's rope layout; LongRoPE's factors as two tensors."""
        spec = ckpt.spec
        named = [(hf_to_gguf(j.name), j.permuted(self.gguf_rope_heads(spec, j.name)))
                 for j in self.gguf_tensor_jobs(ckpt, arch)]
        if spec.rope_type == "longrope":
            named += rope.longrope_factor_jobs(spec)
        return named

    def gguf_rope_keys(self, writer, spec: ModelSpec) -> None:
        if spec.rope_type == "longrope":
            writer.add_rope_scaling_type(RopeScalingType.LONGROPE)
            writer.add_rope_scaling_orig_ctx_len(rope.original_length(spec))

    def gguf_scale_keys(self, writer, spec: ModelSpec, arch: str) -> None:
        if arch == "minicpm":  # all three always, as llama.cpp's converter writes them
            writer.add_embedding_scale(spec.scale_emb)
            writer.add_residual_scale(spec.residual_scale)
            writer.add_logit_scale(spec.logit_scale)

    def mup_from_gguf(self, fields: GgufFields, common: dict) -> dict:
        layers = common["num_hidden_layers"]
        return dict(scale_emb=float(fields.number("embedding_scale")),
                    scale_depth=float(fields.number("residual_scale")) * math.sqrt(layers),
                    dim_model_base=common["hidden_size"] / float(fields.number("logit_scale")))

    def gguf_rope_scaling(self, fields: GgufFields) -> dict | None:
        if fields.string("rope.scaling.type", None) != "longrope":
            return None
        return rope.longrope_from_gguf(fields, fields.tensor_data)


@register
class MiniCPM(MiniCPMBase):
    name = "minicpm"
    title = "MiniCPM 1/2/4/4.1 (dense, muP)"
    examples = "MiniCPM-2B sft/dpo, MiniCPM-1B, MiniCPM-2B-128k, MiniCPM4-0.5B/8B, MiniCPM4.1-8B"

    def matches(self, cfg: dict) -> bool:
        return cfg.get("model_type") == "minicpm" and not cfg.get("num_experts")

    def variant(self, spec: ModelSpec) -> str:
        return "minicpm-longrope" if spec.rope_type == "longrope" else "minicpm"

    def parse(self, cfg: dict, where: str) -> ModelSpec:
        longrope = _is_longrope(cfg)
        fields = common_config_fields(cfg, where, eps_default=1e-6 if longrope else 1e-5)
        if longrope:
            rope.check_longrope(fields["rope_scaling"], fields["head_dim"], cfg, where)
        return ModelSpec(family=self.name, **fields, **self.parse_mup(cfg, where))

    def support(self, command: str) -> str:
        return {
            "to-llama": "yes (dynamic NTK kept as `rope_scaling` for transformers; LongRoPE as `rope_type: longrope`)",
            "to-gguf": "yes (LongRoPE as `rope_factors_long/short`; refused when max/original length > 1, an "
                       "attention scale llama.cpp does not apply; dynamic NTK with a warning: exact up to "
                       "`max_position_embeddings`)",
        }.get(command, "yes")

    def expected_shapes(self, spec: ModelSpec):
        return decoder_shapes(spec)

    def attention(self, spec, x, source, prefix, rope_tables, capture):
        return gqa_attention(spec, x, source, prefix, rope_tables, capture)

    def mlp(self, spec, x, source, prefix, capture):
        return swiglu(x, source, dense_mlp_names(prefix), capture)

    def gguf_matches(self, fields: GgufFields) -> bool:
        return not fields.number("expert_count", 0)

    def from_gguf(self, fields: GgufFields, common: dict) -> ModelSpec:
        return ModelSpec(family=self.name, rope_scaling=self.gguf_rope_scaling(fields),
                         **common, **self.mup_from_gguf(fields, common))


def _is_longrope(cfg: dict) -> bool:
    scaling = cfg.get("rope_scaling")
    return isinstance(scaling, dict) and (scaling.get("rope_type") or scaling.get("type")) == "longrope"

