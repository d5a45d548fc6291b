"""The `general.*` facts llama.cpp's converter derives for a model, and its default file name.

gguf-py's `Metadata.load` is what `convert_hf_to_gguf.py` uses (config, model card, folder
name heuristics); we call it the same way so that a file written into a folder gets the name
llama.cpp would give it, e.g. `MiniCPM-2B-sft-bf16-2.7B-Q4_K_M.gguf`.
"""

from __future__ import annotations

import logging
from math import prod
from pathlib import Path
from typing import Iterable

import gguf

from .plan import FileType


def parameter_counts(tensors: Iterable[tuple[str, tuple[int, ...]]]) -> tuple[int, int, int, int]:
    """(total, shared, per-expert, expert count) over GGUF tensors, as gguf-py's writer counts them."""
    total = shared = expert = expert_sum = n_expert_tensors = 0
    for name, shape in tensors:
        size = prod(shape)
        total += size
        if "_exps." in name and len(shape) >= 3:
            expert += size // shape[0]  # rows-major shape: [n_expert, rows, cols]
            expert_sum += shape[0]
            n_expert_tensors += 1
        else:
            shared += size
    count = expert_sum // n_expert_tensors if n_expert_tensors else 0
    return total, shared, expert, count


def model_metadata(folder: Path, tensors: Iterable[tuple[str, tuple[int, ...]]]) -> gguf.Metadata:
    total, shared, expert, count = parameter_counts(tensors)
    logging.getLogger("gguf.metadata").setLevel(logging.ERROR)
    meta = gguf.Metadata.load(None, Path(folder), None, total)
    if meta.name is None:
        meta.name = Path(folder).name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, count)
    return meta


def output_type(ft: FileType) -> str:
    """'Q4_K_M' for LlamaFileType.MOSTLY_Q4_K_M, 'F32' for ALL_F32 (llama.cpp's spelling)."""
    return ft.ftype.name.partition("_")[2]


def default_file_name(meta: gguf.Metadata, ft: FileType) -> str:
    return gguf.naming_convention(meta.name, meta.basename, meta.finetune, meta.version, meta.size_label,
                                  output_type(ft)) + ".gguf"
