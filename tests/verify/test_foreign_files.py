"""verify holds files minicpm-convert did not write to the same rules: llama.cpp's own converter
and llama-quantize (from the converter's f16 file) give correct files, and they pass."""

from __future__ import annotations

import pytest

from minicpm_convert.formats.gguf.plan import FILE_TYPES
from tests.conftest import run_cli
from tests.llama_cpp_source import convert

TOKENS = "1,20,300,400,500,600,700,800,900,1000"
QUANTIZED = ["q8_0", "q4_0", "q4_K_M", "q5_K_M", "q6_K"]


@pytest.mark.parametrize("name", ["tiny", "gqa", "odd", "untied"])
def test_llama_cpps_converter_and_quantizer_pass(name, fixture_path, tmp_path):
    from tests import llama_cpp_client as client

    src = fixture_path(name)
    files = [convert(src, tmp_path / f"{t}.gguf", t) for t in ("f32", "f16", "bf16", "q8_0")]
    for quant in QUANTIZED:
        client.quantize(files[1], tmp_path / f"from-f16-{quant}.gguf", int(FILE_TYPES[quant].ftype))
        files.append(tmp_path / f"from-f16-{quant}.gguf")
    code, out, err = run_cli("verify", src, *files, "--tokens", TOKENS)
    assert code == 0, out + err
    assert out.count("pass") >= len(files)


def test_llama_quantize_with_an_importance_matrix_passes(fixture_path, tmp_path):
    """llama-quantize --imatrix (the tool itself: it records quantize.imatrix.* in the file, which
    tells verify the encoder weighted the columns) of llama.cpp's own f16 file."""
    import subprocess

    from tests.requirements import require
    from tests.test_imatrix import CALIBRATION

    tools = require("llama.cpp tools")
    src = fixture_path("tiny")
    f16 = convert(src, tmp_path / "f16.gguf", "f16")
    imatrix = tmp_path / "imatrix.gguf"
    r = subprocess.run([str(tools / "llama-imatrix"), "-m", str(f16), "-f", str(CALIBRATION), "-c", "128", "-o",
                        str(imatrix), "-t", "2", "--no-ppl"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    files = []
    for ftype in ("Q4_K_M", "Q3_K_M", "IQ4_XS", "IQ3_XXS", "IQ2_M", "Q5_K_S"):
        out = tmp_path / f"{ftype}.gguf"
        r = subprocess.run([str(tools / "llama-quantize"), "--imatrix", str(imatrix), str(f16), str(out), ftype, "2"],
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        files.append(out)
    code, out, err = run_cli("verify", src, *files, "--tokens", TOKENS)
    assert code == 0, out + err
