"""A GGUF file as a `WeightSource`: dequantized, un-permuted, in Hugging Face naming."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader

from ..errors import ConvertError
from ..names import expert_parts, gguf_to_hf, stacked_name
from ..formats.gguf.plan import FILE_TYPES
from ..quants import dequantize
from ..spec import MlaDims, ModelSpec

# general.file_type -> our name of it (q4_K_M, iq3_xxs, ...): every type to-gguf writes
_FILE_TYPE_NAMES = {ft.ftype: name for name, ft in FILE_TYPES.items()}


class GgufSource:
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.reader = GGUFReader(self.path)
        except Exception as exc:  # gguf-py fails with numpy/struct errors on damaged files
            raise _unreadable(self.path, exc) from None
        self.arch = self._str("general.architecture")
        if self.arch not in ("minicpm", "llama", "minicpm3"):
            raise ConvertError(f"{self.path}: architecture '{self.arch}' is not one verify understands "
                               "(minicpm, llama, minicpm3)")
        self.version = int(self._field("GGUF.version"))
        self.tensors = self.reader.tensors
        self._by_hf: dict[str, object] = {}
        for t in self.tensors:
            try:
                self._by_hf[gguf_to_hf(t.name)] = t
            except KeyError:
                if not t.name.startswith("rope_factors"):
                    raise ConvertError(f"{self.path}: unexpected tensor '{t.name}'") from None
        ftype = int(self._field("general.file_type", default=-1))
        self.file_type_name = _FILE_TYPE_NAMES.get(ftype, f"ftype{ftype}")
        self.spec = self._spec()
        self._check_shapes()

    # -- metadata ----------------------------------------------------------------------------
    def _field(self, key: str, default=...):
        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise ConvertError(f"{self.path}: missing metadata key '{key}'")
            return default
        return field.contents()

    def _number(self, key: str, default=...):
        value = self._field(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConvertError(f"{self.path}: metadata key '{key}' is not a number")
        return value

    def _str(self, key: str) -> str:
        value = self._field(key)
        if not isinstance(value, str):
            raise ConvertError(f"{self.path}: metadata key '{key}' is not a string")
        return value

    def _spec(self) -> ModelSpec:
        a = self.arch
        get = lambda k, d=...: self._number(f"{a}.{k}", d)  # noqa: E731
        heads = int(get("attention.head_count"))
        for key in ("embedding_length", "block_count", "feed_forward_length", "attention.head_count"):
            if not get(key) > 0:
                raise ConvertError(f"{self.path}: metadata key '{a}.{key}' must be positive, got {get(key)}")
        if get("embedding_length") % heads:
            raise ConvertError(f"{self.path}: metadata '{a}.embedding_length' {get('embedding_length')} is not "
                               f"divisible by '{a}.attention.head_count' {heads}")
        tokens = self._field("tokenizer.ggml.tokens", default=None)
        vocab = int(get("vocab_size", len(tokens) if tokens is not None else 0))
        common = dict(
            hidden_size=int(get("embedding_length")), num_hidden_layers=int(get("block_count")),
            num_attention_heads=heads, num_key_value_heads=int(get("attention.head_count_kv", heads)),
            intermediate_size=int(get("feed_forward_length")), vocab_size=vocab,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")), rope_theta=float(get("rope.freq_base", 10000.0)),
            max_position_embeddings=int(get("context_length")),
            tie_word_embeddings="lm_head.weight" not in self._by_hf,
            rope_scaling=self._rope_scaling(get),
            num_experts=int(get("expert_count", 0)), num_experts_per_tok=int(get("expert_used_count", 0)),
        )
        if a == "minicpm3":  # llama.cpp's minicpm3 graph hard-codes MiniCPM3-4B's muP scalars
            rope = int(get("rope.dimension_count"))
            mla = MlaDims(q_lora_rank=int(get("attention.q_lora_rank")), kv_lora_rank=int(get("attention.kv_lora_rank")),
                          qk_nope_head_dim=int(get("attention.key_length")) - rope, qk_rope_head_dim=rope,
                          v_head_dim=int(get("attention.value_length", common["hidden_size"] // heads)))
            return ModelSpec(model_type="minicpm3", variant="minicpm3", scale_emb=12.0, scale_depth=1.4,
                             dim_model_base=256.0, mla=mla, **common)
        if a == "minicpm":
            layers = common["num_hidden_layers"]
            variant = "minicpm-moe" if common["num_experts"] else "minicpm"
            return ModelSpec(model_type="minicpm", variant=variant, scale_emb=float(get("embedding_scale")),
                             scale_depth=float(get("residual_scale")) * layers ** 0.5,
                             dim_model_base=common["hidden_size"] / float(get("logit_scale")), **common)
        return ModelSpec(model_type="llama", variant="llama", **common)

    def _rope_scaling(self, get) -> dict | None:
        has_factors = any(t.name == "rope_factors_long.weight" for t in self.tensors)
        if self._field(f"{self.arch}.rope.scaling.type", None) != "longrope" and not (
                self.arch == "minicpm3" and has_factors):  # llama.cpp's converter writes MiniCPM3's factors only
            return None
        factors = {t.name: np.array(t.data, dtype=np.float32).tolist() for t in self.tensors
                   if t.name in ("rope_factors_long.weight", "rope_factors_short.weight")}
        if len(factors) != 2:
            raise ConvertError(f"{self.path}: LongRoPE file without rope_factors_long/short tensors")
        return {"rope_type": "longrope", "long_factor": factors["rope_factors_long.weight"],
                "short_factor": factors["rope_factors_short.weight"],
                "original_max_position_embeddings": int(get("rope.scaling.original_context_length",
                                                             get("context_length")))}

    def _check_shapes(self) -> None:
        from ..names import expected_shapes, layer_index
        blocks = max((layer_index(t.name) for t in self.tensors if layer_index(t.name) is not None), default=-1) + 1
        if self.spec.num_hidden_layers > blocks:  # before listing a (perhaps huge) expected set
            raise ConvertError(f"{self.path}: missing tensor 'blk.{blocks}.attn_norm.weight' (metadata block_count "
                               f"is {self.spec.num_hidden_layers}, the file holds {blocks} blocks)")
        expected = expected_shapes(self.spec)
        for name, shape in expected.items():
            if not self.has(name):
                raise ConvertError(f"{self.path}: missing tensor '{_gguf_name(name)}'")
            if self.shape(name) != shape:
                raise ConvertError(f"{self.path}: tensor '{_gguf_name(name)}' has shape {list(self.shape(name))}, "
                                   f"the metadata implies {list(shape)}")

    def summary_fields(self) -> list[tuple[str, object]]:
        skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.chat_template")
        out = []
        for key, field in self.reader.fields.items():
            if key.startswith("GGUF.") or key in skip:
                continue
            value = field.contents()
            out.append((key, value))
        tokens = self._field("tokenizer.ggml.tokens", default=None)
        if tokens is not None:
            out.append(("tokenizer.ggml.tokens", f"{len(tokens)} tokens"))
        return out

    # -- WeightSource --------------------------------------------------------------------------
    def _expert(self, name: str):
        """(stacked tensor, expert index) for a per-expert name (MiniCPM or Mixtral spelling), else None."""
        parts = expert_parts(name)
        if parts is None:
            return None
        layer, expert, w = parts
        t = self._by_hf.get(stacked_name(layer, w))
        if t is None or len(t.shape) != 3 or expert >= int(t.shape[2]):
            return None
        return t, expert

    def has(self, name: str) -> bool:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        return name in self._by_hf or self._expert(name) is not None

    def shape(self, name: str) -> tuple[int, ...]:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        found = self._expert(name)
        if found is not None:
            return tuple(int(d) for d in reversed(found[0].shape.tolist()[:2]))
        return tuple(int(d) for d in reversed(self._by_hf[name].shape.tolist()))

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        try:
            return self._read(name, start, stop)
        finally:
            self._release_pages()

    def _release_pages(self) -> None:
        """Drop the mapped file's pages from our resident set (they stay in the page cache): what
        was read has been decoded into fresh memory, so RSS stays at one tensor, not the file."""
        mapping = getattr(self.reader.data, "_mmap", None)
        if mapping is not None and hasattr(mapping, "madvise"):
            mapping.madvise(mmap.MADV_DONTNEED)

    def _read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        found = self._expert(name)
        if found is not None:  # one expert's slice of a stacked [n_expert, rows, cols] tensor
            t, expert = found
            rows, cols = self.shape(name)
            raw = np.asarray(t.data).reshape(int(t.shape[2]), rows, -1)[expert]
            return torch.from_numpy(self._dequant(raw[start:stop], t.tensor_type).reshape(-1, cols))
        t = self._by_hf[name]
        shape = self.shape(name)
        if len(shape) == 1:
            return torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(shape)[start:stop])
        from ..formats.gguf.layout import qk_heads, unpermute_rows
        heads = qk_heads(self.spec, name)
        rows = np.asarray(t.data).reshape(shape[0], -1)
        if heads:  # rows were permuted per head: dequantize whole, un-permute, then slice
            full = torch.from_numpy(self._dequant(rows, t.tensor_type).reshape(shape))
            return unpermute_rows(full, heads)[start:stop].contiguous()
        return torch.from_numpy(self._dequant(rows[start:stop], t.tensor_type).reshape(-1, shape[1]))

    @staticmethod
    def _dequant(raw: np.ndarray, qtype: T) -> np.ndarray:
        if qtype in (T.F32, T.F16):
            return np.array(raw, dtype=np.float32)
        return dequantize(np.ascontiguousarray(raw).view(np.uint8), qtype).astype(np.float32, copy=False)


def _unreadable(path: Path, exc: Exception) -> ConvertError:
    """One line for a file gguf-py cannot parse: wrong magic, or truncated/corrupt."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        size = path.stat().st_size
    except OSError as err:
        return ConvertError(f"{path}: cannot read ({err.strerror or err})")
    if len(magic) == 4 and magic != b"GGUF":
        return ConvertError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
    return ConvertError(f"{path}: truncated or corrupt GGUF file ({size} bytes; {detail})")


def _gguf_name(hf: str) -> str:
    from ..names import hf_to_gguf
    parts = expert_parts(hf)
    return hf_to_gguf(stacked_name(parts[0], parts[2]) if parts else hf)
