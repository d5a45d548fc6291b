"""The importance matrix: ours equals llama-imatrix's on the same tokens and weights, feeds
to-gguf (in one step too) and llama-quantize byte for byte, and lowers the KL divergence on
held-out text for every type that uses one."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from minicpm_convert.formats.gguf import imatrix as imatrix_file
from tests.conftest import ROOT, run_cli
from tests.requirements import require

CALIBRATION = ROOT / "tests" / "data" / "calibration.md"  # a copy of this project's README (our own text)
CTX = 128


@pytest.fixture(scope="module")
def ours(tmp_path_factory, fixture_path):
    out = tmp_path_factory.mktemp("imatrix")
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            dest = out / f"{name}.imatrix.gguf"
            code, _, err = run_cli("imatrix", fixture_path(name), "--text", CALIBRATION, "--ctx", CTX, "-o", dest, "-q")
            assert code == 0, err
            made[name] = dest
        return made[name]
    return get


@pytest.mark.parametrize("name", ["tiny", "gqa", "moe"])
def test_same_values_as_llama_imatrix(name, ours, fixture_path, tmp_path):
    tools = require("llama.cpp tools")
    f32 = tmp_path / "f32.gguf"
    assert run_cli("to-gguf", fixture_path(name), f32, "--quant", "f32", "-q")[0] == 0
    theirs = tmp_path / "theirs.imatrix.gguf"
    # --parse-special: our text is encoded as the checkpoint's tokenizer.json encodes it, where the
    # chat markers in the text (`<用户>`, `<AI>`) are their added tokens; llama-imatrix reads them as
    # plain text unless told (and then routes ~1.3% of the moe fixture's tokens to other experts).
    r = subprocess.run([str(tools / "llama-imatrix"), "-m", str(f32), "-f", str(CALIBRATION), "-c", str(CTX),
                        "-o", str(theirs), "-t", "2", "--no-ppl", "--parse-special"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = imatrix_file.read(ours(name)), imatrix_file.read(theirs)
    assert set(a.entries) == set(b.entries) and a.chunk_count == b.chunk_count and a.chunk_size == b.chunk_size
    for key in a.entries:
        x, y = a.entries[key].sums.astype(np.float64), b.entries[key].sums.astype(np.float64)
        ca, cb = a.entries[key].counts, b.entries[key].counts
        if key.endswith("_exps.weight"):
            # A token whose 2nd and 3rd experts are within float32 rounding of each other may be
            # routed differently by llama.cpp's summation order: a handful of tokens per layer.
            assert ca.sum() == cb.sum() and np.abs(ca - cb).max() <= 0.002 * ca.sum(), (key, ca, cb)
        else:
            assert ca.tolist() == cb.tolist(), key
        for e in range(x.shape[0]):  # per expert for MoE
            if b.entries[key].counts[e] == 0:
                assert not x[e].any(), key
                continue
            cos = x[e] @ y[e] / np.linalg.norm(x[e]) / np.linalg.norm(y[e])
            assert cos >= 0.999, (key, e, cos)


def test_llama_quantize_reads_ours_and_one_step_is_the_same(ours, fixture_path, tmp_path):
    tools = require("llama.cpp tools")
    from gguf import GGUFReader

    src = fixture_path("tiny")
    f32 = tmp_path / "f32.gguf"
    assert run_cli("to-gguf", src, f32, "--quant", "f32", "-q")[0] == 0
    for quant, ftype in (("q4_K_M", "Q4_K_M"), ("iq3_xxs", "IQ3_XXS")):
        two = tmp_path / f"two-{quant}.gguf"
        one = tmp_path / f"one-{quant}.gguf"
        theirs = tmp_path / f"theirs-{quant}.gguf"
        assert run_cli("to-gguf", src, two, "--quant", quant, "--imatrix", ours("tiny"), "-q")[0] == 0
        assert run_cli("to-gguf", src, one, "--quant", quant, "--calibration", CALIBRATION, "--ctx", CTX, "-q")[0] == 0
        r = subprocess.run([str(tools / "llama-quantize"), "--imatrix", str(ours("tiny")), str(f32), str(theirs), ftype,
                            "2"], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        data = [[(t.name, t.tensor_type, np.asarray(t.data).tobytes()) for t in GGUFReader(p).tensors]
                for p in (two, one, theirs)]
        assert data[0] == data[1], "one step differs from two"
        assert data[0] == data[2], "differs from llama-quantize --imatrix"


# Every type whose quantizer uses the importance matrix (Q8_0 and the ternary types do not; the
# IQ2/IQ3_XXS types need one, so they have no plain file to compare with).
WEIGHTED = ["q2_K", "q3_K_S", "q3_K_M", "q3_K_L", "q4_0", "q4_1", "q5_0", "q5_1", "q4_K_S", "q4_K_M", "q5_K_S",
            "q5_K_M", "q6_K", "iq4_nl", "iq4_xs", "iq3_s", "iq3_m"]


def test_an_importance_matrix_lowers_the_kl_of_every_type(fixture_path, tmp_path):
    """Calibration on the first half of tests/data/calibration.md, held-out text its second half
    (unseen text of the same kind, as llama.cpp's published figures calibrate on wikitext's train
    split and score its test split)."""
    import json

    lines = CALIBRATION.read_text(encoding="utf-8").splitlines(keepends=True)
    calibration, held_out = tmp_path / "calibration.md", tmp_path / "held_out.md"
    calibration.write_text("".join(lines[: len(lines) // 2]), encoding="utf-8")
    held_out.write_text("".join(lines[len(lines) // 2:]), encoding="utf-8")
    src = fixture_path("tiny")
    matrix = tmp_path / "imatrix.gguf"
    code, _, err = run_cli("imatrix", src, "--text", calibration, "--ctx", CTX, "-o", matrix, "-q")
    assert code == 0, err
    files = []
    for quant in WEIGHTED:
        for mode in ("plain", "imatrix"):
            dest = tmp_path / f"{quant}-{mode}.gguf"
            extra = ["--imatrix", matrix] if mode == "imatrix" else []
            code, _, err = run_cli("to-gguf", src, dest, "--quant", quant, *extra, "-q")
            assert code == 0, err
            files.append(dest)
    report = tmp_path / "verify.json"
    code, out, err = run_cli("verify", src, *files, "--text", held_out, "--ctx", "256", "--json", report)
    assert code == 0, out + err
    kl = {Path(e["export"]).stem: e["text"]["kl_mean"] for e in json.loads(report.read_text())["exports"]}
    worse = [q for q in WEIGHTED if not kl[f"{q}-imatrix"] < kl[f"{q}-plain"]]
    assert not worse, {q: (kl[f"{q}-plain"], kl[f"{q}-imatrix"]) for q in worse}


@pytest.mark.parametrize("text,says", [
    ("", "is empty"),
    ("too short", "tokenizes to"),
    (b"\x00\x01binary", "not a text file"),
    (b"\xff\xfe\xfa", "not UTF-8"),
])
def test_bad_calibration_text_is_one_line(text, says, fixture_path, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    for args in (["imatrix", fixture_path("tiny"), "--text", path, "-o", tmp_path / "i.gguf"],
                 ["to-gguf", fixture_path("tiny"), tmp_path / "m.gguf", "--calibration", path]):
        code, _, err = run_cli(*args)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "i.gguf").exists() and not (tmp_path / "m.gguf").exists()
