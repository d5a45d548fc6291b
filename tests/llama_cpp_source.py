"""llama.cpp's own source, as vendored by the pinned llama-cpp-python sdist: its converter
(`convert_hf_to_gguf.py`), gguf-py and the tools. Downloaded once from the package registry into
the cache (`~/.cache/minicpm-convert`, or $MINICPM_CONVERT_CACHE) and reused."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.requirements import IN_CI

VERSION = "0.3.36"  # the llama-cpp-python the test extra pins (pyproject.toml)
CACHE = Path(os.environ.get("MINICPM_CONVERT_CACHE", Path.home() / ".cache" / "minicpm-convert"))


def vendor_dir() -> Path:
    """The llama.cpp tree inside the sdist (downloaded and unpacked on first use)."""
    root = CACHE / "sdist"
    tree = root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    archive = root / f"llama_cpp_python-{VERSION}.tar.gz"
    if not archive.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(root)], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return tree


def run_converter(model_dir: Path, out: Path, outtype: str, *options: str, vocab_only: bool = False):
    """llama.cpp's `convert_hf_to_gguf.py MODEL --outfile OUT --outtype TYPE [OPTIONS]` (f32, f16,
    bf16, q8_0; options such as --metadata FILE, --split-max-tensors N), with `--vocab-only` when
    asked: the finished process (its return code and output)."""
    import pytest

    try:
        tree = vendor_dir()
    except (OSError, subprocess.CalledProcessError) as exc:
        if IN_CI:
            pytest.fail(f"llama.cpp's converter is missing ({exc}): CI promises it", pytrace=False)
        pytest.skip(f"llama.cpp's converter is missing ({exc})")
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py"), "NO_LOCAL_GGUF": ""}
    return subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out),
                           "--outtype", outtype, *options, *(["--vocab-only"] if vocab_only else [])],
                          capture_output=True, text=True, env=env)


def convert(model_dir: Path, out: Path, outtype: str, *options: str, vocab_only: bool = False) -> Path:
    """The converter's file (the test fails with its error when it refuses the model)."""
    r = run_converter(model_dir, out, outtype, *options, vocab_only=vocab_only)
    assert r.returncode == 0, r.stderr[-2000:]
    return out
