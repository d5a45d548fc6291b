"""Break a correct export in place, the way real bugs break files (for the verify corpus)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from safetensors.torch import load_file, save_file


# -- GGUF ------------------------------------------------------------------------------------------

def gguf_tensor(reader: GGUFReader, name: str) -> np.ndarray:
    """The tensor's data as a writable view of the file (open the reader with mode 'r+')."""
    for t in reader.tensors:
        if t.name == name:
            return t.data
    raise KeyError(name)


def gguf_edit_tensor(path: Path, name: str, edit) -> None:
    reader = GGUFReader(path, "r+")
    edit(gguf_tensor(reader, name))
    reader.data.flush()


def gguf_set(path: Path, key: str, value) -> None:
    """Overwrite a scalar metadata value in place."""
    reader = GGUFReader(path, "r+")
    field = reader.fields[key]
    field.parts[field.data[0]][...] = value
    reader.data.flush()


def gguf_rewrite(path: Path, fields_edit) -> None:
    """Write the file anew with `fields_edit(key, value) -> value` applied to every metadata value
    (for edits that change an array's length); tensors are copied as stored."""
    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    out = path.with_suffix(".rewritten")
    writer = GGUFWriter(out, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = fields_edit(key, field.contents())
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, vtype)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out.replace(path)


# -- safetensors folders -----------------------------------------------------------------------------

def st_edit(folder: Path, name: str, edit) -> None:
    """Replace one tensor of a safetensors export folder by edit(tensor)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = folder / index[name]
    tensors = load_file(shard)
    tensors[name] = edit(tensors[name]).contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})


def config_edit(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def reverse_nibbles(words: torch.Tensor) -> torch.Tensor:
    """The 8 nibbles of every int32 in reverse order (a packer that counts from the wrong end)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros_like(w)
    for i in range(8):
        out |= ((w >> (4 * i)) & 0xF) << (4 * (7 - i))
    return out.to(torch.int64).where(out < 2**31, out - 2**32).to(torch.int32)


def add_to_nibbles(words: torch.Tensor, delta: int) -> torch.Tensor:
    """Every nibble plus delta (mod 16): a zero point off by one, for example."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros_like(w)
    for i in range(8):
        out |= ((((w >> (4 * i)) & 0xF) + delta) & 0xF) << (4 * i)
    return out.where(out < 2**31, out - 2**32).to(torch.int32)
