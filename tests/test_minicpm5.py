"""MiniCPM5 (plain LlamaForCausalLM, explicit head_dim != hidden/heads, GQA 8:1, untied, no muP
keys) and MiniCPM4.1 (MiniCPM4 plus mup_denominator) in every command, proven by the real
clients; SALA, the speculative drafts and MiniCPM-V refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
from gguf import GGUFReader

from minicpm_convert import reference
from minicpm_convert.formats.gguf.plan import FILE_TYPES
from minicpm_convert.sources.checkpoint import Checkpoint
from minicpm_convert.verify import compare, prompt_tokens
from tests.conftest import run_cli, transformers_parity
from tests.requirements import require


@pytest.fixture(scope="module")
def minicpm5(fixture_path):
    return fixture_path("minicpm5")


def test_spec_has_the_stated_head_dim_and_no_mup(minicpm5):
    spec = Checkpoint(minicpm5).spec
    assert spec.family == "llama" and spec.head_dim == 64 and spec.hidden_size // spec.num_attention_heads == 32
    assert (spec.num_attention_heads, spec.num_key_value_heads) == (8, 1)
    # No muP keys: nothing to fold, and MiniCPM's defaults (12 / 1.4 / 256) must not appear.
    assert (spec.scale_emb, spec.residual_scale, spec.logit_scale) == (1.0, 1.0, 1.0)
    assert not spec.tie_word_embeddings and spec.rope_theta == 5e6


def test_to_llama_is_a_validated_copy_that_transformers_runs(minicpm5, tmp_path):
    out = tmp_path / "llama"
    code, _, err = run_cli("to-llama", minicpm5, out, "--dtype", "float32", "-q")
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["head_dim"] == 64 and cfg["architectures"] == ["LlamaForCausalLM"]
    m = transformers_parity(minicpm5, out)
    assert m["rel_err"] < 1e-4 and m["top1"] == 1.0, m
    assert run_cli("verify", minicpm5, out)[0] == 0


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0", "q4_K_M", "q6_K"])
def test_gguf_runs_in_llama_cpp(quant, minicpm5, tmp_path):
    from tests import llama_cpp_client as client
    from tests.formats.test_gguf import tensors

    out = tmp_path / f"{quant}.gguf"
    code, _, err = run_cli("to-gguf", minicpm5, out, "--quant", quant, "-q")
    assert code == 0 and "GGUF arch llama" in err, err
    kv = {k: f.contents() for k, f in GGUFReader(out).fields.items()}
    assert kv["general.architecture"] == "llama"
    assert kv["llama.attention.key_length"] == kv["llama.attention.value_length"] == 64
    assert kv["llama.rope.dimension_count"] == 64 and kv["llama.attention.head_count_kv"] == 1
    src = Checkpoint(minicpm5)
    tokens = prompt_tokens(src, None, None)
    if quant == "f32":
        m = compare(reference.forward(src, tokens), client.logits(out, tokens))
        assert m["rel_err"] < 2e-3 and m["top1"] == 1.0, m
    else:
        f32 = tmp_path / "f32.gguf"
        assert run_cli("to-gguf", minicpm5, f32, "--quant", "f32", "-q")[0] == 0
        if quant != "f16":  # llama-quantize makes the same bytes from the f32 file
            theirs = tmp_path / "theirs.gguf"
            client.quantize(f32, theirs, int(FILE_TYPES[quant].ftype))
            assert tensors(out) == tensors(theirs)
        # llama.cpp computes what the file holds: against our reference on the file's own
        # (dequantized) weights only ggml's 8-bit rounding of the activations in its quantized dot
        # products remains (about 2% of a logit at most, KL below 1e-3 here).
        from minicpm_convert.sources.gguf import GgufSource
        m = compare(reference.forward(GgufSource(out), tokens), client.logits(out, tokens))
        assert m["kl"] < 2e-3 and m["top1"] >= 0.9, m
    code, text, err = run_cli("verify", minicpm5, out, "--tokens", ",".join(map(str, tokens)))
    assert code == 0, text + err


def test_int4_loads_in_transformers(minicpm5, tmp_path):
    require("compressed_tensors")
    out = tmp_path / "int4"
    code, _, err = run_cli("to-int4", minicpm5, out, "--format", "compressed-tensors", "--group-size", "64", "-q")
    assert code == 0, err
    from minicpm_convert.sources.int4 import Int4Source
    from tests.formats.test_int4 import transformers_logits

    src = Checkpoint(minicpm5)
    tokens = prompt_tokens(src, None, None)
    m = compare(reference.forward(Int4Source(out), tokens), transformers_logits(out, tokens))
    assert m["rel_err"] < 1e-3, m
    assert run_cli("verify", minicpm5, out)[0] == 0


def test_inspect(minicpm5):
    code, out, err = run_cli("inspect", minicpm5)
    assert code == 0, err
    assert "variant: llama" in out and "head_dim 64" in out and "muP" not in out


# -- MiniCPM4.1 ----------------------------------------------------------------------------------

def _factors(n, lo, hi):
    return [round(lo + (hi - lo) * i / (n - 1), 4) for i in range(n)]


@pytest.fixture
def minicpm4_1(fixture_path, tmp_path):
    """MiniCPM4.1-8B's structure: MiniCPM4 (LongRoPE, eps 1e-6, GQA) plus mup_denominator 32,
    65536 positions, its own LongRoPE factors (the original length equals the maximum)."""
    dest = tmp_path / "minicpm4.1"
    shutil.copytree(fixture_path("gqa"), dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(rms_norm_eps=1e-6, max_position_embeddings=65536, mup_denominator=32,
               rope_scaling={"rope_type": "longrope", "short_factor": _factors(16, 0.98, 2.5),
                             "long_factor": _factors(16, 0.98, 60.0), "original_max_position_embeddings": 65536})
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_minicpm4_1_mup_denominator_changes_nothing(minicpm4_1):
    """transformers' MiniCPMConfig documents mup_denominator as the width denominator of
    speculative-decoding heads: the model's own residual scale stays scale_depth / sqrt(L)."""
    spec = Checkpoint(minicpm4_1).spec
    assert spec.residual_scale == pytest.approx(1.4 / 2 ** 0.5) and spec.rope_type == "longrope"


