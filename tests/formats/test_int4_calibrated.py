"""to-int4 --calibration (GPTQ): transformers + compressed-tensors loads the export and matches
our reference on its dequantized weights; the same command gives the same bytes whatever the
thread count; GPTQ lowers the error of each block's output on the calibration activations; bad
calibration files are one line and exit 2, with nothing written."""

from __future__ import annotations

import hashlib

import pytest
import torch

from minicpm_convert.sources.checkpoint import Checkpoint
from minicpm_convert.verify import prompt_tokens
from tests.conftest import ROOT, run_cli
from tests.formats.test_int4 import transformers_logits
from tests.requirements import require

CALIBRATION = ROOT / "tests" / "data" / "calibration.md"
SMALL = ("--samples", "8", "--seq-len", "128")


def calibrated(fixture_path, out, *extra):
    code, _, err = run_cli("to-int4", fixture_path("gqa"), out, "--format", "compressed-tensors", "--group-size", "64",
                           "--calibration", CALIBRATION, *SMALL, "-q", *extra)
    assert code == 0, err
    return out


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def gptq_export(tmp_path_factory, fixture_path):
    return calibrated(fixture_path, tmp_path_factory.mktemp("gptq") / "ct")


def test_transformers_loads_the_gptq_export(gptq_export, fixture_path):
    require("compressed_tensors")
    from minicpm_convert import reference
    from minicpm_convert.sources.int4 import Int4Source
    from minicpm_convert.verify import compare

    tokens = prompt_tokens(Checkpoint(fixture_path("gqa")), None, None)
    got = transformers_logits(gptq_export, tokens)
    same_weights = compare(reference.forward(Int4Source(gptq_export), tokens), got)
    assert same_weights["rel_err"] < 1e-3, same_weights


def test_same_bytes_whatever_the_thread_count(gptq_export, fixture_path, tmp_path, monkeypatch):
    monkeypatch.setenv("MINICPM_CONVERT_THREADS", "1")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = calibrated(fixture_path, tmp_path / "again")
    finally:
        torch.set_num_threads(before)
    assert digests(again) == digests(gptq_export)


