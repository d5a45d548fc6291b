"""--force and --json never destroy what minicpm-convert did not write.

Each case runs the CLI and compares the sha256 of every file in the user's folder and in the
source checkpoint before and after; the legitimate flows (replace our own earlier export, write
a GGUF into a folder, overwrite a plain file with --force) keep working."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli


def sums(*folders: Path) -> dict[str, str]:
    """sha256 of every file under the folders (links followed), keyed by path."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def src(fixture_path, tmp_path) -> Path:
    dest = tmp_path / "src"
    shutil.copytree(fixture_path("tiny"), dest)
    return dest


@pytest.fixture
def user_folder(tmp_path) -> Path:
    """A folder of someone's own files (a nested one too)."""
    folder = tmp_path / "models"
    (folder / "old").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "old" / "model.gguf").write_bytes(b"GGUF not really")
    return folder


def refused(code: int, err: str, *words: str) -> bool:
    return code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and all(w in err for w in words)


def test_gguf_into_a_folder_writes_inside_it_under_llama_cpps_name(src, user_folder):
    before = sums(user_folder, src)
    code, _, err = run_cli("to-gguf", src, user_folder, "--quant", "q8_0", "--force", "-q")
    assert code == 0, err
    new = [p for p in user_folder.iterdir() if p.suffix == ".gguf"]
    assert len(new) == 1 and new[0].name.endswith("-Q8_0.gguf") and f"wrote {new[0]}" in err
    after = sums(user_folder, src)
    assert {k: v for k, v in after.items() if k != str(new[0])} == before


@pytest.mark.parametrize("command", [["to-llama"], ["to-int4"]])
def test_folder_export_never_replaces_a_folder_of_user_files(command, src, user_folder):
    before = sums(user_folder, src)
    code, _, err = run_cli(command[0], src, user_folder, *command[1:], "--force", "-q")
    assert refused(code, err, "did not write", "notes.txt") or refused(code, err, "did not write", "old")
    assert sums(user_folder, src) == before


@pytest.mark.parametrize("command", [["to-llama"], ["to-int4"]])
def test_folder_export_never_replaces_the_source(command, src):
    before = sums(src)
    code, _, err = run_cli(command[0], src, src, *command[1:], "--force", "-q")
    assert refused(code, err, "the source checkpoint")
    assert sums(src) == before


def test_folder_export_never_replaces_a_folder_holding_the_source(src):
    parent = src.parent
    (parent / "minicpm-convert.json").write_text(json.dumps({"tool": "minicpm-convert", "files": ["src"]}))
    before = sums(parent)
    code, _, err = run_cli("to-llama", src, parent, "--force", "-q")
    assert refused(code, err, "contains the source checkpoint")
    assert sums(parent) == before


def test_folder_export_never_goes_inside_the_source(src):
    before = sums(src)
    code, _, err = run_cli("to-llama", src, src / "llama", "-q")
    assert refused(code, err, "inside the source checkpoint")
    assert sums(src) == before and not (src / "llama").exists()


def test_gguf_never_replaces_the_source_weights(src):
    before = sums(src)
    code, _, err = run_cli("to-gguf", src, src / "model.safetensors", "--force", "-q")
    assert refused(code, err, "refusing to replace", "input of this command")
    assert sums(src) == before


def test_gguf_into_the_source_folder_adds_a_file_and_never_replaces_one(src):
    """As llama.cpp's converter does by default; a second run would replace a file inside the source."""
    before = sums(src)
    assert run_cli("to-gguf", src, src, "--quant", "q8_0", "-q")[0] == 0
    added = set(sums(src)) - set(before)
    assert len(added) == 1
    after = sums(src)
    code, _, err = run_cli("to-gguf", src, src, "--quant", "q8_0", "--force", "-q")
    assert refused(code, err, "inside the source checkpoint") or refused(code, err, "input of this command")
    assert sums(src) == after


def test_verify_json_needs_force_and_never_replaces_an_input(src, tmp_path):
    export = tmp_path / "llama"
    assert run_cli("to-llama", src, export, "-q")[0] == 0
    before = sums(src, export)
    for target in (src / "model.safetensors", src / "config.json", export / "config.json"):
        for force in ([], ["--force"]):
            code, _, err = run_cli("verify", src, export, "--json", target, *force)
            assert refused(code, err, "refusing to replace"), (target, force, err)
    assert sums(src, export) == before
    mine = tmp_path / "report.json"
    mine.write_text("keep me")
    code, _, err = run_cli("verify", src, export, "--json", mine)
    assert refused(code, err, "already exists (use --force") and mine.read_text() == "keep me"
    assert run_cli("verify", src, export, "--json", mine, "--force")[0] == 0
    assert json.loads(mine.read_text())["passed"] is True
    assert run_cli("verify", src, export, "--json", tmp_path)[0] == 0  # a folder: verify.json inside
    assert json.loads((tmp_path / "verify.json").read_text())["passed"] is True


