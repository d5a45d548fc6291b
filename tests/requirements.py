"""The clients and kernels the tests promise. Outside CI a missing one skips its tests; under
`CI=true` it fails them, so a promised real client can never quietly vanish."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _libggml():
    from tests.quants.ggml_oracle import load
    return load()


def _kquants():
    from minicpm_convert.quants import registry
    return registry._compiled


def llama_cpp_tools():
    """The folder holding llama.cpp's llama-quantize, llama-imatrix and llama-gguf-split, built from the source the
    installed llama-cpp-python vendors by scripts/build_llama_cpp_tools.sh (CI builds it)."""
    import importlib.metadata
    from pathlib import Path

    cache = Path(os.environ.get("MINICPM_CONVERT_CACHE", Path.home() / ".cache" / "minicpm-convert"))
    folder = cache / f"llama.cpp-{importlib.metadata.version('llama-cpp-python')}" / "bin"
    ok = all((folder / exe).is_file() for exe in ("llama-quantize", "llama-imatrix", "llama-gguf-split"))
    return folder if ok else None


LOADERS = {
    "llama_cpp": lambda: importlib.import_module("llama_cpp"),
    "libggml": _libggml,  # llama.cpp's quantizer (ggml_quantize_chunk) from the installed llama-cpp-python
    "compressed_tensors": lambda: importlib.import_module("compressed_tensors"),
    "transformers": lambda: importlib.import_module("transformers"),
    "compiled kernels": _kquants,  # minicpm_convert's C extension
    "llama.cpp tools": llama_cpp_tools,  # llama-quantize, llama-imatrix and llama-gguf-split binaries
}


def require(name: str):
    """The promised client `name` (a module or loaded library); skip, or fail under CI, if missing."""
    try:
        found = LOADERS[name]()
    except ImportError as exc:
        found, why = None, str(exc)
    else:
        why = "not found"
    if found is None:
        message = f"{name} is missing ({why})"
        if IN_CI:
            pytest.fail(f"{message}: CI promises it", pytrace=False)
        pytest.skip(message)
    return found


SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def shared_data(name: str) -> Path:
    """A folder of real files in ../shared/data beside the checkout (OpenBMB's tokenizer, ...):
    skip without it, fail under CI, where ../shared is promised."""
    folder = SHARED_DATA / name
    if not folder.is_dir():
        message = f"{folder} is missing (real files the tests hold us to)"
        if IN_CI:
            pytest.fail(f"{message}: CI promises ../shared", pytrace=False)
        pytest.skip(message)
    return folder
