"""MiniCPM3 (`MiniCPM3ForCausalLM`, model_type minicpm3): muP MiniCPM with multi-head latent
attention (low-rank q and kv; RoPE on a rope part of each head, whose key part is one vector
shared by all heads) and LongRoPE.

MLA has no Llama equivalent, so there is no Llama-format or INT4 export; GGUF arch `minicpm3`
is llama.cpp's own, which hard-codes MiniCPM3-4B's muP scalars (12 / 1.4 / 256).
"""

from __future__ import annotations

import torch

from ..spec import MlaDims, ModelSpec, get_key
from . import register, rope
from .base import GgufFields, common_config_fields
from .blocks import apply_rope, causal_softmax_attention, decoder_shapes, dense_mlp_names, linear, rms_norm, swiglu
from .minicpm import MiniCPMBase

NO_LLAMA = "MiniCPM3's MLA attention has no Llama equivalent"
# llama.cpp's minicpm3 graph multiplies by these constants instead of reading metadata.
LLAMA_CPP_MUP = (12.0, 1.4, 256.0)


def mla_shapes(spec: ModelSpec, p: str) -> dict[str, tuple[int, ...]]:
    m, h, heads = spec.mla, spec.hidden_size, spec.num_attention_heads
    return {
        p + "self_attn.q_a_proj.weight": (m.q_lora_rank, h),
        p + "self_attn.q_a_layernorm.weight": (m.q_lora_rank,),
        p + "self_attn.q_b_proj.weight": (heads * m.qk_head_dim, m.q_lora_rank),
        p + "self_attn.kv_a_proj_with_mqa.weight": (m.kv_lora_rank + m.qk_rope_head_dim, h),
        p + "self_attn.kv_a_layernorm.weight": (m.kv_lora_rank,),
        p + "self_attn.kv_b_proj.weight": (heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
        p + "self_attn.o_proj.weight": (h, heads * m.v_head_dim),
    }


def mla_attention(spec: ModelSpec, h: torch.Tensor, source, prefix: str, rope_tables, capture=None) -> torch.Tensor:
    cos, sin = rope_tables
    m, t, nh = spec.mla, h.shape[0], spec.num_attention_heads
    p = prefix + "self_attn."
    lin = lambda x, name: linear(x, source, p + name + ".weight", capture)  # noqa: E731
    norm = lambda x, name: rms_norm(x, source.read(p + name + ".weight"), spec.rms_norm_eps)  # noqa: E731
    q = lin(norm(lin(h, "q_a_proj"), "q_a_layernorm"), "q_b_proj")
    q = q.view(t, nh, m.qk_head_dim).transpose(0, 1)
    q_pass, q_rot = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
    kv_latent, k_rot = lin(h, "kv_a_proj_with_mqa").split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
    kv = lin(norm(kv_latent, "kv_a_layernorm"), "kv_b_proj")
    k_pass, v = kv.view(t, nh, m.qk_nope_head_dim + m.v_head_dim).transpose(0, 1).split(
        [m.qk_nope_head_dim, m.v_head_dim], dim=-1)
    q_rot, k_rot = apply_rope(q_rot, cos, sin), apply_rope(k_rot[None], cos, sin).expand(nh, t, -1)
    out = causal_softmax_attention(torch.cat((q_pass, q_rot), -1), torch.cat((k_pass, k_rot), -1), v,
                                   m.qk_head_dim ** -0.5)
    return lin(out, "o_proj")


@register
class MiniCPM3(MiniCPMBase):
    name = "minicpm3"
    title = "MiniCPM3 (MLA attention, muP)"
    examples = "MiniCPM3-4B"
    model_types = ("minicpm3",)
    gguf_archs = ("minicpm3",)

    def matches(self, cfg: dict) -> bool:
        return cfg.get("model_type") == "minicpm3" or "MiniCPM3ForCausalLM" in (cfg.get("architectures") or [])

    def parse(self, cfg: dict, where: str) -> ModelSpec:
        fields = common_config_fields(cfg, where)
        mla = MlaDims(**{k: get_key(cfg, k, int, where, positive=True) for k in
                         ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim")},
                      v_head_dim=get_key(cfg, "v_head_dim", int, where, default=fields["head_dim"], positive=True))
        if mla.qk_rope_head_dim % 2:
            from ..errors import ConvertError
            raise ConvertError(f"{where}: qk_rope_head_dim {mla.qk_rope_head_dim} must be even for RoPE")
        if fields["rope_scaling"] is not None and (fields["rope_scaling"].get("rope_type")
                                                   or fields["rope_scaling"].get("type")) == "longrope":
            rope.check_longrope(fields["rope_scaling"], mla.qk_rope_head_dim, cfg, where)
        return ModelSpec(family=self.name, mla=mla, **fields, **self.parse_mup(cfg, where))

    def refusal(self, spec: ModelSpec, command: str) -> str | None:
        if command != "to-gguf" and command != "verify":
            return NO_LLAMA
        if command == "to-gguf" and (spec.scale_emb, spec.scale_depth, spec.dim_model_base) != LLAMA_CPP_MUP:
            return ("llama.cpp's minicpm3 architecture assumes scale_emb 12, scale_depth 1.4 and dim_model_base 256; "
                    "this model differs")
        return super().refusal(spec, command)

    def support(self, command: str) -> str:
        return {
            "to-llama": f"refused: {NO_LLAMA}",
            "to-gguf": "yes: arch `minicpm3` as llama.cpp's converter writes it (refused if the muP scalars differ "
                       "from the 12 / 1.4 / 256 llama.cpp hard-codes)",
            "to-gguf --arch llama": f"refused: {NO_LLAMA}",
            "to-int4": "refused (same reason)",
        }.get(command, "yes")

    def expected_shapes(self, spec: ModelSpec):
        return decoder_shapes(spec, mla_shapes)

    def attention(self, spec, x, source, prefix, rope_tables, capture):
        return mla_attention(spec, x, source, prefix, rope_tables, capture)

    def mlp(self, spec, x, source, prefix, capture):
        return swiglu(x, source, dense_mlp_names(prefix), capture)

    def gguf_arch(self, spec: ModelSpec, requested: str | None) -> str:
        return "minicpm3"

    def gguf_rope_heads(self, spec: ModelSpec, hf_name: str) -> int | None:
        return None  # llama.cpp's minicpm3 reads MLA's projections unpermuted

    def gguf_attention_keys(self, writer, spec: ModelSpec) -> None:
        writer.add_q_lora_rank(spec.mla.q_lora_rank)
        writer.add_kv_lora_rank(spec.mla.kv_lora_rank)
        writer.add_key_length(spec.mla.qk_head_dim)
        writer.add_value_length(spec.mla.v_head_dim)

    def gguf_scale_keys(self, writer, spec: ModelSpec, arch: str) -> None:
        pass  # hard-coded in llama.cpp's minicpm3 graph (checked by refusal)

    def gguf_rope_scaling(self, fields: GgufFields) -> dict | None:
        # llama.cpp's converter writes MiniCPM3's factors without a scaling-type key
        if "rope_factors_long.weight" not in fields.tensor_names:
            return None
        return rope.longrope_from_gguf(fields, fields.tensor_data)

    def from_gguf(self, fields: GgufFields, common: dict) -> ModelSpec:
        get = fields.number
        rope_dim = int(get("rope.dimension_count"))
        heads = common["num_attention_heads"]
        mla = MlaDims(q_lora_rank=int(get("attention.q_lora_rank")), kv_lora_rank=int(get("attention.kv_lora_rank")),
                      qk_nope_head_dim=int(get("attention.key_length")) - rope_dim, qk_rope_head_dim=rope_dim,
                      v_head_dim=int(get("attention.value_length", common["hidden_size"] // heads)))
        common = {**common, "head_dim": common["hidden_size"] // heads}
        scale_emb, scale_depth, dim_model_base = LLAMA_CPP_MUP
        return ModelSpec(family=self.name, mla=mla, rope_scaling=self.gguf_rope_scaling(fields), scale_emb=scale_emb,
                         scale_depth=scale_depth, dim_model_base=dim_model_base, **common)