def test_minicpm4_1_every_command(minicpm4_1, tmp_path):
    from tests import llama_cpp_client as client

    assert run_cli("to-llama", minicpm4_1, tmp_path / "llama", "--dtype", "float32", "-q")[0] == 0
    m = transformers_parity(minicpm4_1, tmp_path / "llama")
    assert m["rel_err"] < 1e-4 and m["top1"] == 1.0, m
    code, _, err = run_cli("to-gguf", minicpm4_1, tmp_path / "m.gguf", "--quant", "f32", "-q")
    assert code == 0, err
    src = Checkpoint(minicpm4_1)
    tokens = prompt_tokens(src, None, None)
    m = compare(reference.forward(src, tokens), client.logits(tmp_path / "m.gguf", tokens))
    assert m["rel_err"] < 2e-3 and m["top1"] == 1.0, m
    assert run_cli("to-int4", minicpm4_1, tmp_path / "int4", "-q")[0] == 0
    code, out, err = run_cli("verify", minicpm4_1, tmp_path / "llama", tmp_path / "m.gguf", tmp_path / "int4")
    assert code == 0, out + err


# -- refused by name -----------------------------------------------------------------------------

@pytest.mark.parametrize("changes,says", [
    ({"model_type": "minicpm_sala", "architectures": ["MiniCPMSALAForCausalLM"]}, "MiniCPM-SALA"),
    ({"model_type": "minicpm_eagle", "architectures": ["EagleMiniCPMForCausalLM"]}, "speculative-decoding draft"),
    ({"model_type": "llama", "architectures": ["DSparkDraftForCausalLM"]}, "speculative-decoding draft"),
    ({"model_type": "minicpmv4_6", "architectures": ["MiniCPMV4_6ForConditionalGeneration"]}, "MiniCPM-V 4.x"),
])
@pytest.mark.parametrize("command", ["to-llama", "to-gguf", "to-int4", "verify", "inspect"])
def test_refused_by_name_in_every_command(changes, says, command, fixture_path, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(fixture_path("tiny"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))
    args = {"to-gguf": [tmp_path / "o.gguf"], "verify": [src], "inspect": []}.get(command, [tmp_path / "o"])
    code, _, err = run_cli(command, src, *args)
    assert code == 2 and says in err and "not supported by any command" in err, err
    assert len(err.strip().splitlines()) == 1
