"""config.json as a typed, validated spec of the model (the mlx-lm `ModelArgs` idea)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConvertError

# Variants we know by name; `detect_variant` maps a config onto one of these.
VARIANTS = {
    "minicpm": "MiniCPM 1/2 dense (muP)",
    "minicpm-longrope": "MiniCPM4 dense with LongRoPE",
    "minicpm-moe": "MiniCPM-MoE (mixture of experts)",
    "minicpm-s": "MiniCPM-S (FATReLU)",
    "minicpm3": "MiniCPM3 (MLA attention)",
    "llama": "Llama (muP folded)",
}


@dataclass(frozen=True)
class MlaDims:
    """MiniCPM3's attention: low-rank q and kv, each head split into a rope part and a plain part."""

    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelSpec:
    """The hyper-parameters a conversion or a forward pass needs, validated."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    scale_emb: float = 1.0
    scale_depth: float | None = None  # None: plain residuals (Llama)
    dim_model_base: float | None = None  # None: no logit divisor (Llama)
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    rope_scaling: dict | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    mla: "MlaDims | None" = None  # MiniCPM3's multi-head latent attention
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    torch_dtype: str | None = None
    variant: str = "minicpm"
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        """Dimensions RoPE rotates per head: all of them, or MLA's rope part."""
        return self.mla.qk_rope_head_dim if self.mla else self.head_dim

    @property
    def residual_scale(self) -> float:
        """Multiplier of both residual branches: scale_depth / sqrt(L) (1 for Llama)."""
        if self.scale_depth is None:
            return 1.0
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_scale(self) -> float:
        """Divisor of the final hidden state before lm_head: hidden / dim_model_base (1 for Llama)."""
        if self.dim_model_base is None:
            return 1.0
        return self.hidden_size / self.dim_model_base

    @property
    def is_mup(self) -> bool:
        return self.model_type in ("minicpm", "minicpm3")

    @property
    def rope_type(self) -> str | None:
        """'longrope', 'dynamic', ... (MiniCPM3 spells the key `type`, MiniCPM4 `rope_type`)."""
        if not self.rope_scaling:
            return None
        return self.rope_scaling.get("rope_type") or self.rope_scaling.get("type")


