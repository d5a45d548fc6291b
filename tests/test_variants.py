"""Variants: what works is proven by a real client; what cannot be converted exactly is refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from minicpm_convert import reference
from minicpm_convert.sources.checkpoint import Checkpoint
from minicpm_convert.verify import compare, prompt_tokens
from tests.conftest import run_cli, transformers_parity


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
    out = tmp_path / "llama"
    code, _, err = run_cli("to-llama", minicpm_2b_128k, out, "--dtype", "float32", "-q")
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == {"type": "dynamic", "factor": 4.0} and cfg["rope_theta"] == 1e6
    m = transformers_parity(minicpm_2b_128k, out)
    assert m["rel_err"] < 1e-4 and m["top1"] == 1.0, m
    assert run_cli("to-int4", minicpm_2b_128k, tmp_path / "int4", "-q")[0] == 0
    assert run_cli("verify", minicpm_2b_128k, out, tmp_path / "int4")[0] == 0


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
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 32, "long_factor": [1.0] * 32,
                       "original_max_position_embeddings": 1024}}, "to-gguf", "attention scale that llama.cpp does not apply"),
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


def _factors(n, lo, hi):
    return [round(lo + (hi - lo) * i / (n - 1), 4) for i in range(n)]


@pytest.fixture
def minicpm4(fixture_path, tmp_path):
    """MiniCPM4-0.5B's structure: GQA, LongRoPE (rope_type longrope, short and long factors),
    eps 1e-6, no dim_model_base (defaults to 256), sparse_config."""
    folder = derived(fixture_path, tmp_path, "gqa", rms_norm_eps=1e-6, max_position_embeddings=4096,
                     rope_scaling={"rope_type": "longrope", "short_factor": _factors(16, 1.0, 3.0),
                                   "long_factor": _factors(16, 1.0, 40.0), "original_max_position_embeddings": 4096},
                     sparse_config={"kernel_size": 32, "dense_len": 8192})
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["dim_model_base"]
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_minicpm4_spec_defaults(minicpm4):
    spec = Checkpoint(minicpm4).spec
    assert spec.variant == "minicpm-longrope" and spec.dim_model_base == 256 and spec.rms_norm_eps == 1e-6


def test_minicpm4_llama_format_matches_in_transformers(minicpm4, tmp_path):
    out = tmp_path / "llama"
    code, _, err = run_cli("to-llama", minicpm4, out, "--dtype", "float32", "-q")
    assert code == 0, err
    assert "sparse attention (sparse_config) is not carried over" in err
    assert json.loads((out / "config.json").read_text())["rope_scaling"]["rope_type"] == "longrope"
    m = transformers_parity(minicpm4, out)
    assert m["rel_err"] < 1e-4 and m["top1"] == 1.0, m
    assert run_cli("verify", minicpm4, out)[0] == 0


def test_minicpm4_int4_verifies(minicpm4, tmp_path):
    """INT4 keeps the LongRoPE config. (dim_model_base is restored to the fixture's 64: without it the
    logits of these random weights are 4x sharper and 4-bit noise alone exceeds the INT4 bound.)"""
    cfg = json.loads((minicpm4 / "config.json").read_text())
    cfg["dim_model_base"] = 64
    (minicpm4 / "config.json").write_text(json.dumps(cfg))
    assert run_cli("to-int4", minicpm4, tmp_path / "int4", "--format", "compressed-tensors", "-q")[0] == 0
    assert json.loads((tmp_path / "int4" / "config.json").read_text())["rope_scaling"]["rope_type"] == "longrope"
    code, out, err = run_cli("verify", minicpm4, tmp_path / "int4")
    assert code == 0, out + err


def test_longrope_changes_the_logits(minicpm4):
    """The factors matter: without them the reference gives other logits (so the tests above test them)."""
    src = Checkpoint(minicpm4)
    tokens = prompt_tokens(src, None, None)
    plain = Checkpoint(minicpm4)
    object.__setattr__(plain, "spec", type(src.spec)(**{**src.spec.__dict__, "rope_scaling": None}))
    m = compare(reference.forward(src, tokens), reference.forward(plain, tokens))
    assert m["kl"] > 1e-3, m


@pytest.mark.parametrize("arch", ["minicpm", "llama"])
def test_minicpm4_gguf_runs_in_llama_cpp(minicpm4, tmp_path, arch):
    from gguf import GGUFReader

    from tests import llama_cpp_client as client

    out = tmp_path / "m.gguf"
    code, _, err = run_cli("to-gguf", minicpm4, out, "--quant", "f32", "--arch", arch, "-q")
    assert code == 0, err
    names = [t.name for t in GGUFReader(out).tensors]
    outside_blocks = [n for n in names if not n.startswith("blk.")]
    assert {"rope_factors_long.weight", "rope_factors_short.weight"} <= set(outside_blocks)
    assert outside_blocks == sorted(outside_blocks) == names[:len(outside_blocks)]
    src = Checkpoint(minicpm4)
    tokens = prompt_tokens(src, None, None)
    m = compare(reference.forward(src, tokens), client.logits(out, tokens))
    assert m["rel_err"] < 2e-3 and m["top1"] == 1.0, m
    assert run_cli("verify", minicpm4, out)[0] == 0


@pytest.fixture(scope="module")
def minicpm_1b(tmp_path_factory):
    """MiniCPM-1B's structure: GQA 24/8 heads, intermediate 2.5x hidden, tied, bf16 (small sizes)."""
    from fixtures.make_fixtures import copy_tokenizer_files, make_config, tokenizer_size, write_checkpoint

    out = tmp_path_factory.mktemp("minicpm-1b")
    cfg = make_config(hidden_size=384, num_hidden_layers=3, num_attention_heads=24, num_key_value_heads=8,
                      intermediate_size=960, vocab_size=tokenizer_size(), dim_model_base=256)
    write_checkpoint(out, cfg, torch.bfloat16, seed=1)
    copy_tokenizer_files(out)
    return out


