"""The registry API (minicpm_convert.quants): shapes and dtypes, refusals, importance arrays, the
float conversions bit for bit, dequantization as llama.cpp's, and what quantization costs."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from minicpm_convert.quants import FORMATS, SUPPORTED, dequantize, quantize, registry
from minicpm_convert.quants.registry import IGNORED, REQUIRED

try:
    from . import ggml_oracle
    from .cases import importance, make
except ImportError:
    import ggml_oracle
    from cases import importance, make

BLOCKS = sorted((t for t in FORMATS if t not in registry.FLOATS), key=int)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ggml():
    pytest.importorskip("llama_cpp")
    return ggml_oracle.load()


def qw_if_needed(qtype, n):
    return importance("random", n) if FORMATS[qtype].importance == REQUIRED else None


@pytest.mark.parametrize("qtype", BLOCKS, ids=lambda t: t.name)
def test_shapes_and_dtypes(qtype):
    x = make("normal_1", (2, 3, 512))
    qw = qw_if_needed(qtype, 512)
    fmt = FORMATS[qtype]
    q = quantize(x, qtype, qw)
    assert q.dtype == np.uint8 and q.shape == (2, 3, 512 // fmt.block * fmt.type_size)
    assert np.array_equal(q.reshape(6, -1), quantize(x.reshape(6, 512), qtype, qw))
    assert np.array_equal(quantize(x[0, 0], qtype, qw), q[0, 0])  # 1-D input
    assert quantize(np.zeros((0, 512), np.float32), qtype, qw).shape == (0, q.shape[-1])
    assert quantize(np.zeros((3, 0), np.float32), qtype, qw_if_needed(qtype, 0)).shape == (3, 0)


def test_float_types():
    x = make("normal_1", (2, 3, 512))
    assert quantize(x, QT.F32).dtype == np.float32
    assert quantize(x, QT.F16).dtype == np.float16
    bf = quantize(x, QT.BF16)
    assert bf.dtype == np.uint16 and bf.shape == x.shape
    assert np.array_equal(dequantize(bf, QT.BF16), bf.astype(np.uint32).__lshift__(16).view(np.float32))
    for t in (QT.F32, QT.F16, QT.BF16):
        assert quantize(np.zeros((0, 8), np.float32), t).shape == (0, 8)


def test_refusals():
    x = make("normal_1", (2, 512))
    with pytest.raises(NotImplementedError):
        quantize(x, QT.IQ1_S)  # left out: its ties follow the C library's unstable qsort
    for qtype in BLOCKS:
        with pytest.raises(ValueError, match="multiple"):
            quantize(np.zeros((2, FORMATS[qtype].block + 16), np.float32), qtype, qw_if_needed(qtype, 272))
    for qtype in (QT.IQ2_XXS, QT.IQ2_XS):  # ggml_quantize_requires_imatrix: llama.cpp asserts
        with pytest.raises(ValueError, match="importance matrix"):
            quantize(x, qtype)
    with pytest.raises(ValueError, match="importance array has"):
        quantize(x, QT.Q4_K, np.ones(256, np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        quantize(x, QT.Q4_K, np.full(512, np.inf, np.float32))
    with pytest.raises(ValueError, match="backend"):
        quantize(x, QT.Q4_K, backend="gpu")


@pytest.mark.parametrize("backend", ["numpy", "c"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("qtype", BLOCKS, ids=lambda t: t.name)
def test_non_finite_input_is_refused(qtype, bad, backend):
    """Both backends count NaN/Inf before quantizing (the compiled one in C, in the same call)."""
    if backend == "c" and qtype not in registry.compiled_types():
        pytest.skip("the C extension is not built")
    x = make("normal_1", (2, 512))
    x[1, 300] = bad
    x[0, 7] = bad
    with pytest.raises(ValueError, match="input holds 2 non-finite"):
        quantize(x, qtype, qw_if_needed(qtype, 512), backend=backend)


def test_ignored_importance_changes_nothing():
    """Q8_0 and the ternary types ignore the importance array, as ggml does."""
    x = make("normal_1", (2, 512))
    for qtype in BLOCKS:
        if FORMATS[qtype].importance == IGNORED:
            assert np.array_equal(quantize(x, qtype, importance("random", 512)), quantize(x, qtype))


def test_numpy_fallback_is_selected_by_the_environment():
    """MINICPM_CONVERT_NO_C=1: the registry uses the NumPy ports (the fallback without a compiler)."""
    code = ("from minicpm_convert.quants import registry; import numpy as np; "
            "from gguf import GGMLQuantizationType as QT; "
            "x = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32); "
            "print(registry.use_compiled, registry.quantize(x, QT.Q4_K).tobytes().hex()[:64])")
    env = dict(os.environ, MINICPM_CONVERT_NO_C="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    x = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    assert out.split() == ["False", quantize(x, QT.Q4_K).tobytes().hex()[:64]]


def _float_edge_bits() -> np.ndarray:
    rng = np.random.default_rng(6)
    parts = [
        rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32),
        np.arange(0x33000000 - 4096, 0x33000000 + 4096, dtype=np.uint32),  # fp16 subnormal/zero edge
        np.arange(0x38800000 - 65536, 0x38800000 + 4096, dtype=np.uint32),  # fp16 normal/subnormal edge
        np.arange(0x477FE000 - 4096, 0x47800000 + 4096, dtype=np.uint32),  # fp16 overflow edge
        np.array([0x7F800000, 0x7FC00000, 0x7F800001, 0x7FA00000, 0x7FFFFFFF, 0x7F802000, 0x00000001,
                  0x007FFFFF, 0x3F7FFFFF, 0x3F808000, 0x3F818000, 0x7F7FFFFF], np.uint32),
    ]
    b = np.concatenate(parts)
    return np.concatenate([b, b | np.uint32(0x80000000)])


def test_f16_bf16_match_llama_cpp(ggml, monkeypatch):
    x = _float_edge_bits().view(np.float32)
    want16 = ggml.fp32_to_fp16(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.array_equal(quantize(x, QT.F16).view(np.uint16), want16)  # compiled when built
        monkeypatch.setattr(registry, "use_compiled", False)
        assert np.array_equal(quantize(x, QT.F16).view(np.uint16), want16)  # NumPy
        assert np.array_equal(quantize(x, QT.BF16), ggml.fp32_to_bf16(x))
        f32 = quantize(x, QT.F32)
    assert np.array_equal(f32.view(np.uint32), x.view(np.uint32))


@pytest.mark.parametrize("case", ["normal_1", "outlier_columns", "zero_blocks", "single_nonzero", "one_big_subblock"])
@pytest.mark.parametrize("qtype", BLOCKS + [QT.F16, QT.BF16], ids=lambda t: t.name)
def test_dequantize_matches_llama_cpp(ggml, qtype, case):
    x = make(case, (2, 2304), seed=9)
    q = quantize(x, qtype, importance("random", 2304))
    got = dequantize(q, qtype)
    want = ggml.dequantize_row(qtype.name, q, x.shape[1])
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


# Relative RMS error of dequantize(quantize(x)) for N(0, s^2) weights, without an importance
# array: scale-free for s in [1e-2, 1e4]; the bounds are the measured values plus ~10%.  IQ2_XXS
# and IQ2_XS need an importance array: given ones, they weigh every column alike.  The ternary
# types are for ternary models (BitNet b1.58): on Gaussian weights most levels round to zero.
ROUNDTRIP_BOUND = {"Q8_0": 0.006, "Q6_K": 0.02, "Q5_K": 0.04, "Q4_K": 0.078, "Q5_1": 0.042, "Q5_0": 0.047,
                   "Q4_1": 0.086, "Q4_0": 0.095, "Q3_K": 0.165, "Q2_K": 0.33, "IQ4_NL": 0.084, "IQ4_XS": 0.085,
                   "IQ3_S": 0.176, "IQ3_XXS": 0.238, "IQ2_S": 0.29, "IQ2_XS": 0.33, "IQ2_XXS": 0.38,
                   "TQ2_0": 0.89, "TQ1_0": 0.89, "BF16": 0.002, "F32": 0.0}


@pytest.mark.parametrize("name", sorted(ROUNDTRIP_BOUND))
@pytest.mark.parametrize("scale", [1e-2, 1.0, 1e4])
def test_roundtrip_error(name, scale):
    qtype = QT[name]
    x = make("normal_1", (4, 2304), seed=7) * np.float32(scale)
    qw = np.ones(2304, np.float32) if FORMATS[qtype].importance == REQUIRED else None
    y = dequantize(quantize(x, qtype, qw), qtype)
    assert y.dtype == np.float32 and y.shape == x.shape
    rel = float(np.sqrt(np.mean((y.astype(np.float64) - x) ** 2) / np.mean(x.astype(np.float64) ** 2)))
    assert rel <= ROUNDTRIP_BOUND[name], rel


@pytest.mark.parametrize("qtype", [t for t in BLOCKS if FORMATS[t].importance != IGNORED], ids=lambda t: t.name)
def test_importance_lowers_the_weighted_error(qtype):
    """What an importance matrix is for: with llama.cpp's weights (the mean squared activation of
    each input column), the error that reaches the layer's output, sum_j qw_j (x_j - y_j)^2, is lower."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((16, 2304)) * 0.02).astype(np.float32)
    qw = (rng.standard_normal(2304) ** 2 * np.exp(rng.standard_normal(2304) * 1.5)).astype(np.float32)

    def weighted(q):
        return float((qw.astype(np.float64) * (dequantize(q, qtype).astype(np.float64) - x) ** 2).sum())

    with_qw = weighted(quantize(x, qtype, qw))
    if FORMATS[qtype].importance == REQUIRED:  # no plain path: compare with uniform importance
        without = weighted(quantize(x, qtype, np.ones_like(qw)))
    else:
        without = weighted(quantize(x, qtype))
    assert with_qw < without, (with_qw, without)


def test_supported_is_the_registry():
    assert SUPPORTED == frozenset(FORMATS)
    assert {QT.F32, QT.F16, QT.BF16, QT.Q2_K, QT.IQ4_XS, QT.IQ2_XXS, QT.TQ1_0} <= SUPPORTED
