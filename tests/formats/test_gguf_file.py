"""GGUF files as written, read back with gguf-py (no llama.cpp needed): metadata, vocabulary
padding, and the direct float casts' bytes."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from minicpm_convert.sources.checkpoint import Checkpoint
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, fixture_path):
    out = tmp_path_factory.mktemp("gguf-file")
    cache = {}

    def make(name: str, quant: str, arch: str = "minicpm"):
        key = (name, quant, arch)
        if key not in cache:
            dest = out / f"{name}-{quant}-{arch}.gguf"
            code, _, err = run_cli("to-gguf", fixture_path(name), dest, "--quant", quant, "--arch", arch, "-q")
            assert code == 0, err
            cache[key] = dest
        return cache[key]
    return make


def test_metadata(gguf_file, fixture_path):
    r = GGUFReader(gguf_file("tiny", "q4_K_M"))
    kv = {k: f.contents() for k, f in r.fields.items()}
    spec = Checkpoint(fixture_path("tiny")).spec
    assert kv["general.architecture"] == "minicpm"
    assert kv["general.file_type"] == 15 and kv["general.quantization_version"] == 2
    assert kv["minicpm.embedding_scale"] == pytest.approx(spec.scale_emb)
    assert kv["minicpm.residual_scale"] == pytest.approx(spec.residual_scale)
    assert kv["minicpm.logit_scale"] == pytest.approx(spec.logit_scale)
    assert "output.weight" not in {t.name for t in r.tensors}  # tied
    assert len(kv["tokenizer.ggml.tokens"]) == spec.vocab_size
    assert "<用户>" in kv["tokenizer.chat_template"]
    llama = {k: f.contents() for k, f in GGUFReader(gguf_file("tiny", "q4_K_M", "llama")).fields.items()}
    assert llama["general.architecture"] == "llama" and "llama.logit_scale" not in llama


def test_untied_vocab_is_padded(gguf_file, fixture_path):
    r = GGUFReader(gguf_file("untied", "f16"))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    spec = Checkpoint(fixture_path("untied")).spec
    assert len(tokens) == spec.vocab_size and tokens[-1].startswith("[PAD")


def test_direct_float_casts_equal_the_float32_path():
    """Float files copy or cast stored rows directly; that must give the float32 path's bytes for
    every finite bf16 value and across the f32 range (subnormal to overflow)."""
    import torch
    from gguf import GGMLQuantizationType as T

    from minicpm_convert.formats.gguf.writer import encode

    bf16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    bf16 = bf16[torch.isfinite(bf16.float())]
    bf16 = bf16[: bf16.numel() // 32 * 32].reshape(-1, 32)
    assert np.array_equal(bf16.to(torch.float16).view(torch.int16).numpy(), encode(bf16.float(), T.F16).view(np.int16))
    f32 = torch.randn(4096, 256, generator=torch.Generator().manual_seed(0)) * torch.logspace(-9, 5, 256)
    assert np.array_equal(f32.to(torch.float16).view(torch.int16).numpy(), encode(f32, T.F16).view(np.int16))
