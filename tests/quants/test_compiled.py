"""The compiled kernels (csrc/, built into quants._kquants) against their oracle, the NumPy ports,
on data beyond the hard cases; and the properties the writer relies on: whole rows in any
chunking and any number of threads give the same bytes, wrong sizes are refused."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from minicpm_convert.quants import iq_grids, registry
from minicpm_convert.quants.registry import FORMATS, REQUIRED, quantize

try:
    from .cases import each_simd_level, importance
except ImportError:
    from cases import each_simd_level, importance

pytestmark = pytest.mark.skipif(not registry.compiled_types(), reason="the C extension is not built")
_c = registry._compiled
BLOCKS = sorted((t for t in FORMATS if t not in registry.FLOATS), key=int)
SLOW = {QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS, QT.IQ3_S}


def random_inputs(n: int, rows: int):
    rng = np.random.default_rng(7)
    for scale in (1e-3, 2e-2, 1.0, 300.0):
        x = (rng.standard_normal((rows, n)) * scale).astype(np.float32)
        x[:, rng.integers(0, n, 5)] *= 40  # outlier columns
        x[1, 256:512] = 0.0  # a zero super-block
        x[2, 40:56] = 0.0  # a zero 16-group
        x[3, :256] = np.abs(x[3, :256])  # all-positive block
        x[4, 512:768] = scale  # constant block
        x[5] = np.round(x[5] / scale * 4) * scale / 4  # many ties
        yield scale, x


def qw_for(qtype, n, kind):
    if kind == "none" and FORMATS[qtype].importance == REQUIRED:
        kind = "random"
    return importance(kind, n, seed=11)


@pytest.mark.parametrize("kind", ["none", "random", "zeros"])
@pytest.mark.parametrize("qtype", BLOCKS, ids=lambda t: t.name)
def test_compiled_equals_numpy(qtype, kind):
    n, rows = (768, 6) if qtype in SLOW else (2304, 24)
    qw = qw_for(qtype, n, kind)
    for scale, x in random_inputs(n, rows):
        want = quantize(x, qtype, qw, backend="numpy")
        for level in each_simd_level():
            c = quantize(x, qtype, qw, backend="c")
            assert np.array_equal(c, want), f"{qtype.name} scale {scale} SIMD level {level}"


@pytest.mark.parametrize("qtype", BLOCKS, ids=lambda t: t.name)
def test_row_chunks_and_threads_do_not_change_bytes(qtype, monkeypatch):
    """The writer quantizes a tensor in row chunks on several threads (the GIL is released)."""
    n, rows = (512, 12) if qtype in SLOW else (2304, 40)
    x = next(random_inputs(n, rows))[1]
    qw = qw_for(qtype, n, "random")
    whole = quantize(x, qtype, qw)
    with ThreadPoolExecutor(4) as pool:
        parts = list(pool.map(lambda s: quantize(x[s:s + 3], qtype, qw), range(0, rows, 3)))
    assert np.array_equal(np.concatenate(parts), whole)
    monkeypatch.setattr(registry, "_NUMPY_CHUNK_VALUES", 7)  # NumPy: one row per chunk
    assert np.array_equal(quantize(x, qtype, qw, backend="numpy"), whole)


def test_compiled_kernels_check_sizes():
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError):
        _c.quantize(int(QT.Q4_K), x, np.zeros(287, np.uint8), 256, None)
    with pytest.raises(ValueError):
        _c.quantize(int(QT.Q4_K), np.zeros(300, np.float32), np.zeros(144, np.uint8), 256, None)
    with pytest.raises(ValueError):
        _c.quantize(int(QT.Q4_K), x, np.zeros(288, np.uint8), 256, np.zeros(255, np.float32))
    with pytest.raises(ValueError):
        _c.quantize(int(QT.Q4_K), x, np.zeros(288, np.uint8), 200, None)
    with pytest.raises(ValueError):
        _c.quantize(int(QT.MXFP4), x, np.zeros(288, np.uint8), 256, None)


def test_codebooks_are_gguf_pys_decoding_grids():
    """Our copy of llama.cpp's codebooks decodes to the grids gguf-py dequantizes with."""
    from gguf import quants as gq

    for name in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"):
        cls = getattr(gq, name)
        cls.init_grid()
        t = iq_grids.tables(name)
        levels = (t.grid.astype(np.int32) - 1) // 2
        assert np.array_equal(np.array(cls.grid_map, np.float32)[levels], cls.grid.reshape(t.grid.shape)), name


def test_codebook_tables():
    """index and neighbour lists as llama.cpp's init builds them: every point maps to itself,
    each candidate list holds the points at the nwant smallest distances, in (distance, index) order."""
    for name, nwant in (("IQ2_XXS", 2), ("IQ2_XS", 2), ("IQ2_S", 1), ("IQ3_XXS", 2), ("IQ3_S", 3)):
        t = iq_grids.tables(name)
        levels = (t.grid.astype(np.int64) - 1) // 2
        packed = (levels << (t.bits * np.arange(t.group))).sum(axis=1)
        assert np.array_equal(t.index[packed], np.arange(t.grid.shape[0]))
        assert (t.index >= 0).sum() == t.grid.shape[0]
        rng = np.random.default_rng(1)
        for u in rng.choice(np.flatnonzero(t.count > 0), 50, replace=False):
            pos = 2 * ((u >> (t.bits * np.arange(t.group))) & ((1 << t.bits) - 1)) + 1
            d2 = ((t.grid.astype(np.int64) - pos) ** 2).sum(axis=1)
            want = [j for j in np.lexsort((np.arange(d2.size), d2)) if d2[j] in np.unique(d2)[:nwant]]
            got = t.flat[t.start[u]:t.start[u] + t.count[u]].tolist()
            assert got == want, (name, u)
