"""The compiled INT4 group search (csrc/int4.c) against its oracle, the NumPy port in
int4_search.py: the same codes, scales, zeros and error sums, bit for bit, at every instruction-set
level this CPU runs, on groups with the cases that trip a search (zeros, constants, ties, one sign,
outliers, float16-subnormal scales, caller's column weights, a partial batch of lanes)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from minicpm_convert.quants import int4_search, registry

try:
    from .cases import each_simd_level
except ImportError:
    from cases import each_simd_level

pytestmark = pytest.mark.skipif(registry.compiled_module() is None or
                                not hasattr(registry.compiled_module(), "int4_search"),
                                reason="the C extension is not built")


def hard_groups(n: int, scale: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((77, n)) * scale).astype(np.float32)  # 77: not a multiple of 8 or 16 lanes
    x[:, rng.integers(0, n, 3)] *= 12  # outlier columns
    x[1] = 0.0
    x[2] = np.abs(x[2])  # no negative value (asym: zero 1)
    x[3] = -np.abs(x[3])
    x[4] = scale  # constant
    x[5] = np.round(x[5] / scale * 4) * scale / 4  # many ties
    x[6, :] = 0.0
    x[6, 0] = scale  # one value
    x[7] = x[7] * 1e-4  # smaller groups among larger
    return x


def assert_same(want, got, what):
    for name, a, b in zip(("codes", "scales", "zeros", "errors"), want, got):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {name}"
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), f"{what}: {name} differ"


@pytest.mark.parametrize("search", [True, False])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("n", [32, 64, 128])
def test_compiled_equals_numpy(n, sym, search):
    rng = np.random.default_rng(n)
    for scale in (1e-7, 1e-3, 2e-2, 1.0, 300.0):  # 1e-7: scales are float16 subnormals
        x = hard_groups(n, scale, seed=int(scale * 1e7) % 1000 + n)
        for cw in (None, (rng.random(n) + 1e-3).astype(np.float32)):
            want = int4_search.search_groups_numpy(x, sym, search, cw)
            for level in each_simd_level():
                got = int4_search.search_groups(x, sym, search, cw)
                assert_same(want, got, f"scale {scale}, column weights {cw is not None}, SIMD level {level}")


def test_overflowing_scale_is_refused_by_both():
    x = np.full((3, 32), 1e6, np.float32)
    for fn in (int4_search.search_groups_numpy, int4_search.search_groups):
        with pytest.raises(ValueError, match="too large for float16"):
            fn(x, True, True)


def test_groups_in_any_split_and_threads_give_the_same_bits():
    """The writer runs row chunks on a thread pool (the kernel releases the GIL)."""
    x = hard_groups(64, 2e-2, seed=5)
    x = np.concatenate([x] * 8)
    whole = int4_search.search_groups(x, False, True)
    cuts = [0, 1, 17, 100, 333, len(x)]
    with ThreadPoolExecutor(4) as pool:
        parts = list(pool.map(lambda ab: int4_search.search_groups(x[ab[0]:ab[1]], False, True),
                              zip(cuts, cuts[1:])))
    joined = tuple(np.concatenate(p) for p in zip(*parts))
    assert_same(whole, joined, "split")


def test_search_is_never_worse_than_plain_rounding_in_its_error_sums():
    x = hard_groups(64, 2e-2, seed=9)
    for sym in (True, False):
        _, _, _, errors = int4_search.search_groups(x, sym, True)
        found, plain, total = errors.T
        assert (total > 0).sum() == len(x) - 1  # the all-zero group
        # scored in the weighted measure; in the plain squared error, the search wins on the whole
        assert found.sum() < plain.sum()


def test_sixteen_lanes_on_any_cpu(tmp_path):
    """The AVX-512 build runs 16 groups side by side; on a CPU without AVX-512 (where the test above
    stops at level 1) the same 16-lane code is built here for the portable target and checked
    against the oracle, partial batch included."""
    import ctypes
    import shutil
    import subprocess
    from pathlib import Path

    csrc = Path(int4_search.__file__).parent / "csrc"
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc, "a C compiler builds the extension; none found"
    src = tmp_path / "int4_16.c"
    src.write_text('#include "common.h"\n#define NL 16\n#define LANES_ATTR\n#include "lanes.h"\n'
                   '#define LANES_FN(name) name##_t16\n#include "int4_lanes.h"\n')
    lib = tmp_path / "int4_16.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-ffp-contract=off", "-fno-fast-math", "-Wno-psabi",
                    f"-I{csrc}", str(src), "-o", str(lib), "-lm"], check=True)
    fn = ctypes.CDLL(str(lib)).mc_int4_t16
    fn.restype = ctypes.c_int
    p = ctypes.c_void_p
    fn.argtypes = [p, p, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int, p, p, p, p]
    rng = np.random.default_rng(16)
    for n in (32, 128):
        x = hard_groups(n, 2e-2, seed=n)
        for sym in (True, False):
            for cw in (None, (rng.random(n) + 1e-3).astype(np.float32)):
                want = int4_search.search_groups_numpy(x, sym, True, cw)
                got = (np.empty((len(x), n), np.uint8), np.empty(len(x), np.float32), np.empty(len(x), np.uint8),
                       np.empty((len(x), 3), np.float32))
                assert fn(x.ctypes.data, None if cw is None else cw.ctypes.data, len(x), n, int(sym), 1,
                          *(a.ctypes.data for a in got)) == 0
                assert_same(want, got, f"16 lanes, n {n}, sym {sym}, column weights {cw is not None}")
