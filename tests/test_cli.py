"""The command line end to end: exit codes, one-line errors, nothing left behind, --force."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli


def cli(*args, **kw):
    """The installed console script in a real process (no in-process shortcuts)."""
    return subprocess.run([sys.executable, "-m", "minicpm_convert", *map(str, args)], capture_output=True,
                          text=True, **kw)


def test_help_lists_every_command():
    r = cli("--help")
    assert r.returncode == 0
    for cmd in ("to-llama", "to-gguf", "verify", "inspect"):
        assert cmd in r.stdout


def test_convert_then_verify_passes_with_json(tmp_path, fixture_path):
    src = fixture_path("gqa")
    assert run_cli("to-llama", src, tmp_path / "llama", "-q")[0] == 0
    assert run_cli("to-gguf", src, tmp_path / "m.gguf", "--quant", "q4_K_M", "-q")[0] == 0
    code, out, err = run_cli("verify", src, tmp_path / "llama", tmp_path / "m.gguf", "--json", tmp_path / "r.json")
    assert code == 0, out + err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is True
    kinds = {e["kind"]: e for e in report["exports"]}
    assert set(kinds) == {"llama-float16", "gguf-q4_K_M"}
    for e in kinds.values():
        assert e["passed"] and e["failures"] == [] and e["worst_tensor"]["worst_over_bound"] <= 1
        assert len(e["tensors"]) >= 2 * 9 + 2  # every tensor was checked
    # A float16 export rounds each folded weight once: the distributions stay equal to ~1e-6 (KL), and
    # only a position whose two best tokens are that close can swap them (1 of 510 on this text).
    text = kinds["llama-float16"]["text"]
    assert text["kl_max"] < 1e-4 and text["top1"] >= 0.99
    assert 0 < kinds["gguf-q4_K_M"]["text"]["kl_mean"] < 1


def test_verify_fails_a_broken_export(tmp_path, fixture_path):
    """An export whose residual scale was not folded (a classic mistake) must fail, exit 1."""
    out = tmp_path / "llama"
    assert run_cli("to-llama", fixture_path("tiny"), out, "--dtype", "float32", "-q")[0] == 0
    shard = out / "model-00001-of-00001.safetensors"
    tensors = load_file(shard)
    for name in tensors:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[name] = tensors[name] / 0.7  # undo scale_depth/sqrt(4)
    save_file(tensors, shard, metadata={"format": "pt"})
    code, out_text, _ = run_cli("verify", fixture_path("tiny"), out, "--tokens", "1,20,300,400,500,600,700,800")
    assert code == 1 and "FAIL llama: tensor 'model.layers" in out_text and "o_proj.weight' (float32)" in out_text


def test_existing_output_needs_force(tmp_path, fixture_path):
    dest = tmp_path / "m.gguf"
    dest.write_bytes(b"precious")
    r = cli("to-gguf", fixture_path("tiny"), dest, "--quant", "q8_0")
    assert r.returncode == 2 and "already exists (use --force to overwrite)" in r.stderr
    assert dest.read_bytes() == b"precious"
    assert run_cli("to-gguf", fixture_path("tiny"), dest, "--quant", "q8_0", "--force", "-q")[0] == 0
    assert dest.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("command", [["to-llama"], ["to-gguf", "--quant", "q4_K_M"]])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(command, tmp_path, fixture_path):
    src = tmp_path / "src"
    shutil.copytree(fixture_path("tiny"), src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.3.mlp.down_proj.weight"][0, 0] = float("inf")  # late tensor: fails mid-write
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    dest = tmp_path / "out" / ("m.gguf" if "to-gguf" in command else "llama")
    r = cli(command[0], src, dest, *command[1:])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "tensor 'model.layers.3.mlp.down_proj.weight' contains Inf" in lines[0]
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # no temporary left either


def test_unknown_quant_type(tmp_path, fixture_path):
    r = cli("to-gguf", fixture_path("tiny"), tmp_path / "m.gguf", "--quant", "q9_K")
    assert r.returncode == 2 and "--quant: unknown type 'q9_K'" in r.stderr


def test_quant_aliases(tmp_path, fixture_path):
    assert run_cli("to-gguf", fixture_path("tiny"), tmp_path / "a.gguf", "--quant", "q4km", "-q")[0] == 0


def test_inspect(fixture_path, tmp_path):
    code, out, _ = run_cli("inspect", fixture_path("tiny"))
    assert code == 0 and "variant: minicpm" in out and "muP: scale_emb 12" in out
    assert run_cli("to-gguf", fixture_path("tiny"), tmp_path / "m.gguf", "--quant", "q4_K_M", "-q")[0] == 0
    code, out, _ = run_cli("inspect", tmp_path / "m.gguf")
    assert code == 0 and "q4_K_M" in out and "blk.0.attn_v.weight" in out and "Q6_K" in out


def test_deterministic_outputs(tmp_path, fixture_path):
    import hashlib
    digests = []
    for i in range(2):
        dest = tmp_path / f"m{i}.gguf"
        assert run_cli("to-gguf", fixture_path("odd"), dest, "--quant", "q4_K_M", "-q")[0] == 0
        digests.append(hashlib.sha256(dest.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_inspect_int4_export(tmp_path, fixture_path):
    assert run_cli("to-int4", fixture_path("tiny"), tmp_path / "q", "-q")[0] == 0
    code, out, err = run_cli("inspect", tmp_path / "q")
    assert code == 0, err
    assert "quantization: gptq" in out and "qweight" in out
