"""Split GGUF (`--split-max-tensors`, `--split-max-size`), proven by llama.cpp: its `llama-gguf-split`
writes the same files from our unsplit file (keys, tensor index, offsets, data; the split keys in
another order), merges our set back into our file's tensors and keys,
and llama.cpp loads the set from its first file with the unsplit file's logits. verify and inspect
read a set; a set appears whole or not at all and --force replaces only files of ours."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from minicpm_convert.api import gguf_plan
from minicpm_convert.inspect import inspect
from tests.conftest import run_cli
from tests.requirements import require

TOKENS = [1, 20, 300, 400, 500, 600, 700, 800, 900, 1000]


def set_of(folder, stem="m") -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(stem))


def content(path) -> tuple[dict, list]:
    """(keys but split.*, [(name, type, shape, bytes)]) of a GGUF file."""
    r = GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith(("GGUF.", "split."))}
    return kv, [(t.name, t.tensor_type, tuple(t.shape.tolist()), np.asarray(t.data).tobytes()) for t in r.tensors]


def layout(path) -> tuple:
    """A GGUF file as bytes, but for the order of its keys: llama-gguf-split writes split.count
    after split.tensors.count, llama.cpp's converter (whose writer we use) before it."""
    r = GGUFReader(path)
    kv = {k: (f.types, f.contents()) for k, f in r.fields.items()}
    tensors = [(t.name, t.tensor_type, tuple(t.shape.tolist()), int(t.data_offset)) for t in r.tensors]
    data = path.read_bytes()
    start = min(t[3] for t in tensors)
    return kv, tensors, len(data), data[start:]


@pytest.fixture(scope="module")
def unsplit(tmp_path_factory, fixture_path):
    out = tmp_path_factory.mktemp("unsplit") / "m.gguf"
    code, _, err = run_cli("to-gguf", fixture_path("tiny"), out, "--quant", "q4_K_M", "-q")
    assert code == 0, err
    return out


