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
