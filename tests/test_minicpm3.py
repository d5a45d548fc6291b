"""MiniCPM3 (multi-head latent attention): the reference against transformers' own MiniCPM3 model,
GGUF arch minicpm3 in llama.cpp, and the refusals where no exact representation exists."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from minicpm_convert import reference
from minicpm_convert.sources.checkpoint import Checkpoint
from minicpm_convert.names import expected_shapes
from minicpm_convert.spec import spec_from_config
from minicpm_convert.verify import compare, prompt_tokens
from tests.conftest import run_cli


def minicpm3_config(vocab: int) -> dict:
    """MiniCPM3-4B's config.json keys, small sizes (hidden 256, 4 heads of q/k 48 and v 32)."""
    return {
        "architectures": ["MiniCPM3ForCausalLM"], "model_type": "minicpm3",
        "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPM3Config",
                     "AutoModelForCausalLM": "modeling_minicpm.MiniCPM3ForCausalLM"},
        "bos_token_id": 1, "eos_token_id": [2, 73440], "hidden_act": "silu", "initializer_range": 0.1,
        "hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 512, "max_position_embeddings": 4096,
        "num_attention_heads": 4, "num_key_value_heads": 4, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
        "q_lora_rank": 256, "kv_lora_rank": 256, "v_head_dim": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "rope_scaling": {"type": "longrope", "long_factor": [1.0 + 2 * i for i in range(8)],
                         "short_factor": [1.0 + 0.25 * i for i in range(8)],
                         "original_max_position_embeddings": 4096},
        "vocab_size": vocab, "use_cache": True, "scale_emb": 12, "dim_model_base": 256, "scale_depth": 1.4,
        "torch_dtype": "bfloat16", "tie_word_embeddings": True,
    }


@pytest.fixture(scope="module")
def minicpm3(tmp_path_factory, fixture_path):
    from fixtures.make_fixtures import copy_tokenizer_files, tokenizer_size

    out = tmp_path_factory.mktemp("minicpm3")
    cfg = minicpm3_config(tokenizer_size())
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name, shape in expected_shapes(spec_from_config(cfg)).items():
        if len(shape) == 1:
            t = 1 + 0.05 * torch.randn(shape, generator=g)
        elif name == "model.embed_tokens.weight":
            t = 0.08 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / shape[1] ** 0.5
        tensors[name] = t.to(torch.bfloat16)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    copy_tokenizer_files(out)
    return out


def test_reference_matches_transformers_minicpm3(minicpm3):
    """transformers ships MiniCPM3 natively: the original model, run by a real client, no remote code."""
    from transformers import AutoModelForCausalLM

    cfg = json.loads((minicpm3 / "config.json").read_text())
    cfg.pop("auto_map")
    (minicpm3 / "config.json").write_text(json.dumps(cfg, indent=2))
    model = AutoModelForCausalLM.from_pretrained(minicpm3, dtype=torch.float32, trust_remote_code=False)
    src = Checkpoint(minicpm3)
    tokens = prompt_tokens(src, None, None)
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0]
    m = compare(reference.forward(src, tokens), got)
    assert m["rel_err"] < 1e-4 and m["top1"] == 1.0, m


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_gguf_minicpm3_runs_in_llama_cpp(minicpm3, tmp_path, quant):
    from tests import llama_cpp_client as client

    out = tmp_path / "m.gguf"
    code, _, err = run_cli("to-gguf", minicpm3, out, "--quant", quant, "-q")
    assert code == 0, err
    src = Checkpoint(minicpm3)
    tokens = prompt_tokens(src, None, None)
    ref = reference.forward(src, tokens)
    got = client.logits(out, tokens)
    m = compare(ref, got)
    if quant == "f32":
        assert m["rel_err"] < 2e-3 and m["top1"] == 1.0, m
    code, text, err = run_cli("verify", minicpm3, out)
    assert code == 0, text + err


def test_gguf_minicpm3_bytes_match_llama_quantize(minicpm3, tmp_path):
    from minicpm_convert.formats.gguf.plan import FILE_TYPES
    from tests import llama_cpp_client as client
    from tests.formats.test_gguf import tensors

    for quant in ("f32", "q4_K_M"):
        assert run_cli("to-gguf", minicpm3, tmp_path / f"{quant}.gguf", "--quant", quant, "-q")[0] == 0
    client.quantize(tmp_path / "f32.gguf", tmp_path / "theirs.gguf", int(FILE_TYPES["q4_K_M"].ftype))
    assert tensors(tmp_path / "q4_K_M.gguf") == tensors(tmp_path / "theirs.gguf")


@pytest.mark.parametrize("command", ["to-llama", "to-int4"])
def test_llama_and_int4_refuse_mla(minicpm3, tmp_path, command):
    code, _, err = run_cli(command, minicpm3, tmp_path / "o")
    assert code == 2 and "MLA attention has no Llama equivalent" in err


def test_gguf_llama_arch_refuses_mla(minicpm3, tmp_path):
    code, _, err = run_cli("to-gguf", minicpm3, tmp_path / "o.gguf", "--arch", "llama")
    assert code == 2 and "MLA" in err