def test_act_order_export_has_trivial_g_idx(fixture_path, tmp_path):
    code, _, err = run_cli("to-int4", fixture_path("tiny"), tmp_path / "g", "--group-size", "64", "--calibration",
                           CALIBRATION, *SMALL, "--act-order", "-q")
    assert code == 0, err
    from minicpm_convert.sources.int4 import Int4Source
    source = Int4Source(tmp_path / "g")  # refuses a g_idx that is not arange(in) // group_size
    source.dequantized("model.layers.0.mlp.down_proj.weight")


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"  \n\t\n", "is empty"),
    (b"PK\x03\x04\x00\x00binary", "not a text file"),
    (b"\xff\xfe\xfa not utf-8", "not UTF-8 text"),
    (b"only a few words of text", "needs 1024 (give more text, or fewer or shorter samples)"),
])
def test_bad_calibration_file_is_one_line_exit_2(content, message, fixture_path, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_bytes(content)
    code, out, err = run_cli("to-int4", fixture_path("tiny"), tmp_path / "out", "--calibration", text, *SMALL)
    assert code == 2, out + err
    assert message in err and str(text) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (("--samples", "0"), "--samples: must be at least 1"),
    (("--seq-len", "1"), "--seq-len: must be at least 2"),
    (("--seq-len", "100000"), "--seq-len 100000 exceeds max_position_embeddings"),
])
def test_bad_calibration_options(args, message, fixture_path, tmp_path):
    code, _, err = run_cli("to-int4", fixture_path("tiny"), tmp_path / "out", "--calibration", CALIBRATION, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_act_order_needs_calibration(fixture_path, tmp_path):
    code, _, err = run_cli("to-int4", fixture_path("tiny"), tmp_path / "out", "--act-order")
    assert code == 2 and "--act-order: needs --calibration" in err


def test_missing_calibration_file(fixture_path, tmp_path):
    code, _, err = run_cli("to-int4", fixture_path("tiny"), tmp_path / "out", "--calibration", tmp_path / "nope.txt")
    assert code == 2 and "nope.txt" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_awq_holds_the_same_gptq_codes_as_compressed_tensors(fixture_path, tmp_path):
    """--calibration with --format awq: the GPTQ codes in AWQ's layout, weight for weight those of
    the compressed-tensors export made by the same command (asymmetric both)."""
    from minicpm_convert.formats.hf.int4 import is_projection
    from minicpm_convert.sources.int4 import Int4Source

    awq = Int4Source(calibrated(fixture_path, tmp_path / "awq", "--format", "awq"))
    ct = Int4Source(calibrated(fixture_path, tmp_path / "ct", "--asym"))
    assert awq.kind == "int4-awq" and not ct.scheme.sym
    for name in (n for n in awq.names() if is_projection(n)):
        assert torch.equal(awq.dequantized(name), ct.dequantized(name)), name


def test_verify_passes_the_gptq_export_on_the_compensated_bound(gptq_export, fixture_path):
    """GPTQ moves groups by steps to cancel output error: verify holds its projections to the
    error-compensated INT4 bound (`/gptq`, fidelity.py) and passes it; a data-free export keeps
    the per-group bound."""
    import json
    from minicpm_convert.sources.int4 import Int4Source

    assert Int4Source(gptq_export).storage_type("model.layers.0.mlp.down_proj.weight") == "int4-g64-sym/gptq"
    code, out, err = run_cli("verify", fixture_path("gqa"), gptq_export, "--json", gptq_export.parent / "v.json")
    assert code == 0, out + err
    tensors = json.loads((gptq_export.parent / "v.json").read_text())["exports"][0]["tensors"]
    assert {t["storage"] for t in tensors if "down_proj" in t["name"]} == {"int4-g64-sym/gptq"}


def tampered(export, tmp_path, key, entry):
    """A copy of `export` whose rescaling file has entry `entry` of `key` times 3; (its folder, the
    file's metadata)."""
    import shutil
    from safetensors import safe_open
    from safetensors.torch import save_file
    from minicpm_convert.formats.hf import int4_rescale

    bad = tmp_path / "bad"
    shutil.copytree(export, bad)
    with safe_open(str(bad / int4_rescale.FILE), framework="pt") as f:
        metadata, scales = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    scales[key] = scales[key].clone()
    scales[key][entry] *= 3
    save_file(scales, str(bad / int4_rescale.FILE), metadata=metadata)
    return bad, metadata


def test_tampered_rescaling_of_a_gptq_export_fails_verify(gptq_export, fixture_path, tmp_path):
    """One entry of the rescaling file times 3: the looser bound of a GPTQ export could let that
    row through, so verify computes the rescaling again from the source and names the entry."""
    from minicpm_convert.formats.hf import int4_rescale

    key = "model.layers.1.mlp.down_proj"
    bad, metadata = tampered(gptq_export, tmp_path, key, 7)
    assert metadata == {"method": int4_rescale.METHOD}
    code, out, err = run_cli("verify", fixture_path("gqa"), bad)
    assert code == 1, out + err
    assert f"rescaling '{key}' entry 7" in out


# -- AWQ's activation-aware scales (--method awq, awq-gptq) ---------------------------------------

@pytest.fixture(scope="module")
def awq_gptq_export(tmp_path_factory, fixture_path):
    return calibrated(fixture_path, tmp_path_factory.mktemp("awq") / "ct", "--method", "awq-gptq")


@pytest.mark.parametrize("method", ["awq", "awq-gptq"])
def test_transformers_loads_the_awq_scaled_export(method, awq_gptq_export, fixture_path, tmp_path):
    """transformers + compressed-tensors computes, with the scaled norms the export holds, the
    logits our reference gives on its dequantized weights; verify passes it."""
    require("compressed_tensors")
    from minicpm_convert import reference
    from minicpm_convert.sources.int4 import Int4Source
    from minicpm_convert.verify import compare

    export = awq_gptq_export if method == "awq-gptq" else calibrated(fixture_path, tmp_path / "awq", "--method", "awq")
    tokens = prompt_tokens(Checkpoint(fixture_path("gqa")), None, None)
    same_weights = compare(reference.forward(Int4Source(export), tokens), transformers_logits(export, tokens))
    assert same_weights["rel_err"] < 1e-3, same_weights
    code, out, err = run_cli("verify", fixture_path("gqa"), export)
    assert code == 0, out + err


def test_awq_scales_are_folded_into_the_norms(awq_gptq_export, fixture_path):
    """Each norm that feeds projections is the source's times c (float16), the projections' columns
    are divided by c (what the codes approximate), the scales are in rescaling.safetensors beside
    the data-free Sinkhorn pairs, and the method says so."""
    from safetensors import safe_open
    from minicpm_convert.formats.hf import int4_rescale
    from minicpm_convert.sources.int4 import Int4Source
    from minicpm_convert.stream import llama_stream

    with safe_open(str(awq_gptq_export / int4_rescale.FILE), framework="pt") as f:
        metadata, scales = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert metadata == {"method": f"{int4_rescale.METHOD}+{int4_rescale.AWQ_METHOD}"}
    source = {j.name: j for j in llama_stream(Checkpoint(fixture_path("gqa")))}
    export = Int4Source(awq_gptq_export)
    groups = int4_rescale.norm_scales(export.spec)
    assert {g.key for g in groups} <= scales.keys()
    scaled = 0
    for group in groups:
        c = scales[group.key]
        scaled += not torch.equal(c, torch.ones_like(c))
        assert torch.equal(export.read(group.norm), (source[group.norm].read_all() * c).half().float())
        for name in group.cols:
            want = source[name].read_all()
            if name.endswith(("v_proj.weight", "up_proj.weight")):  # also a Sinkhorn pair's rows
                pair = next(p for p in int4_rescale.pairs(export.spec) if p.rows == name)
                want = want * scales[pair.key][:, None]
            got = export.read(name)
            assert float((got - want / c).norm() / (want / c).norm()) < 0.2, name
    assert scaled >= 2  # calibration activations are not flat: AWQ scaled most groups
    import json
    report = json.loads((awq_gptq_export / "quantization_report.json").read_text())
    assert report["method"].startswith("gptq-act-order (8 x 128 tokens of calibration.md)")
    assert report["method"].endswith("awq-scaled q/k/v and gate/up, sinkhorn-rescaled o/down")
    assert report["awq_alpha"].keys() == {g.key for g in groups}


def test_tampered_awq_scale_fails_verify_on_its_norm(awq_gptq_export, fixture_path, tmp_path):
    """AWQ's scales come from the calibration text, so verify cannot compute them again; one entry
    times 3 fails on the float16 norm it was folded into, named with its bound."""
    key = "model.layers.1.post_attention_layernorm"
    bad, _ = tampered(awq_gptq_export, tmp_path, key, 5)
    code, out, err = run_cli("verify", fixture_path("gqa"), bad)
    assert code == 1, out + err
    assert f"tensor '{key}.weight' (float16)" in out


def test_awq_same_bytes_whatever_the_thread_count(awq_gptq_export, fixture_path, tmp_path, monkeypatch):
    monkeypatch.setenv("MINICPM_CONVERT_THREADS", "1")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = calibrated(fixture_path, tmp_path / "again", "--method", "awq-gptq")
    finally:
        torch.set_num_threads(before)
    assert digests(again) == digests(awq_gptq_export)


@pytest.mark.parametrize("args, message", [
    (("--method", "awq"), "--method awq: needs --calibration"),
    (("--calibration", CALIBRATION, "--method", "awq", "--act-order"), "--act-order: is GPTQ's column order"),
])
def test_bad_method_options(args, message, fixture_path, tmp_path):
    code, _, err = run_cli("to-int4", fixture_path("tiny"), tmp_path / "out", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
