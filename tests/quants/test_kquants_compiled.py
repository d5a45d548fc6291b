"""The compiled quantizers (minicpm_convert/quants/_kquants.c) against the NumPy port and llama.cpp.

The NumPy port stays the oracle: every case of test_kquants, random data at several scales and
the scalar C path all give the very same bytes as the vector (lane-major) C path."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from minicpm_convert.quants import ggml as qggml
from minicpm_convert.quants import kquants

try:  # tests/quants as a package, or (default rootdir import) as a plain directory
    from . import ggml_oracle
    from .test_kquants import CASES, make
except ImportError:
    import ggml_oracle
    from test_kquants import CASES, make

compiled = kquants._compiled
pytestmark = pytest.mark.skipif(compiled is None, reason="the C extension is not built")

K_TYPES = {"Q4_K": kquants.quantize_q4_k, "Q5_K": kquants.quantize_q5_k, "Q6_K": kquants.quantize_q6_k}


def numpy_path(fn, x, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(kquants, "use_compiled", False)
        return fn(x)


def scalar_c_path(fn, x):
    compiled._set_lanes(False)
    try:
        return fn(x)
    finally:
        compiled._set_lanes(True)


def random_inputs():
    rng = np.random.default_rng(7)
    for scale in (1e-3, 2e-2, 1.0, 300.0):
        x = (rng.standard_normal((24, 1024)) * scale).astype(np.float32)
        x[:, rng.integers(0, 1024, 5)] *= 40  # outlier columns
        x[1, 256:512] = 0.0  # a zero super-block
        x[2, 40:56] = 0.0  # a zero Q6_K group
        x[3, :256] = np.abs(x[3, :256])  # all-positive block (min clamped to 0)
        x[4, 512:768] = scale  # constant block
        x[5] = np.round(x[5] / scale * 4) * scale / 4  # many ties
        yield x


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("type_name", sorted(K_TYPES))
def test_compiled_equals_numpy_on_every_case(type_name, case, monkeypatch):
    fn = K_TYPES[type_name]
    x = make(case, seed=11)
    want = numpy_path(fn, x, monkeypatch)
    assert np.array_equal(fn(x), want), f"{type_name} {case}: vector C differs from NumPy"
    assert np.array_equal(scalar_c_path(fn, x), want), f"{type_name} {case}: scalar C differs from NumPy"


@pytest.mark.parametrize("type_name", sorted(K_TYPES))
def test_compiled_equals_numpy_and_llama_cpp_on_random_data(type_name, monkeypatch):
    fn = K_TYPES[type_name]
    g = ggml_oracle.load()
    for x in random_inputs():
        ours = fn(x)
        assert np.array_equal(ours, numpy_path(fn, x, monkeypatch)), type_name
        assert np.array_equal(ours, scalar_c_path(fn, x)), type_name
        if g is not None:
            assert np.array_equal(ours.view(np.uint8).reshape(-1),
                                  np.asarray(g.quantize_chunk(type_name, x)).view(np.uint8).reshape(-1)), type_name


def test_compiled_q8_0_and_f16_equal_numpy_on_finite_data():
    for x in random_inputs():
        q8 = np.empty((x.size // 32, 34), np.uint8)
        compiled.q8_0(x, q8)
        assert np.array_equal(q8.reshape(-1), qggml.quantize(x, QT.Q8_0).reshape(-1))
        h = np.empty(x.shape, np.float16)
        compiled.f16(x, h)
        assert np.array_equal(h.view(np.uint16), qggml.quantize(x, QT.F16).view(np.uint16))
    edge = np.array([0.0, -0.0, 65504, 65519.99, 2.9802322e-08, 2.9802326e-08, 5.9604645e-08, 8.940697e-08,
                     6.1035156e-05, 6.1e-05, 1e-30, -1e-45], np.float32)
    h = np.empty(edge.shape, np.float16)
    compiled.f16(edge, h)
    assert np.array_equal(h.view(np.uint16), qggml.quantize(edge, QT.F16).view(np.uint16))
    # GGML_FP32_TO_FP16 beyond the finite range: overflow -> inf, NaN -> 0x7E00 | sign
    odd = np.array([65520, -65520, 1e9, np.inf, -np.inf, np.nan, -np.nan], np.float32)
    h = np.empty(odd.shape, np.float16)
    compiled.f16(odd, h)
    assert h.view(np.uint16).tolist() == [0x7C00, 0xFC00, 0x7C00, 0x7C00, 0xFC00, 0x7E00, 0xFE00]


def test_compiled_kernels_reject_wrong_sizes():
    with pytest.raises(ValueError):
        compiled.q4_k(np.zeros(300, np.float32), np.zeros(144, np.uint8))
    with pytest.raises(ValueError):
        compiled.q4_k(np.zeros(256, np.float32), np.zeros(143, np.uint8))
