"""What every model family provides (the llama.cpp `conversion/` and mlx-lm `models/` idea).

A family is recognised from config.json, parses it into a `ModelSpec`, lists the tensors it
expects, runs its blocks in the reference forward pass, and says how each export represents
it (or why it cannot). Code outside `families/` asks the spec's family, never which family it is.

Commands a family may support, as the support matrix names them:
    to-llama, to-gguf (its own GGUF architecture), to-gguf --arch llama, to-int4, verify
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..errors import ConvertError
from ..spec import ModelSpec, get_key

if TYPE_CHECKING:  # pragma: no cover
    from gguf import GGUFWriter

    from ..reference import Capture, WeightSource
    from ..sources.checkpoint import Checkpoint
    from ..stream import TensorJob

COMMANDS = ("to-llama", "to-gguf", "to-gguf --arch llama", "to-int4", "verify")


class GgufFields:
    """Typed access to a GGUF file's metadata for `Family.from_gguf` (errors name the key)."""

    def __init__(self, path, arch: str, field: Callable[[str, Any], Any], tensor_names: set[str],
                 tensor_data: Callable[[str], list[float]]):
        self.path, self.arch, self._field = path, arch, field
        self.tensor_names, self.tensor_data = tensor_names, tensor_data

    def number(self, key: str, default: Any = ...):
        full = f"{self.arch}.{key}"
        value = self._field(full, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConvertError(f"{self.path}: metadata key '{full}' is not a number")
        return value

    def string(self, key: str, default: Any = ...):
        full = f"{self.arch}.{key}"
        value = self._field(full, default)
        if value is not default and not isinstance(value, str):
            raise ConvertError(f"{self.path}: metadata key '{full}' is not a string")
        return value


class Family:
    """One model family. Subclasses set the class attributes and override what differs."""

    name: str = ""            # registry key, e.g. "minicpm"
    title: str = ""           # for people: "MiniCPM 1/2/4/4.1 (dense, muP)"
    examples: str = ""        # released checkpoints it covers
    model_types: tuple[str, ...] = ()  # config.json model_type values it answers to (for messages)
    gguf_archs: tuple[str, ...] = ()  # GGUF architectures this family reads back (verify, inspect)
    refused: str | None = None  # a family no command converts, and why
    llama_format: bool = False  # a layout exports are written in (what verify reads as an export)

    # -- recognising and parsing ----------------------------------------------------------------
    def matches(self, cfg: dict) -> bool:
        raise NotImplementedError

    def parse(self, cfg: dict, where: str) -> ModelSpec:
        raise NotImplementedError

    def variant(self, spec: ModelSpec) -> str:
        """A finer label than the family, e.g. the rope scaling ('minicpm-longrope')."""
        return self.name

    # -- what each command does with it ---------------------------------------------------------
    def refusal(self, spec: ModelSpec, command: str) -> str | None:
        """Why `command` (one of COMMANDS) cannot represent this model exactly, or None."""
        return self.refused

    def int4_mlp_pairs(self, spec: ModelSpec, p: str) -> list[tuple[str, str, str]]:
        """(key, rows, cols) of the INT4 rescaling pairs of block `p`'s MLP in the Llama-format
        model (formats/hf/int4_rescale.py): up_proj's rows against down_proj's columns."""
        return [(p + "mlp.down_proj", p + "mlp.up_proj.weight", p + "mlp.down_proj.weight")]

    def int4_card_terms(self, spec: ModelSpec) -> tuple[str, str]:
        """How an INT4 export's card names (what is quantized, what the rescaling did)."""
        return ("seven projections per layer",
                "o_proj/down_proj input columns were rescaled against v_proj/up_proj output rows")

    def int4_ignore(self, spec: ModelSpec) -> tuple[str, ...]:
        """The Linear modules an INT4 export leaves unquantized (compressed-tensors' `ignore`)."""
        return ("lm_head",)

    def int4_refusal(self, spec: ModelSpec, format: str, method: str | None) -> str | None:
        """Why to-int4 with this --format and --method (None: data-free) cannot serve this model, or None."""
        return None

    def warnings(self, spec: ModelSpec, command: str) -> list[str]:
        """What an export keeps differently from the original, said before the work starts."""
        return []

    def facts(self, spec: ModelSpec) -> list[str]:
        """Family-specific lines for `inspect` (the muP scalars, ...)."""
        return []

    def support(self, command: str) -> str:
        """The support matrix cell for `command`: 'yes', 'yes: ...' or 'refused: ...'."""
        return "yes"

    # -- tensors --------------------------------------------------------------------------------
    def expected_shapes(self, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    # -- the reference forward pass -------------------------------------------------------------
    def rope_tables(self, spec: ModelSpec, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from .rope import plain_rope
        return plain_rope(spec, positions)

    def attention(self, spec: ModelSpec, x: torch.Tensor, source: "WeightSource", prefix: str, rope,
                  capture: "Capture | None") -> torch.Tensor:
        raise NotImplementedError

    def mlp(self, spec: ModelSpec, x: torch.Tensor, source: "WeightSource", prefix: str,
            capture: "Capture | None") -> torch.Tensor:
        raise NotImplementedError

    # -- Llama-format export (to-llama, to-int4, GGUF --arch llama) ------------------------------
    def llama_jobs(self, ckpt: "Checkpoint") -> list["TensorJob"]:
        """The Llama-format tensors: what a plain Llama forward pass needs to give our logits."""
        raise NotImplementedError

    def llama_config(self, spec: ModelSpec, dtype: torch.dtype) -> dict:
        raise NotImplementedError

    def llama_architecture(self, spec: ModelSpec) -> str:
        return "LlamaForCausalLM"

    def export_spec(self, spec: ModelSpec, target: str) -> ModelSpec:
        """The spec an export must state: 'llama' and 'gguf-llama' hold the Llama-format model
        (muP folded), a GGUF of the family's own architecture the model as it is."""
        if target in ("llama", "gguf-llama"):
            from . import family_for_config
            cfg = self.llama_config(spec, torch.float32)
            return family_for_config(cfg).parse(cfg, "the Llama-format config")
        return spec

    # -- GGUF --------------------------------------------------------------------------------------
    def gguf_arch(self, spec: ModelSpec, requested: str | None) -> str:
        """The GGUF architecture written for `--arch requested` (None: the family's own)."""
        return requested or "llama"

    def gguf_jobs(self, ckpt: "Checkpoint", arch: str) -> list[tuple[str, "TensorJob"]]:
        """(GGUF name, job) of every tensor, rows in the file's layout, in any order."""
        raise NotImplementedError

    def gguf_rope_heads(self, spec: ModelSpec, hf_name: str) -> int | None:
        """Heads whose rows GGUF permutes to ggml's rope layout, for a tensor (None: not permuted)."""
        return None

    def gguf_metadata(self, writer: "GGUFWriter", spec: ModelSpec, arch: str) -> None:
        """Every `{arch}.*` key, in the order llama.cpp's converter writes them; families fill in
        the hooks below."""
        writer.add_block_count(spec.num_hidden_layers)
        writer.add_context_length(spec.max_position_embeddings)
        writer.add_embedding_length(spec.hidden_size)
        writer.add_feed_forward_length(spec.intermediate_size)
        writer.add_head_count(spec.num_attention_heads)
        writer.add_head_count_kv(spec.num_key_value_heads)
        writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
        writer.add_rope_freq_base(spec.rope_theta)
        writer.add_rope_dimension_count(spec.rope_dim)
        self.gguf_attention_keys(writer, spec)
        self.gguf_rope_keys(writer, spec)
        writer.add_vocab_size(spec.vocab_size)
        self.gguf_expert_keys(writer, spec)
        self.gguf_scale_keys(writer, spec, arch)

    def gguf_attention_keys(self, writer: "GGUFWriter", spec: ModelSpec) -> None:
        # As llama.cpp's converter: whenever config.json spells out head_dim (MiniCPM5: 128, not
        # hidden / heads), so that llama.cpp does not derive it.
        if "head_dim" in spec.raw or spec.head_dim * spec.num_attention_heads != spec.hidden_size:
            writer.add_key_length(spec.head_dim)
            writer.add_value_length(spec.head_dim)

    def gguf_rope_keys(self, writer: "GGUFWriter", spec: ModelSpec) -> None:
        pass

    def gguf_expert_keys(self, writer: "GGUFWriter", spec: ModelSpec) -> None:
        if spec.num_experts:
            writer.add_expert_count(spec.num_experts)
            writer.add_expert_used_count(spec.num_experts_per_tok)

    def gguf_scale_keys(self, writer: "GGUFWriter", spec: ModelSpec, arch: str) -> None:
        pass

    def gguf_matches(self, fields: GgufFields) -> bool:
        """Among the families reading this GGUF architecture, whether this one wrote the file."""
        return True

    def from_gguf(self, fields: GgufFields, common: dict) -> ModelSpec:
        """The spec of a GGUF file of one of `gguf_archs`; `common` holds the Llama keys."""
        raise NotImplementedError


def common_gguf_fields(fields: GgufFields, vocab: int, tied: bool) -> dict:
    """The keys every Llama-like GGUF architecture has, as ModelSpec fields."""
    get = fields.number
    heads = int(get("attention.head_count"))
    for key in ("embedding_length", "block_count", "feed_forward_length", "attention.head_count"):
        if not get(key) > 0:
            raise ConvertError(f"{fields.path}: metadata key '{fields.arch}.{key}' must be positive, got {get(key)}")
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", 0)) or None
    if head_dim is None and hidden % heads:
        raise ConvertError(f"{fields.path}: metadata '{fields.arch}.embedding_length' {hidden} is not "
                           f"divisible by '{fields.arch}.attention.head_count' {heads}")
    return dict(
        hidden_size=hidden, num_hidden_layers=int(get("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        intermediate_size=int(get("feed_forward_length")), vocab_size=vocab,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")), rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length")), tie_word_embeddings=tied,
        head_dim=head_dim or hidden // heads,
    )


def llama_config_keys(spec: ModelSpec, dtype: torch.dtype) -> dict:
    """config.json of a Llama-format checkpoint of `spec`: no muP keys, no auto_map, untied."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "hidden_act": spec.hidden_act,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def common_config_fields(cfg: dict, where: str, *, eps_default: float = 1e-5) -> dict:
    """The Llama-like keys every family's config.json has, validated, as ModelSpec fields."""
    hidden = get_key(cfg, "hidden_size", int, where, positive=True)
    layers = get_key(cfg, "num_hidden_layers", int, where, positive=True)
    heads = get_key(cfg, "num_attention_heads", int, where, positive=True)
    kv_heads = get_key(cfg, "num_key_value_heads", int, where, default=heads, positive=True)
    head_dim = get_key(cfg, "head_dim", int, where, default=None, positive=True)
    if head_dim is None:
        if hidden % heads:
            raise ConvertError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        head_dim = hidden // heads
    if heads % kv_heads:
        raise ConvertError(f"{where}: num_attention_heads {heads} is not divisible by num_key_value_heads {kv_heads}")
    if head_dim % 2:
        raise ConvertError(f"{where}: head dimension {head_dim} must be even for RoPE")
    return dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=get_key(cfg, "intermediate_size", int, where, positive=True),
        vocab_size=get_key(cfg, "vocab_size", int, where, positive=True),
        rms_norm_eps=get_key(cfg, "rms_norm_eps", float, where, default=eps_default, positive=True),
        rope_theta=get_key(cfg, "rope_theta", float, where, default=10000.0, positive=True),
        max_position_embeddings=get_key(cfg, "max_position_embeddings", int, where, default=2048, positive=True),
        hidden_act=get_key(cfg, "hidden_act", str, where, default="silu"),
        rope_scaling=get_key(cfg, "rope_scaling", dict, where, default=None),
        bos_token_id=get_key(cfg, "bos_token_id", int, where, default=None),
        eos_token_id=get_key(cfg, "eos_token_id", (int, list), where, default=None),
        torch_dtype=get_key(cfg, "torch_dtype", str, where, default=None),
        raw=cfg,
    )


def residual_scale(scale_depth: float | None, layers: int) -> float:
    return 1.0 if scale_depth is None else scale_depth / math.sqrt(layers)
