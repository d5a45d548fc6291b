"""MiniCPM-MoE-8x2B (model_type minicpm with `num_experts`): MiniCPM-2B's muP dense model whose
MLP is a mixture of SwiGLU experts (`mlp.experts.E.w1/w3/w2`: gate/up/down) behind a router
`mlp.gate`: softmax over all experts, keep the top k, renormalise (float32).

Llama format is Mixtral's (`block_sparse_moe.*`, w2 of every expert folded); GGUF stacks each
layer's experts of one kind into one 3-D tensor as llama.cpp's converter does for Mixtral.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..names import MIXTRAL_PREFIX, to_mixtral
from ..spec import ModelSpec, get_key
from . import register
from .base import GgufFields, common_config_fields
from .blocks import decoder_shapes, gqa_attention, gqa_shapes, swiglu
from .minicpm import MiniCPMBase

if TYPE_CHECKING:  # pragma: no cover
    from ..reference import Capture, WeightSource
    from ..sources.checkpoint import Checkpoint
    from ..stream import TensorJob


def route(h: torch.Tensor, router: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing in float32: softmax over all experts, keep the top k, renormalise.

    Returns (weights [tokens, k] summing to 1, expert ids [tokens, k]).
    """
    probs = torch.softmax((h @ router.T).float(), dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts


def moe_mlp(h: torch.Tensor, source: "WeightSource", moe: str, top_k: int,
            capture: "Capture | None" = None) -> torch.Tensor:
    """Sum over each token's top-k experts of weight x SwiGLU expert (`{moe}experts.E.w1/w3/w2`,
    gate/up/down); an expert's weights are read only when some token uses it, and `capture`
    sees only the tokens routed to it."""
    router = moe + "gate.weight"
    if capture is not None:
        capture(router, h)
    weights, experts = route(h, source.read(router), top_k)
    out = torch.zeros_like(h)
    for e in experts.unique().tolist():
        tok, slot = (experts == e).nonzero(as_tuple=True)
        names = tuple(f"{moe}experts.{e}.{w}.weight" for w in ("w1", "w3", "w2"))
        out.index_add_(0, tok, swiglu(h[tok], source, names, capture) * weights[tok, slot, None])
    return out


def moe_shapes(prefix: str):
    """The experts and the router of one layer (`prefix`: 'mlp.' or Mixtral's 'block_sparse_moe.')."""
    def shapes(spec: ModelSpec, p: str):
        h, inter, moe = spec.hidden_size, spec.intermediate_size, p + prefix
        out = {}
        for e in range(spec.num_experts):
            out[f"{moe}experts.{e}.w1.weight"] = (inter, h)
            out[f"{moe}experts.{e}.w2.weight"] = (h, inter)
            out[f"{moe}experts.{e}.w3.weight"] = (inter, h)
        out[moe + "gate.weight"] = (spec.num_experts, h)
        return out
    return shapes


def parse_experts(cfg: dict, where: str, key: str) -> dict:
    n_exp = get_key(cfg, key, int, where, default=0)
    top_k = get_key(cfg, "num_experts_per_tok", int, where, default=0)
    if n_exp < 0 or (n_exp and not 1 <= top_k <= n_exp):
        from ..errors import ConvertError
        raise ConvertError(f"{where}: num_experts_per_tok {top_k} must be between 1 and the number of "
                           f"experts ({n_exp})")
    return dict(num_experts=n_exp, num_experts_per_tok=top_k)


def mixtral_keys(spec: ModelSpec) -> dict:
    """config.json keys of the Mixtral layout: same routing (softmax, top-k, renormalised)."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": spec.num_experts,
        "num_experts_per_tok": spec.num_experts_per_tok,
        # Training-only; MiniCPM-MoE trained with a load-balancing loss weight of 0.01.
        "router_aux_loss_coef": spec.raw.get("router_aux_loss_coef", 0.01),
        "output_router_logits": False,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
    }


@register
class MiniCPMMoE(MiniCPMBase):
    name = "minicpm-moe"
    title = "MiniCPM-MoE (mixture of experts, muP)"
    examples = "MiniCPM-MoE-8x2B (8 experts, top-2)"
    moe_prefix = "mlp."

    def matches(self, cfg: dict) -> bool:
        return cfg.get("model_type") == "minicpm" and bool(cfg.get("num_experts"))

    def parse(self, cfg: dict, where: str) -> ModelSpec:
        return ModelSpec(family=self.name, **common_config_fields(cfg, where), **self.parse_mup(cfg, where),
                         **parse_experts(cfg, where, "num_experts"))

    def int4_mlp_pairs(self, spec: ModelSpec, p: str) -> list[tuple[str, str, str]]:
        """Every expert's w3 rows against its w2 columns (silu(w1 x) * w3 x is linear in w3), by
        their Mixtral names (the Llama-format model's)."""
        return [(x + "w2", x + "w3.weight", x + "w2.weight")
                for x in (f"{p}{MIXTRAL_PREFIX}experts.{e}." for e in range(spec.num_experts))]

    def int4_card_terms(self, spec: ModelSpec) -> tuple[str, str]:
        return ("attention projections and every expert's w1/w3/w2 (the router stays float16)",
                "the input columns of o_proj and of every expert's w2 were rescaled against the output rows of "
                "v_proj and of that expert's w3")

    def int4_ignore(self, spec: ModelSpec) -> tuple[str, ...]:
        # the router stays float16, as llm-compressor's Mixtral recipes leave it
        return super().int4_ignore(spec) + (f"re:.*{MIXTRAL_PREFIX}gate$",)

    def int4_refusal(self, spec: ModelSpec, format: str, method: str | None) -> str | None:
        # transformers 5 holds Mixtral's experts as fused 3-D tensors and builds them from
        # per-expert INT4 tensors only for compressed-tensors (CompressedTensorsDequantize); the
        # GPTQ and AWQ layouts have no such path there, and vLLM's INT4 MoE kernels need a GPU.
        if format != "compressed-tensors":
            return (f"--format {format}: MiniCPM-MoE's experts are exported to INT4 as compressed-tensors only "
                    "(transformers 5 loads per-expert INT4 experts from that layout alone); use --format "
                    "compressed-tensors")
        if method is not None and method.startswith("awq"):
            return (f"--method {method}: MiniCPM-MoE's post-attention norm also feeds the router, so AWQ's scales "
                    "cannot be folded into it; use --method gptq")
        return None

    def support(self, command: str) -> str:
        return {
            "to-llama": "yes: Mixtral layout (`MixtralForCausalLM`, w2 of every expert folded)",
            "to-gguf": "yes: stacked `ffn_{gate,up,down}_exps`, F32 router `ffn_gate_inp`, llama-quantize's "
                       "8-expert plan",
            "to-int4": "yes: compressed-tensors, per expert (GPTQ per expert on its routed tokens); router "
                       "float16",
            "verify": "yes (routing softmax → top-k → renormalise, float32)",
        }.get(command, "yes")

    def expected_shapes(self, spec: ModelSpec):
        return decoder_shapes(spec, gqa_shapes, moe_shapes(self.moe_prefix))

    def attention(self, spec, x, source, prefix, rope_tables, capture):
        return gqa_attention(spec, x, source, prefix, rope_tables, capture)

    def mlp(self, spec, x, source, prefix, capture):
        return moe_mlp(x, source, prefix + self.moe_prefix, spec.num_experts_per_tok, capture)

    def fold_factor(self, spec: ModelSpec, name: str):
        from ..names import expert_parts
        parts = expert_parts(name)
        if spec.is_mup and parts is not None and parts[2] == "w2":  # an expert's down projection feeds the residual
            return spec.residual_scale, None
        return super().fold_factor(spec, name)

    def export_name(self, spec: ModelSpec, name: str) -> str:
        return to_mixtral(name)

    def llama_architecture(self, spec: ModelSpec) -> str:
        return "MixtralForCausalLM"

    def llama_config(self, spec: ModelSpec, dtype: torch.dtype) -> dict:
        return super().llama_config(spec, dtype) | mixtral_keys(spec)

    def gguf_tensor_jobs(self, ckpt: "Checkpoint", arch: str) -> list["TensorJob"]:
        """Each layer's experts of one kind stacked into one [n_expert, rows, cols] job."""
        from ..formats.gguf.experts import stack_experts

        return stack_experts(super().gguf_tensor_jobs(ckpt, arch), ckpt.spec.num_experts)

    def gguf_matches(self, fields: GgufFields) -> bool:
        return bool(fields.number("expert_count", 0))

    def from_gguf(self, fields: GgufFields, common: dict) -> ModelSpec:
        return ModelSpec(family=self.name, rope_scaling=self.gguf_rope_scaling(fields), **common,
                         **self.mup_from_gguf(fields, common), num_experts=int(fields.number("expert_count")),
                         num_experts_per_tok=int(fields.number("expert_used_count")))
