"""to-llama: transformers (the real client) loads each fixture's export and matches the MiniCPM reference."""

from __future__ import annotations

import json

import pytest
import torch

from minicpm_convert import reference
from minicpm_convert.sources.checkpoint import Checkpoint
from minicpm_convert.verify import compare, prompt_tokens
from tests.conftest import run_cli

ALL = ["tiny", "gqa", "untied", "odd", "sharded", "bin"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, fixture_path):
    out = tmp_path_factory.mktemp("llama")
    made = {}
    for name in ALL:
        for dtype in ("float32", "auto"):
            dest = out / f"{name}-{dtype}"
            code, _, err = run_cli("to-llama", fixture_path(name), dest, "--dtype", dtype, "--quiet")
            assert code == 0, err
            made[name, dtype] = dest
    return made


@pytest.mark.parametrize("name", ALL)
def test_transformers_float32_logits_match_minicpm_reference(name, exports, fixture_path):
    from transformers import LlamaForCausalLM

    src = Checkpoint(fixture_path(name))
    tokens = prompt_tokens(src, None, None)
    model = LlamaForCausalLM.from_pretrained(exports[name, "float32"], dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0]
    want = reference.forward(src, tokens)
    m = compare(want, got)
    assert m["rel_err"] < 1e-4, m
    assert m["top1"] == 1.0, m


@pytest.mark.parametrize("name", ALL)
def test_export_layout(name, exports, fixture_path):
    out = exports[name, "auto"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is False and "auto_map" not in cfg
    assert not any(k in cfg for k in ("scale_emb", "scale_depth", "dim_model_base"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" in index["weight_map"]
    for f in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).is_file()
    ckpt = Checkpoint(out)
    # auto keeps the source dtype
    assert ckpt.storage_dtype == Checkpoint(fixture_path(name)).storage_dtype


def test_folding_formulas(exports, fixture_path):
    """Each folded tensor equals the published formula (facts §3), computed independently here."""
    src, out = Checkpoint(fixture_path("tiny")), Checkpoint(exports["tiny", "float32"])
    s = src.spec
    r = s.scale_depth / (s.num_hidden_layers ** 0.5)
    emb = src.get("model.embed_tokens.weight").float()
    torch.testing.assert_close(out.get("model.embed_tokens.weight"), emb * s.scale_emb, rtol=0, atol=0)
    torch.testing.assert_close(out.get("lm_head.weight"), emb / (s.hidden_size / s.dim_model_base), rtol=0, atol=0)
    for n in ("model.layers.1.self_attn.o_proj.weight", "model.layers.3.mlp.down_proj.weight"):
        torch.testing.assert_close(out.get(n), src.get(n).float() * r, rtol=0, atol=0)
    n = "model.layers.2.mlp.up_proj.weight"
    torch.testing.assert_close(out.get(n), src.get(n).float(), rtol=0, atol=0)


def test_bf16_export_within_threshold(exports, fixture_path):
    code, out, err = run_cli("verify", fixture_path("tiny"), exports["tiny", "auto"], exports["tiny", "float32"])
    assert code == 0, out + err


def test_shard_size_splits(tmp_path, fixture_path):
    code, _, err = run_cli("to-llama", fixture_path("tiny"), tmp_path / "o", "--shard-size", "1MB", "-q")
    assert code == 0, err
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and all((tmp_path / "o" / f).stat().st_size < 1_600_000 for f in files)
