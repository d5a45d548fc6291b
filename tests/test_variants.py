"""Variants: what works is proven by a real client; what cannot be converted exactly is refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from minicpm_convert import reference
from minicpm_convert.checkpoint import Checkpoint
from minicpm_convert.verify import compare, prompt_tokens
from tests.conftest import run_cli


def derived(fixture_path, tmp_path, base, **changes):
    dest = tmp_path / f"{base}-variant"
    shutil.copytree(fixture_path(base), dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(changes)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.fixture
def minicpm_2b_128k(fixture_path, tmp_path):
    """MiniCPM-2B-128k's structure: untied, rope_theta 1e6, dynamic NTK scaling x4."""
    return derived(fixture_path, tmp_path, "untied", rope_theta=1e6,
                   rope_scaling={"type": "dynamic", "factor": 4.0})


def test_128k_llama_format_keeps_dynamic_scaling_and_matches(minicpm_2b_128k, tmp_path):
    from transformers import LlamaForCausalLM

    out = tmp_path / "llama"
    code, _, err = run_cli("to-llama", minicpm_2b_128k, out, "--dtype", "float32", "-q")
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == {"type": "dynamic", "factor": 4.0} and cfg["rope_theta"] == 1e6
    src = Checkpoint(minicpm_2b_128k)
    tokens = prompt_tokens(src, None, None)
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0]
    m = compare(reference.forward(src, tokens), got)
    assert m["rel_err"] < 1e-4 and m["top1"] == 1.0, m


def test_128k_gguf_warns_and_llama_cpp_matches(minicpm_2b_128k, tmp_path):
    from tests import llama_cpp_client as client

    out = tmp_path / "m.gguf"
    code, _, err = run_cli("to-gguf", minicpm_2b_128k, out, "--quant", "f32", "-q")
    assert code == 0 and "no dynamic NTK rope scaling" in err
    src = Checkpoint(minicpm_2b_128k)
    tokens = prompt_tokens(src, None, None)
    m = compare(reference.forward(src, tokens), client.logits(out, tokens))
    assert m["rel_err"] < 2e-3 and m["top1"] == 1.0, m


@pytest.mark.parametrize("changes,command,reason", [
    ({"hidden_act": "fatrelu"}, "to-llama", "FATReLU activation has no Llama or llama.cpp equivalent"),
    ({"hidden_act": "fatrelu"}, "to-gguf", "FATReLU activation has no Llama or llama.cpp equivalent"),
    ({"model_type": "minicpm3", "architectures": ["MiniCPM3ForCausalLM"]}, "to-llama",
     "MLA attention has no Llama equivalent"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 32, "long_factor": [1.0] * 32,
                       "original_max_position_embeddings": 4096}}, "to-gguf", "LongRoPE is not supported yet"),
    ({"num_experts": 8, "num_experts_per_tok": 2}, "to-llama", "MiniCPM-MoE is not supported yet"),
])
def test_refused_by_name(changes, command, reason, fixture_path, tmp_path):
    src = derived(fixture_path, tmp_path, "tiny", **changes)
    out = tmp_path / ("o.gguf" if command == "to-gguf" else "o")
    code, _, err = run_cli(command, src, out)
    assert code == 2 and reason in err and not out.exists()


def test_inspect_names_the_variant(fixture_path, tmp_path):
    src = derived(fixture_path, tmp_path, "tiny", hidden_act="fatrelu")
    code, out, _ = run_cli("inspect", src)
    assert code == 0 and "variant: minicpm-s" in out