def test_split_by_tensor_count_is_byte_identical_to_gguf_split(unsplit, fixture_path, tmp_path):
    tools = require("llama.cpp tools")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    code, out, err = run_cli("to-gguf", fixture_path("tiny"), ours / "m.gguf", "--quant", "q4_K_M",
                             "--split-max-tensors", "10", "-q")
    assert code == 0, err
    r = subprocess.run([str(tools / "llama-gguf-split"), "--split", "--split-max-tensors", "10", str(unsplit),
                        str(theirs / "m")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    names = [f"m-0000{i}-of-00004.gguf" for i in range(1, 5)]  # 38 tensors, 10 a file
    assert set_of(ours) == set_of(theirs) == names
    for name in names:
        assert layout(ours / name) == layout(theirs / name), name
    assert f"wrote {ours / names[0]}" in err


def test_split_by_size_follows_the_converters_rule_and_merges_back(unsplit, fixture_path, tmp_path):
    tools = require("llama.cpp tools")
    limit = 400_000
    code, _, err = run_cli("to-gguf", fixture_path("tiny"), tmp_path / "m.gguf", "--quant", "q4_K_M",
                           "--split-max-size", "400K", "-q")
    assert code == 0, err
    files = [tmp_path / n for n in set_of(tmp_path)]
    assert len(files) > 2 and files[0].name == f"m-00001-of-{len(files):05d}.gguf"
    sizes = [[int(t.n_bytes) for t in GGUFReader(f).tensors] for f in files]
    for k, tensors in enumerate(sizes):  # a file holds what fits, and the next file's first tensor did not
        assert sum(tensors) <= limit or len(tensors) == 1
        if k + 1 < len(sizes):
            assert sum(tensors) + sizes[k + 1][0] > limit
    plan = gguf_plan(fixture_path("tiny"), quant="q4_K_M", split_max_size="400K")  # --dry-run: each file's size
    assert [f["bytes"] for f in plan["files"]] == [f.stat().st_size for f in files]
    merged = tmp_path / "merged.gguf"
    r = subprocess.run([str(tools / "llama-gguf-split"), "--merge", str(files[0]), str(merged)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert content(merged) == content(unsplit)


def test_llama_cpp_loads_the_set_with_the_unsplit_files_logits(unsplit, fixture_path, tmp_path):
    from tests import llama_cpp_client as client

    code, _, err = run_cli("to-gguf", fixture_path("tiny"), tmp_path / "m.gguf", "--quant", "q4_K_M",
                           "--split-max-size", "1M", "-q")
    assert code == 0, err
    first = tmp_path / "m-00001-of-00002.gguf"
    assert torch.equal(client.logits(first, TOKENS), client.logits(unsplit, TOKENS))


def test_verify_and_inspect_read_a_set(fixture_path, tmp_path):
    src = fixture_path("tiny")
    code, _, err = run_cli("to-gguf", src, tmp_path / "m.gguf", "--quant", "q8_0", "--split-max-tensors", "7", "-q")
    assert code == 0, err
    first = tmp_path / "m-00001-of-00006.gguf"
    found = inspect(str(first))
    assert "split into 6 files" in found.title and len(found.tensors) == 38
    assert "split.count: 6" in found.facts
    code, out, err = run_cli("verify", src, first, "--tokens", ",".join(map(str, TOKENS)))
    assert code == 0 and "pass" in out, out + err
    assert "38 tensors within their bounds" in out
    # the other files are not a model of their own, and a set with a file missing is named as such
    code, _, err = run_cli("verify", src, tmp_path / "m-00003-of-00006.gguf", "--tokens", "1,20")
    assert code == 2 and "is file 3 of a split GGUF of 6; give its first file (m-00001-of-00006.gguf)" in err, err
    (tmp_path / "m-00004-of-00006.gguf").unlink()
    for command in (["verify", src, first, "--tokens", "1,20"], ["inspect", first]):
        code, _, err = run_cli(*command)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "m-00004-of-00006.gguf: missing (file 4 of the split GGUF m-00001-of-00006.gguf)" in err


def test_a_set_needs_force_and_force_replaces_only_our_own(fixture_path, tmp_path):
    src = fixture_path("tiny")
    user = tmp_path / "notes.txt"
    user.write_text("mine")
    old = tmp_path / "m.gguf"  # an earlier unsplit file under the same name: not part of any set
    assert run_cli("to-gguf", src, old, "--quant", "q8_0", "-q")[0] == 0
    assert run_cli("to-gguf", src, old, "--quant", "q8_0", "--split-max-tensors", "10", "-q")[0] == 0
    four = set_of(tmp_path)
    assert four == ["m-00001-of-00004.gguf", "m-00002-of-00004.gguf", "m-00003-of-00004.gguf",
                    "m-00004-of-00004.gguf", "m.gguf"]
    before = {n: (tmp_path / n).read_bytes() for n in four}
    code, _, err = run_cli("to-gguf", src, old, "--quant", "q4_0", "--split-max-tensors", "10", "-q")
    assert code == 2 and "m-00001-of-00004.gguf: already exists (use --force to overwrite)" in err, err
    code, _, err = run_cli("to-gguf", src, old, "--quant", "q4_0", "--split-max-tensors", "20", "-q")
    assert code == 2 and "m-00001-of-00004.gguf: an earlier export under this name (use --force" in err, err
    assert {n: (tmp_path / n).read_bytes() for n in four} == before
    # with --force, a set of another size replaces ours whole: no file of the old set is left
    assert run_cli("to-gguf", src, old, "--quant", "q4_0", "--split-max-tensors", "20", "--force", "-q")[0] == 0
    assert set_of(tmp_path) == ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf", "m.gguf"]
    assert (tmp_path / "m.gguf").read_bytes() == before["m.gguf"] and user.read_text() == "mine"
    assert GGUFReader(tmp_path / "m-00001-of-00002.gguf").fields["general.file_type"].contents() == 2  # q4_0
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_force_never_replaces_split_files_we_did_not_write(fixture_path, tmp_path):
    from tests.llama_cpp_source import convert

    src = fixture_path("tiny")
    # llama.cpp's converter's own set under the name ours would take
    convert(src, tmp_path / "m.gguf", "q8_0", "--split-max-tensors", "20")
    theirs = set_of(tmp_path)
    assert theirs == ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
    before = {n: (tmp_path / n).read_bytes() for n in theirs}
    code, _, err = run_cli("to-gguf", src, tmp_path / "m.gguf", "--quant", "q8_0", "--split-max-tensors", "20",
                           "--force", "-q")
    assert code == 2 and "m-00001-of-00002.gguf: was not written by minicpm-convert" in err, err
    # nor a stranger's file that merely has a split file's name
    (tmp_path / "m-00003-of-00003.gguf").write_text("not a GGUF")
    code, _, err = run_cli("to-gguf", src, tmp_path / "m.gguf", "--quant", "q8_0", "--split-max-tensors", "13",
                           "--force", "-q")
    assert code == 2 and "m-00003-of-00003.gguf: was not written by minicpm-convert" in err, err
    assert {n: (tmp_path / n).read_bytes() for n in theirs} == before
    assert set_of(tmp_path) == [*theirs, "m-00003-of-00003.gguf"]


def test_a_write_error_leaves_no_file_of_the_set(fixture_path, tmp_path):
    """File 1 (output_norm) is complete when file 2 (token_embd, 400 kB) exceeds the size limit."""
    from tests.hostile.test_interrupt import _file_size_limit

    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "minicpm_convert", "to-gguf", str(fixture_path("tiny")),
                             str(out / "m.gguf"), "--quant", "q8_0", "--split-max-tensors", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_file_size_limit(300_000))
    _, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "cannot write (File too large); nothing was written" in lines[0], err
    assert list(out.iterdir()) == []


def test_split_options_are_checked(fixture_path, tmp_path):
    src = fixture_path("tiny")
    for args, needle in ((["--split-max-size", "2X"], "--split-max-size: cannot read '2X'"),
                         (["--split-max-size", "0"], "--split-max-size: must be positive"),
                         (["--split-max-tensors", "-1"], "--split-max-tensors: must be positive")):
        code, _, err = run_cli("to-gguf", src, tmp_path / "m.gguf", *args, "-q")
        assert code == 2 and needle in err, err
    # a model that fits is one file under the plain name, without split keys (as the converter writes it)
    assert run_cli("to-gguf", src, tmp_path / "m.gguf", "--quant", "q8_0", "--split-max-size", "2G", "-q")[0] == 0
    assert set_of(tmp_path) == ["m.gguf"]
    assert not [k for k in GGUFReader(tmp_path / "m.gguf").fields if k.startswith("split.")]


def test_a_killed_runs_temporary_goes_whatever_the_file_count(fixture_path, tmp_path):
    """A run killed while writing a set leaves `.m.gguf.partial-PID` (named after the output, not the
    count); the next run for that output removes it, split or not."""
    dead = tmp_path / ".m.gguf.partial-999999999"
    dead.mkdir()
    (dead / "m-00001-of-00004.gguf").write_bytes(b"GGUF")
    code, _, err = run_cli("to-gguf", fixture_path("tiny"), tmp_path / "m.gguf", "--quant", "q8_0",
                           "--split-max-tensors", "20", "-q")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
