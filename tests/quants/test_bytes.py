"""Byte identity of every quantizer with llama.cpp itself: ``ggml_quantize_chunk`` from the
installed libggml-base (ctypes), with and without an importance array, on hard data.

Each case is quantized three ways: the NumPy port, the compiled kernel (what production runs,
through the same registry call, at every instruction-set level the CPU has: portable C, AVX2,
AVX-512) and llama.cpp; all must give the very same bytes.  Where
llama.cpp aborts (a GGML_ASSERT in the IQ codebook searches, on weights that overflow float32),
both of ours must refuse with ValueError instead of writing anything."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from minicpm_convert.quants import registry
from minicpm_convert.quants.registry import FORMATS, REQUIRED, quantize

try:  # tests/quants as a package, or (default rootdir import) as a plain directory
    from . import ggml_oracle
    from .cases import CASES, IMPORTANCE, each_simd_level, importance, make
except ImportError:
    import ggml_oracle
    from cases import CASES, IMPORTANCE, each_simd_level, importance, make

pytest.importorskip("llama_cpp")

BLOCKS = [t for t in FORMATS if t not in registry.FLOATS]
GRID = {QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS, QT.IQ3_S}  # may abort in llama.cpp
SLOW = GRID  # their NumPy ports are slow: smaller inputs
compiled = pytest.mark.skipif(not registry.compiled_types(), reason="the C extension is not built")


@pytest.fixture(scope="module")
def ggml():
    g = ggml_oracle.load()
    assert g is not None, "llama_cpp is installed but its libggml-base library was not found"
    return g


def llama_cpp_bytes(ggml, qtype: QT, x, qw):
    """llama.cpp's bytes, or None where it aborts."""
    if qtype in GRID:
        return ggml.quantize_chunk_or_abort(qtype.name, x, qw)
    return ggml.quantize_chunk(qtype.name, x, qw)


def ours(x, qtype, qw, backend):
    try:
        return quantize(x, qtype, qw, backend=backend)
    except ValueError as e:
        assert "llama.cpp aborts" in str(e), e
        return None


def assert_same(got, want, qtype: QT, what: str):
    if want is None or got is None:
        assert got is None and want is None, f"{qtype.name} {what}: llama.cpp {'aborts' if want is None else 'writes'}, "\
                                             f"ours {'refuses' if got is None else 'writes'}"
        return
    assert got.dtype == np.uint8 and got.shape == want.shape, (got.shape, want.shape)
    if not np.array_equal(got, want):
        size = FORMATS[qtype].type_size
        a, b = got.reshape(-1, size), want.reshape(-1, size)
        bad = np.flatnonzero((a != b).any(axis=1))
        i = bad[0]
        cols = np.flatnonzero(a[i] != b[i])
        pytest.fail(f"{qtype.name} {what}: {bad.size}/{a.shape[0]} blocks differ; first block {i}, bytes "
                    f"{cols[:12].tolist()}: ours {a[i, cols[:12]].tolist()} llama.cpp {b[i, cols[:12]].tolist()}")


def shape_for(qtype: QT) -> tuple[int, int]:
    return (2, 512) if qtype in SLOW else (4, 2304)


def check(ggml, qtype, x, qw, what):
    want = llama_cpp_bytes(ggml, qtype, x, qw)
    assert_same(ours(x, qtype, qw, "numpy"), want, qtype, f"{what} (NumPy)")
    if qtype in registry.compiled_types():
        for level in each_simd_level():  # every instruction set this CPU has: the same bytes
            assert_same(ours(x, qtype, qw, "c"), want, qtype, f"{what} (C, SIMD level {level})")
    else:
        assert not registry.compiled_types(), f"{qtype.name}: no compiled kernel"


@pytest.mark.parametrize("kind", IMPORTANCE)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("qtype", BLOCKS, ids=lambda t: t.name)
def test_matches_llama_cpp(ggml, qtype, case, kind):
    if kind == "none" and FORMATS[qtype].importance == REQUIRED:
        pytest.skip("llama.cpp asserts an importance array for this type")
    x = make(case, shape_for(qtype))
    check(ggml, qtype, x, importance(kind, x.shape[1]), f"{case}/{kind}")


@pytest.mark.parametrize("qtype", [t for t in BLOCKS if FORMATS[t].block == 32], ids=lambda t: t.name)
@pytest.mark.parametrize("n", [5760, 160, 96])
def test_rows_not_divisible_by_256(ggml, qtype, n):
    """32-weight types on rows that 256-weight types cannot take (llama-quantize's fallbacks)."""
    x = make("outlier_columns", (6, n), seed=2)
    x[1] *= np.float32(1e-3)  # rows of different scale: the importance paths use each row's variance
    for kind in IMPORTANCE:
        check(ggml, qtype, x, importance(kind, n), f"n={n}/{kind}")


@pytest.mark.parametrize("qtype", BLOCKS, ids=lambda t: t.name)
def test_many_rows_with_an_importance_array(ggml, qtype):
    """The importance array is one weight per column, shared by every row (and by the super-blocks
    of a row at their own offsets)."""
    rows, n = (8, 768) if qtype in SLOW else (48, 2304)
    x = make("outlier_columns", (rows, n), seed=3)
    x[::3] *= np.float32(40.0)
    check(ggml, qtype, x, importance("random", n, seed=4), "many rows")


def test_ggml_type_numbers_match_gguf():
    for name, value in ggml_oracle.GGML_TYPE.items():
        assert QT[name].value == value


@compiled
def test_compiled_kernels_are_the_registry_default():
    """Production (backend None) runs the C kernel of every block type."""
    assert registry.compiled_types() >= set(BLOCKS)