def _get(cfg: dict, key: str, kind: type | tuple, where: str, default: Any = ..., positive: bool = False):
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise ConvertError(f"{where}: missing key '{key}'")
        return default
    value = cfg[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # JSON has no int/float distinction for floats written as 12 or 12.0; bool is not a number here.
    if isinstance(value, bool) and bool not in kinds:
        raise ConvertError(f"{where}: key '{key}' must be {_kind_name(kinds)}, got {value!r}")
    if float in kinds and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kinds):
        raise ConvertError(f"{where}: key '{key}' must be {_kind_name(kinds)}, got {value!r}")
    if positive and not value > 0:
        raise ConvertError(f"{where}: key '{key}' must be positive, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConvertError(f"{where}: key '{key}' must be finite, got {value!r}")
    return value


def _kind_name(kinds: tuple) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", dict: "an object",
             str: "a string", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def detect_variant(cfg: dict, where: str = "config.json") -> str:
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type == "minicpm3" or "MiniCPM3ForCausalLM" in archs:
        return "minicpm3"
    if model_type in ("llama", "mixtral"):  # mixtral: MiniCPM-MoE's Llama-format (Mixtral) export
        return "llama"
    if model_type == "minicpm":
        if cfg.get("num_experts"):
            return "minicpm-moe"
        if cfg.get("hidden_act") == "fatrelu":
            return "minicpm-s"
        rope = cfg.get("rope_scaling") or {}
        if isinstance(rope, dict) and (rope.get("rope_type") or rope.get("type")) == "longrope":
            return "minicpm-longrope"
        return "minicpm"
    raise ConvertError(
        f"{where}: unknown model_type {model_type!r} (supported: 'minicpm', 'llama', 'mixtral')"
    )


def spec_from_config(cfg: Any, where: str = "config.json") -> ModelSpec:
    """Validate a parsed config.json and build the spec; every problem is one ConvertError line."""
    if not isinstance(cfg, dict):
        raise ConvertError(f"{where}: expected a JSON object at the top level")
    variant = detect_variant(cfg, where)
    model_type = "llama" if variant == "llama" else ("minicpm3" if variant == "minicpm3" else "minicpm")

    hidden = _get(cfg, "hidden_size", int, where, positive=True)
    layers = _get(cfg, "num_hidden_layers", int, where, positive=True)
    heads = _get(cfg, "num_attention_heads", int, where, positive=True)
    kv_heads = _get(cfg, "num_key_value_heads", int, where, default=heads, positive=True)
    inter = _get(cfg, "intermediate_size", int, where, positive=True)
    vocab = _get(cfg, "vocab_size", int, where, positive=True)
    if hidden % heads:
        raise ConvertError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    if heads % kv_heads:
        raise ConvertError(
            f"{where}: num_attention_heads {heads} is not divisible by num_key_value_heads {kv_heads}")
    if (hidden // heads) % 2:
        raise ConvertError(f"{where}: head dimension {hidden // heads} must be even for RoPE")

    mla = None
    if variant == "minicpm3":
        mla = MlaDims(**{k: _get(cfg, k, int, where, positive=True) for k in
                         ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim")},
                      v_head_dim=_get(cfg, "v_head_dim", int, where, default=hidden // heads, positive=True))
        if mla.qk_rope_head_dim % 2:
            raise ConvertError(f"{where}: qk_rope_head_dim {mla.qk_rope_head_dim} must be even for RoPE")
    rope_scaling = _get(cfg, "rope_scaling", dict, where, default=None)
    if rope_scaling is not None and (rope_scaling.get("rope_type") or rope_scaling.get("type")) == "longrope":
        _check_longrope(rope_scaling, mla.qk_rope_head_dim if mla else hidden // heads, cfg, where)
    common = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=inter,
        vocab_size=vocab,
        rms_norm_eps=_get(cfg, "rms_norm_eps", float, where, default=1e-6 if variant == "minicpm-longrope" else 1e-5,
                          positive=True),
        rope_theta=_get(cfg, "rope_theta", float, where, default=10000.0, positive=True),
        max_position_embeddings=_get(cfg, "max_position_embeddings", int, where, default=2048, positive=True),
        hidden_act=_get(cfg, "hidden_act", str, where, default="silu"),
        rope_scaling=rope_scaling,
        num_experts=_get(cfg, "num_local_experts" if cfg.get("model_type") == "mixtral" else "num_experts",
                         int, where, default=0),
        num_experts_per_tok=_get(cfg, "num_experts_per_tok", int, where, default=0),
        bos_token_id=_get(cfg, "bos_token_id", int, where, default=None),
        eos_token_id=_get(cfg, "eos_token_id", (int, list), where, default=None),
        torch_dtype=_get(cfg, "torch_dtype", str, where, default=None),
        variant=variant,
        mla=mla,
        raw=cfg,
    )
    n_exp, top_k = common["num_experts"], common["num_experts_per_tok"]
    if n_exp < 0 or (n_exp and not 1 <= top_k <= n_exp):
        raise ConvertError(f"{where}: num_experts_per_tok {top_k} must be between 1 and the number of "
                           f"experts ({n_exp})")
    if model_type == "llama":
        return ModelSpec(model_type="llama",
                         tie_word_embeddings=_get(cfg, "tie_word_embeddings", bool, where, default=False),
                         **common)
    return ModelSpec(
        model_type=model_type,
        scale_emb=_get(cfg, "scale_emb", float, where, default=1.0, positive=True),
        scale_depth=_get(cfg, "scale_depth", float, where, default=1.0, positive=True),
        # Early MiniCPM4-8B configs omit dim_model_base: 256 is the released value, never 1.
        dim_model_base=_get(cfg, "dim_model_base", float, where, default=256.0, positive=True),
        # This family ties the head to the embedding unless config says otherwise.
        tie_word_embeddings=_get(cfg, "tie_word_embeddings", bool, where, default=True),
        **common,
    )


def _check_longrope(scaling: dict, head_dim: int, cfg: dict, where: str) -> None:
    for key in ("short_factor", "long_factor"):
        factors = scaling.get(key)
        if (not isinstance(factors, list) or len(factors) != head_dim // 2
                or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in factors)):
            raise ConvertError(f"{where}: rope_scaling.{key} must be a list of {head_dim // 2} positive numbers")
    orig = scaling.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
    if not isinstance(orig, int) or isinstance(orig, bool) or orig <= 0:
        raise ConvertError(f"{where}: rope_scaling.original_max_position_embeddings must be a positive integer")


def load_config(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConvertError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvertError(f"{path}: cannot read ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConvertError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