def test_minicpm_1b_all_commands(minicpm_1b, tmp_path):
    from minicpm_convert.formats.gguf.plan import FILE_TYPES
    from tests import llama_cpp_client as client
    from tests.formats.test_gguf import tensors

    src = Checkpoint(minicpm_1b)
    assert (src.spec.num_attention_heads, src.spec.num_key_value_heads) == (24, 8)
    tokens = prompt_tokens(src, None, None)
    ref = reference.forward(src, tokens)
    assert run_cli("to-llama", minicpm_1b, tmp_path / "llama", "--dtype", "float32", "-q")[0] == 0
    m = transformers_parity(minicpm_1b, tmp_path / "llama")
    assert m["rel_err"] < 1e-4 and m["top1"] == 1.0, m
    for quant in ("f32", "q4_K_M"):
        assert run_cli("to-gguf", minicpm_1b, tmp_path / f"{quant}.gguf", "--quant", quant, "-q")[0] == 0
    client.quantize(tmp_path / "f32.gguf", tmp_path / "theirs.gguf", int(FILE_TYPES["q4_K_M"].ftype))
    assert tensors(tmp_path / "q4_K_M.gguf") == tensors(tmp_path / "theirs.gguf")
    m = compare(ref, client.logits(tmp_path / "f32.gguf", tokens))
    assert m["rel_err"] < 2e-3 and m["top1"] == 1.0, m
    assert run_cli("to-int4", minicpm_1b, tmp_path / "int4", "--group-size", "64", "-q")[0] == 0
    code, out, err = run_cli("verify", minicpm_1b, tmp_path / "llama", tmp_path / "f32.gguf", tmp_path / "q4_K_M.gguf",
                             tmp_path / "int4")
    assert code == 0, out + err
