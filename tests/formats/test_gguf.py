"""to-gguf, proven by llama.cpp: it loads every file, its logits match the MiniCPM reference,
its own quantizer produces the same bytes, and it tokenizes as the checkpoint's tokenizer.json does
(a corpus of real texts on real vocabularies: test_vocab.py)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from minicpm_convert import reference
from minicpm_convert.sources.checkpoint import Checkpoint
from minicpm_convert.formats.gguf.plan import FILE_TYPES
from minicpm_convert.verify import compare, prompt_tokens
from tests import llama_cpp_client as client
from tests.conftest import run_cli

QUANTIZED = ["q8_0", "q4_0", "q4_K_M", "q5_K_M", "q6_K"]
# bf16 is judged like the quantized types: ggml's CPU bf16 dot product rounds the activations to
# bf16 too (vec_dot_type BF16), so llama.cpp's logits carry ~8-bit activation error whatever the file.
FLOATS = ["f32", "f16"]
REQUANTIZED = ["bf16", *QUANTIZED]
FIXTURES = ["tiny", "gqa", "untied", "odd"]


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, fixture_path):
    out = tmp_path_factory.mktemp("gguf")
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


def tensors(path):
    return [(t.name, t.tensor_type, tuple(t.shape.tolist()), np.asarray(t.data).view(np.uint8).tobytes())
            for t in GGUFReader(path).tensors]


@pytest.mark.parametrize("arch", ["minicpm", "llama"])
@pytest.mark.parametrize("quant", REQUANTIZED)
@pytest.mark.parametrize("name", FIXTURES)
def test_bytes_identical_to_llama_quantize(name, quant, arch, gguf_file, tmp_path):
    """Every tensor's type, shape and bytes equal llama-quantize's from an f32 GGUF of the same weights."""
    theirs = tmp_path / "llama-quantize.gguf"
    client.quantize(gguf_file(name, "f32", arch), theirs, int(FILE_TYPES[quant].ftype))
    ours, want = tensors(gguf_file(name, quant, arch)), tensors(theirs)
    assert [t[0] for t in ours] == [t[0] for t in want], "tensor order differs"
    for (n, qt, shape, data), (_, wqt, wshape, wdata) in zip(ours, want):
        assert (qt, shape) == (wqt, wshape), n
        assert data == wdata, f"{n} ({qt.name}): bytes differ"


def _llama_cpp_vs_reference(path, src, tokens):
    return compare(reference.forward(src, tokens), client.logits(path, tokens))


@pytest.mark.parametrize("arch", ["minicpm", "llama"])
@pytest.mark.parametrize("quant", FLOATS)
@pytest.mark.parametrize("name", FIXTURES)
def test_llama_cpp_float_logits_match_reference(name, quant, arch, gguf_file, fixture_path):
    """f32: lossless, only float32 summation order differs (measured <= 7e-7 of the largest logit);
    f16: one f16 rounding of every weight, and ggml's f16 dot product rounds the activations to f16
    too (measured <= 5.6e-4)."""
    src = Checkpoint(fixture_path(name))
    tokens = prompt_tokens(src, None, None)
    m = _llama_cpp_vs_reference(gguf_file(name, quant, arch), src, tokens)
    assert m["rel_err"] < (1e-5 if quant == "f32" else 2e-3), m
    assert m["top1"] == 1.0, m


@pytest.mark.parametrize("arch", ["minicpm", "llama"])
@pytest.mark.parametrize("quant", REQUANTIZED)
@pytest.mark.parametrize("name", FIXTURES)
def test_llama_cpp_quantized_logits_match_llama_cpps_own_conversion(name, quant, arch, gguf_file, fixture_path,
                                                                     tmp_path):
    """The bound for a quantized file is what llama.cpp itself gets on its own quantization of the
    same weights (llama-quantize of the f32 file); ours must do as well, and agree on top-1. Both
    architectures: the folded --arch llama files run in llama.cpp too."""
    src = Checkpoint(fixture_path(name))
    tokens = prompt_tokens(src, None, None)
    theirs = tmp_path / "theirs.gguf"
    client.quantize(gguf_file(name, "f32", arch), theirs, int(FILE_TYPES[quant].ftype))
    ref = reference.forward(src, tokens)
    ours_logits = client.logits(gguf_file(name, quant, arch), tokens)
    ours, bound = compare(ref, ours_logits), compare(ref, client.logits(theirs, tokens))
    assert ours["rel_err"] <= bound["rel_err"] * 1.0001 + 1e-6, (ours, bound)
    assert ours["kl"] <= bound["kl"] * 1.0001 + 1e-9, (ours, bound)
    assert ours["top1"] >= bound["top1"], (ours, bound)


PLAIN_TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "大海是蓝色的。我们明天去北京，好吗？",
    "spaces:  two,   three,\tand a tab\nnew line",
    "emoji 🙂🚀 and mixed 中文 English 123456789",
    "control bytes \x01\x02\x7f end",
    "   leading spaces",
    "<用户>你好，请介绍一下你自己。<AI>我是一个语言模型。",  # chat tags are text in MiniCPM-2B's vocabulary
    "<用户>hi there<AI>",
    "<reserved_0>你好，请介绍一下你自己。<reserved_1>我是一个语言模型。",  # user-defined pieces: vocabulary
]


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_llama_cpp_tokenizes_like_the_checkpoint_tokenizer(text, gguf_file, fixture_path):
    from tokenizers import Tokenizer

    want = Tokenizer.from_file(str(fixture_path("tiny") / "tokenizer.json")).encode(text).ids
    assert client.tokenize(gguf_file("tiny", "q8_0"), text) == want
