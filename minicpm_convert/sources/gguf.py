"""A GGUF file as a `WeightSource`: dequantized, un-permuted, in Hugging Face naming."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader

from ..errors import ConvertError
from ..families import GgufFields, family_for_gguf, family_of
from ..families.base import common_gguf_fields
from ..names import expert_parts, gguf_to_hf, stacked_name
from ..formats.gguf.plan import FILE_TYPES
from ..quants import dequantize
from ..spec import ModelSpec

# general.file_type -> our name of it (q4_K_M, iq3_xxs, ...): every type to-gguf writes
_FILE_TYPE_NAMES = {ft.ftype: name for name, ft in FILE_TYPES.items()}


def _open(path: Path) -> GGUFReader:
    try:
        return GGUFReader(path)
    except Exception as exc:  # gguf-py fails with numpy/struct errors on damaged files
        raise _unreadable(path, exc) from None


class GgufSource:
    """A GGUF file, or a split set given by its first file (`NAME-00001-of-00003.gguf`)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.reader = _open(self.path)
        self.readers = [self.reader, *self._other_splits()]
        self.arch = self._str("general.architecture")
        self.version = int(self._field("GGUF.version"))
        self.tensors = [t for r in self.readers for t in r.tensors]
        self._by_hf: dict[str, object] = {}
        for t in self.tensors:
            try:
                if gguf_to_hf(t.name) in self._by_hf:
                    raise ConvertError(f"{self.path}: tensor '{t.name}' is stored twice")
                self._by_hf[gguf_to_hf(t.name)] = t
            except KeyError:
                if not t.name.startswith("rope_factors"):
                    raise ConvertError(f"{self.path}: unexpected tensor '{t.name}'") from None
        ftype = int(self._field("general.file_type", default=-1))
        self.file_type_name = _FILE_TYPE_NAMES.get(ftype, f"ftype{ftype}")
        self.spec = self._spec()
        self._check_shapes()

    def _other_splits(self) -> list[GGUFReader]:
        """The other files of a split set (as llama.cpp finds them), each checked for its place."""
        from ..formats.gguf.split import SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS, member_name, set_paths
        count = self._field(SPLIT_COUNT, default=0)
        if not isinstance(count, int) or count <= 1:
            return []
        no = self._field(SPLIT_NO, default=0)
        if no != 0:
            first = member_name(self.path.name.rsplit("-", 3)[0], 1, count)
            raise ConvertError(f"{self.path}: is file {no + 1} of a split GGUF of {count}; give its first file "
                               f"({first})")
        readers = []
        for i, path in enumerate(set_paths(self.path, count)[1:], 1):
            if not path.is_file():
                raise ConvertError(f"{path}: missing (file {i + 1} of the split GGUF {self.path.name})")
            reader = _open(path)
            place = tuple(reader.fields[k].contents() if k in reader.fields else None
                          for k in (SPLIT_NO, SPLIT_COUNT))
            if place != (i, count):
                raise ConvertError(f"{path}: its {SPLIT_NO}/{SPLIT_COUNT} are {place[0]}/{place[1]}, file "
                                   f"{i + 1} of {self.path.name}'s set must say {i}/{count}")
            readers.append(reader)
        n = len(self.reader.tensors) + sum(len(r.tensors) for r in readers)
        if self._field(SPLIT_TENSORS, default=n) != n:
            raise ConvertError(f"{self.path}: {SPLIT_TENSORS} is {self._field(SPLIT_TENSORS)}, the {count} files "
                               f"hold {n} tensors")
        return readers

    # -- metadata ----------------------------------------------------------------------------
    def _field(self, key: str, default=...):
        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise ConvertError(f"{self.path}: missing metadata key '{key}'")
            return default
        return field.contents()

    def field(self, key: str):
        """A metadata value, or None if the file has no such key."""
        return self._field(key, default=None)

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
        """The spec, by the family that reads this architecture (families/)."""
        fields = GgufFields(self.path, self.arch, self._field, {t.name for t in self.tensors}, self._tensor_list)
        tokens = self._field("tokenizer.ggml.tokens", default=None)
        vocab = int(fields.number("vocab_size", len(tokens) if tokens is not None else 0))
        family = family_for_gguf(fields)
        return family.from_gguf(fields, common_gguf_fields(fields, vocab, "lm_head.weight" not in self._by_hf))

    def _tensor_list(self, name: str) -> list[float] | None:
        for t in self.tensors:
            if t.name == name:
                return np.array(t.data, dtype=np.float32).tolist()
        return None

    def _check_shapes(self) -> None:
        from ..names import layer_index
        blocks = max((layer_index(t.name) for t in self.tensors if layer_index(t.name) is not None), default=-1) + 1
        if self.spec.num_hidden_layers > blocks:  # before listing a (perhaps huge) expected set
            raise ConvertError(f"{self.path}: missing tensor 'blk.{blocks}.attn_norm.weight' (metadata block_count "
                               f"is {self.spec.num_hidden_layers}, the file holds {blocks} blocks)")
        expected = family_of(self.spec).expected_shapes(self.spec)
        for name, shape in expected.items():
            if not self.has(name):
                raise ConvertError(f"{self.path}: missing tensor '{_gguf_name(name)}'")
            if self.shape(name) != shape:
                raise ConvertError(f"{self.path}: tensor '{_gguf_name(name)}' has shape {list(self.shape(name))}, "
                                   f"the metadata implies {list(shape)}")

    def summary_fields(self) -> list[tuple[str, object]]:
        skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.chat_template")
        out = []
        for key, field in self.reader.fields.items():
            if key.startswith("GGUF.") or key in skip:
                continue
            value = field.contents()
            out.append((key, value))
        for key, what in (("tokenizer.ggml.tokens", "tokens"), ("tokenizer.ggml.merges", "merges")):
            found = self._field(key, default=None)
            if found is not None:
                out.append((key, f"{len(found)} {what}"))
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

    def names(self) -> list[str]:
        """Every weight in Hugging Face naming (stacked experts as one name per expert)."""
        out = []
        for name, t in self._by_hf.items():
            parts = expert_parts(name.replace(".experts.", ".experts.0.")) if ".experts.w" in name else None
            if parts is not None and len(t.shape) == 3:
                out += [name.replace(".experts.", f".experts.{e}.") for e in range(int(t.shape[2]))]
            else:
                out.append(name)
        return out

    def storage_type(self, name: str) -> str:
        """The GGML type of the tensor holding `name` ('Q4_K', 'F16', ...), '/imatrix' appended to a
        quantized type when the file says an importance matrix guided its encoder (llama-quantize's
        `quantize.imatrix.*` keys)."""
        name = name.replace(".block_sparse_moe.", ".mlp.")
        found = self._expert(name)
        qtype = (found[0] if found is not None else self._by_hf[name]).tensor_type
        # Q8_0, the ternary types and the float types ignore an importance matrix.
        weighted = qtype not in (T.F32, T.F16, T.BF16, T.Q8_0, T.TQ1_0, T.TQ2_0) and any(k.startswith("quantize.imatrix.")
                                                                       for k in self.reader.fields)
        return qtype.name + ("/imatrix" if weighted else "")

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
        """Drop the mapped files' pages from our resident set (they stay in the page cache): what
        was read has been decoded into fresh memory, so RSS stays at one tensor, not the file."""
        for reader in self.readers:
            mapping = getattr(reader.data, "_mmap", None)
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
        from ..formats.gguf.layout import unpermute_rows
        heads = family_of(self.spec).gguf_rope_heads(self.spec, name)
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
