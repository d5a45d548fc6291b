"""llama.cpp through llama-cpp-python: the real client of every GGUF test."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.requirements import require  # noqa: E402

llama_cpp = require("llama_cpp")

GGML_TYPE_F32 = 0


def logits(path: Path, tokens: list[int]) -> torch.Tensor:
    """llama.cpp's logits for every position (f32 KV cache, so only the weights' precision shows)."""
    model = llama_cpp.Llama(str(path), logits_all=True, n_ctx=256, n_batch=256, n_threads=2, verbose=False,
                            type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    try:
        model.eval(tokens)
        return torch.tensor(np.array(model.scores[: len(tokens)], dtype=np.float32))
    finally:
        model.close()


def tokenize(path: Path, text: str) -> list[int]:
    model = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        return model.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    finally:
        model.close()


def quantize(src: Path, dst: Path, ftype: int, nthread: int = 2) -> None:
    """llama-quantize: llama.cpp's own quantization of a GGUF file."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed ({rc})"
