"""Recognise an export on disk and open it as a `WeightSource` for the reference forward pass."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import Checkpoint
from ..errors import ConvertError

GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def open_export(path: Path):
    """(source, kind): kind selects the verify threshold, e.g. 'llama-bfloat16' or 'gguf-q4_K_M'."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path}: not found")
    if path.is_file():
        if path.suffix == ".gguf" or is_gguf(path):
            from .gguf import GgufSource
            source = GgufSource(path)
            return source, f"gguf-{source.file_type_name}"
        raise ConvertError(f"{path}: not a GGUF file or an export folder")
    from .int4 import Int4Source, is_int4_folder
    if is_int4_folder(path):  # before Checkpoint(): packed tensors are not a dense tensor set
        source = Int4Source(path)
        return source, source.kind
    ckpt = Checkpoint(path)
    if ckpt.spec.model_type != "llama":
        raise ConvertError(f"{path}: expected a Llama-format export (model_type 'llama'), "
                           f"found model_type '{ckpt.spec.model_type}'")
    return ckpt, f"llama-{str(ckpt.storage_dtype).removeprefix('torch.')}"
