"""A MiniCPM (or Llama-format) checkpoint in Hugging Face layout, read lazily tensor by tensor.

Sources: a local folder, or a Hub repo id resolved through huggingface_hub (only the files we
need; HF_HUB_OFFLINE and the cache are honoured). Weights: model.safetensors, sharded safetensors
with model.safetensors.index.json, or pytorch_model*.bin through torch.load(weights_only=True).
No code from the checkpoint is ever run.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path, PurePosixPath

import torch

from .. import names as tensor_names
from ..errors import ConvertError
from .safetensors_file import SafetensorsFile
from ..spec import ModelSpec, load_config, spec_from_config

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json", "added_tokens.json")
# README.md: the model card, whose front matter gives a GGUF's general.* keys (license, tags, ...)
HUB_PATTERNS = ["config.json", "generation_config.json", "README.md", *TOKENIZER_FILES]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def resolve(source: str | Path) -> Path:
    """A local folder as is; otherwise a Hub repo id downloaded (or found in the cache)."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise ConvertError(f"{source}: expected a checkpoint folder, found a file")
    text = str(source)
    if not _REPO_ID.match(text) or text.startswith((".", "/")):
        raise ConvertError(f"{source}: no such folder (and not a Hugging Face repo id like 'openbmb/MiniCPM-2B-sft-bf16')")
    return _download(text)


def hub_repo_id(source: str | Path, folder: Path) -> str | None:
    """The Hub repo a checkpoint came from: SRC given as a repo id, or a folder of the Hugging Face
    cache (`models--ORG--NAME/snapshots/REVISION`); None for any other local folder."""
    text = str(source)
    if not Path(source).exists() and _REPO_ID.match(text):
        return text
    parts = Path(os.path.abspath(folder)).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        org, _, name = parts[-3].removeprefix("models--").partition("--")
        if org and name and _REPO_ID.match(f"{org}/{name}"):
            return f"{org}/{name}"
    return None


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    def fetch(weights: list[str]) -> Path:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS + weights))

    try:
        folder = fetch(["*.safetensors", "model.safetensors.index.json"])
        if not any(folder.glob("*.safetensors")):
            folder = fetch(["pytorch_model*.bin", "pytorch_model.bin.index.json"])
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise ConvertError(f"{repo_id}: not in the local Hugging Face cache and {why}") from None
    except HfHubHTTPError as exc:
        raise ConvertError(f"{repo_id}: download failed ({str(exc).splitlines()[0]})") from None
    except (OSError, ValueError) as exc:
        raise ConvertError(f"{repo_id}: cannot resolve ({str(exc).splitlines()[0]})") from None
    return folder


def _inside(folder: Path, relative: str, index: Path) -> Path:
    """A shard named by an index, refused if the name leaves the checkpoint folder."""
    p = PurePosixPath(relative)
    if not relative or p.is_absolute() or Path(relative).is_absolute() or ".." in p.parts or "\\" in relative:
        raise ConvertError(f"{index}: shard path {relative!r} points outside the checkpoint folder")
    return folder / relative


