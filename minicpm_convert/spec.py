"""config.json as a typed, validated spec of the model (the mlx-lm `ModelArgs` idea).

`ModelSpec` holds the hyper-parameters every command needs; which family a model is, and what
that family makes of its config, lives in `families/` (`spec_from_config` asks the registry).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConvertError


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
    """The hyper-parameters a conversion or a forward pass needs, validated by its family."""

    family: str  # the registry key of its family (families/), e.g. "minicpm"
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    head_dim: int = 0  # 0: hidden_size / num_attention_heads
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
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @property
    def variant(self) -> str:
        """The family's finer label for this model (e.g. 'minicpm-longrope')."""
        from .families import family_of
        return family_of(self).variant(self)

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
        """Whether the muP scalars are part of the model (MiniCPM), not 1 (Llama)."""
        return self.scale_depth is not None

    @property
    def rope_type(self) -> str | None:
        """'longrope', 'dynamic', ... (MiniCPM3 spells the key `type`, MiniCPM4 `rope_type`)."""
        if not self.rope_scaling:
            return None
        return self.rope_scaling.get("rope_type") or self.rope_scaling.get("type")


def get_key(cfg: dict, key: str, kind: type | tuple, where: str, default: Any = ..., positive: bool = False):
    """cfg[key] checked to be of `kind` (and positive, finite); one ConvertError line naming the key."""
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


def spec_from_config(cfg: Any, where: str = "config.json") -> ModelSpec:
    """Validate a parsed config.json and build the spec; every problem is one ConvertError line."""
    if not isinstance(cfg, dict):
        raise ConvertError(f"{where}: expected a JSON object at the top level")
    from .families import family_for_config
    return family_for_config(cfg, where).parse(cfg, where)


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
