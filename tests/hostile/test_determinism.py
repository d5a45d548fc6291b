"""The same input and options give byte-identical outputs, whatever the thread count."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

EXPORTS = {
    "to-llama": (["to-llama"], "llama"),
    "to-gguf-q4_K_M": (["to-gguf", "--quant", "q4_K_M"], "m.gguf"),
    "to-gguf-f16": (["to-gguf", "--quant", "f16"], "m.gguf"),
    "to-gguf-llama-q6_K": (["to-gguf", "--quant", "q6_K", "--arch", "llama"], "m.gguf"),
    "to-int4-gptq": (["to-int4"], "int4"),
    "to-int4-compressed-asym": (["to-int4", "--format", "compressed-tensors", "--asym"], "int4"),
    "to-int4-awq": (["to-int4", "--format", "awq"], "int4"),
}


def digests(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def convert(command: list[str], src: Path, out: Path, threads: int) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MINICPM_CONVERT_THREADS": str(threads)}  # our own chunk pool as well as torch's
    r = subprocess.run([sys.executable, "-m", "minicpm_convert", command[0], str(src), str(out), *command[1:], "-q"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return digests(out)


@pytest.mark.parametrize("export", list(EXPORTS))
def test_byte_identical_across_runs_and_thread_counts(export, fixture_path, tmp_path):
    command, name = EXPORTS[export]
    src = fixture_path("gqa")
    one = convert(command, src, tmp_path / "t1" / name, threads=1)
    two = convert(command, src, tmp_path / "t2" / name, threads=2)
    five = convert(command, src, tmp_path / "t5" / name, threads=5)  # more threads than cores
    assert one and one == two == five