# -- symbolic links: a link to the source is the source ------------------------------------------

def test_links_to_the_source_are_the_source(src, tmp_path):
    before = sums(src)
    (tmp_path / "link-to-src").symlink_to(src, target_is_directory=True)
    (tmp_path / "link-to-weights").symlink_to(src / "model.safetensors")
    (tmp_path / "link-to-config.json").symlink_to(src / "config.json")
    dotted = tmp_path / "models" / ".." / "src"
    for args in (["to-llama", src, tmp_path / "link-to-src", "--force"],
                 ["to-int4", src, tmp_path / "link-to-src", "--force"],
                 ["to-llama", src, dotted, "--force"],
                 ["to-llama", tmp_path / "link-to-src", src, "--force"],
                 ["to-gguf", src, tmp_path / "link-to-weights", "--force"],
                 ["to-gguf", tmp_path / "link-to-src", src / "model.safetensors", "--force"]):
        code, _, err = run_cli(*args, "-q")
        assert code == 2 and "refusing" in err, (args, err)
    code, _, err = run_cli("to-llama", src, tmp_path / "e", "-q")
    assert code == 0, err
    code, _, err = run_cli("verify", src, tmp_path / "e", "--json", tmp_path / "link-to-config.json", "--force")
    assert refused(code, err, "refusing to replace")
    assert sums(src) == before


def test_hub_cache_blobs_are_the_source(src, tmp_path):
    """The Hugging Face cache: snapshot entries are links into blobs/; a path to a blob is the source."""
    cache = tmp_path / "models--openbmb--x"
    blobs, snap = cache / "blobs", cache / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = blobs / hashlib.sha256(f.name.encode()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    before = sums(blobs)
    weights_blob = (snap / "model.safetensors").resolve()
    code, _, err = run_cli("to-gguf", snap, weights_blob, "--force", "-q")
    assert refused(code, err, "refusing to replace")
    code, _, err = run_cli("to-llama", snap, cache, "--force", "-q")
    assert code == 2 and "refusing" in err
    assert sums(blobs) == before


# -- the legitimate flows ------------------------------------------------------------------------

def test_force_replaces_our_own_export_keeping_files_a_user_added(src, tmp_path):
    out = tmp_path / "llama"
    assert run_cli("to-llama", src, out, "-q")[0] == 0
    (out / "NOTES.md").write_text("my notes about this export")
    code, _, err = run_cli("to-llama", src, out, "-q")
    assert refused(code, err, "already exists", "--force")
    assert run_cli("to-llama", src, out, "--dtype", "float32", "--force", "-q")[0] == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert (out / "NOTES.md").read_text() == "my notes about this export"
    manifest = json.loads((out / "minicpm-convert.json").read_text())
    assert "NOTES.md" not in manifest["files"] and set(manifest["files"]) == {p.name for p in out.iterdir()} - {"NOTES.md"}
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name or ".partial-" in p.name]


def test_force_keeps_the_old_export_when_the_new_one_fails(src, tmp_path):
    out = tmp_path / "llama"
    assert run_cli("to-llama", src, out, "-q")[0] == 0
    before = sums(out)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.3.mlp.down_proj.weight"][0, 0] = float("nan")  # fails late, mid-write
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli("to-llama", src, out, "--force", "-q")
    assert refused(code, err, "contains NaN")
    assert sums(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "src"]


def test_an_empty_folder_takes_an_export(src, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert run_cli("to-int4", src, out, "-q")[0] == 0
    assert (out / "config.json").is_file() and (out / "minicpm-convert.json").is_file()


def test_force_replaces_a_plain_file(src, tmp_path):
    dest = tmp_path / "m.gguf"
    dest.write_bytes(b"old")
    assert run_cli("to-gguf", src, dest, "--quant", "q8_0", "--force", "-q")[0] == 0
    assert dest.read_bytes()[:4] == b"GGUF"