class Checkpoint:
    """Config, spec and lazily read tensors of one checkpoint folder."""

    def __init__(self, folder: Path, *, validate: bool = True):
        self.folder = Path(folder)
        self.config = load_config(self.folder / "config.json")
        self.spec: ModelSpec = spec_from_config(self.config, str(self.folder / "config.json"))
        self._where: dict[str, object] = {}  # tensor name -> SafetensorsFile or a loaded .bin dict
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self.weight_files = self._open_weights()
        self.order = (tensor_names.check_tensor_set(self.spec, self._shapes, str(self.folder))
                      if validate else list(self._shapes))
        if validate:
            from .tokenizer import check_tokenizer
            check_tokenizer(self.folder, self.spec.vocab_size)

    @classmethod
    def open(cls, source: str | Path, **kwargs) -> "Checkpoint":
        return cls(resolve(source), **kwargs)

    # -- reading -----------------------------------------------------------------------------
    def _open_weights(self) -> list[Path]:
        folder = self.folder
        st_index = folder / "model.safetensors.index.json"
        bin_index = folder / "pytorch_model.bin.index.json"
        if st_index.is_file():
            files = self._index_files(st_index)
        elif (folder / "model.safetensors").is_file():
            files = [folder / "model.safetensors"]
        elif bin_index.is_file():
            files = self._index_files(bin_index)
        elif (folder / "pytorch_model.bin").is_file():
            files = [folder / "pytorch_model.bin"]
        else:
            singles = sorted(folder.glob("*.safetensors"))
            if not singles:
                raise ConvertError(f"{folder}: no weights found (model.safetensors, "
                                   "model.safetensors.index.json or pytorch_model.bin)")
            files = singles
        for file in files:
            if file.suffix == ".safetensors":
                self._add_safetensors(file)
            else:
                self._add_bin(file)
        return files

    def _index_files(self, index: Path) -> list[Path]:
        data = load_config(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(f"{index}: missing or empty 'weight_map'")
        files: list[Path] = []
        self._index_map: dict[str, str] = {}
        for tensor, rel in weight_map.items():
            if not isinstance(rel, str):
                raise ConvertError(f"{index}: weight_map['{tensor}'] is not a file name")
            path = _inside(self.folder, rel, index)
            if path not in files:
                if not path.is_file():
                    raise ConvertError(f"{index}: shard '{rel}' (holding '{tensor}') does not exist")
                files.append(path)
            self._index_map[tensor] = rel
        return files

    def _add(self, name: str, holder, shape, dtype, file: Path):
        if name in self._where:
            raise ConvertError(f"{file}: tensor '{name}' is stored twice (also in another shard)")
        self._where[name] = holder
        self._shapes[name] = tuple(shape)
        self._dtypes[name] = dtype

    def _add_safetensors(self, file: Path):
        st = SafetensorsFile(file)
        for name in st.names():
            self._add(name, st, st.shape(name), st.dtype(name), file)

    def _add_bin(self, file: Path):
        state = load_pytorch_bin(file)
        for name, tensor in state.items():
            self._add(name, state, tensor.shape, tensor.dtype, file)

    def names(self) -> list[str]:
        return list(self.order)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def storage_type(self, name: str) -> str:
        """How the tensor is stored: 'bfloat16', 'float16', 'float32' (what bounds its rounding)."""
        return str(self._dtypes[name]).removeprefix("torch.")

    def get(self, name: str) -> torch.Tensor:
        """The stored tensor (a view of the mapped file where possible; do not modify in place)."""
        holder = self._where[name]
        return holder.get(name) if isinstance(holder, SafetensorsFile) else holder[name]

    def has(self, name: str) -> bool:
        return name in self._shapes

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) in float32, checked for NaN/Inf (the `WeightSource` interface)."""
        return self.read_stored(name, start, stop).to(torch.float32)

    def read_stored(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) in the stored dtype, checked for NaN/Inf."""
        t = self.read_unchecked(name, start, stop)
        check_finite(name, t, self.folder)
        return t

    def read_unchecked(self, name: str, start: int = 0, stop: int | None = None, scratch=None) -> torch.Tensor:
        """Rows [start, stop) in the stored dtype, NOT checked: for a caller that checks every
        value in its own pass over them (stream.StoredRows). `scratch` (a stream.Scratch): memory
        to read them into, instead of a fresh array."""
        holder = self._where[name]
        if isinstance(holder, SafetensorsFile) and hasattr(os, "preadv"):
            # read, not mapped: no file pages stay resident
            return holder.read_rows(name, start, stop, scratch.get if scratch is not None else None)
        return self.get(name)[start:stop]

    @property
    def storage_dtype(self) -> torch.dtype:
        """The dtype of the embedding: what 'auto' keeps."""
        return self._dtypes["model.embed_tokens.weight"]

    def total_bytes(self) -> int:
        return sum(int(torch.Size(s).numel()) * torch.empty((), dtype=self._dtypes[n]).element_size()
                   for n, s in self._shapes.items())

    def files_to_copy(self) -> list[Path]:
        return [self.folder / n for n in (*TOKENIZER_FILES, "generation_config.json")
                if (self.folder / n).is_file()]


def check_finite(name: str, tensor: torch.Tensor, where: Path | str) -> None:
    # A finite sum proves every value finite (NaN and Inf propagate) and costs one fast reduction;
    # only an overflowing sum or a real defect pays for the element-wise check.
    if torch.isfinite(tensor.sum()).item() or torch.isfinite(tensor).all():
        return
    bad = (~torch.isfinite(tensor)).sum().item()
    kind = "NaN" if torch.isnan(tensor).any() else "Inf"
    raise ConvertError(f"{where}: tensor '{name}' contains {kind} ({bad} non-finite values)")


def load_pytorch_bin(file: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: a pickle that would run code is refused, never run."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (non-zip) files cannot be mapped
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"it calls {found.group(1)}" if found else "it holds more than plain tensors"
        raise ConvertError(f"{file}: refused to load: {what}, which would run code when unpickled") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise ConvertError(f"{file}: not a readable PyTorch checkpoint ({first[:160]})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ConvertError(f"{file}: expected a state dict of named tensors")
    return state

