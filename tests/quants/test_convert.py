"""The compiled one-pass float conversion (csrc/convert.c) against its oracle, torch's float32
path ``permute_rows(x.float() * factor / divisor, heads).to(dtype)``: every bf16 and f16 value,
f32 edge cases, both instruction sets (the portable C and the AVX2 + F16C path chosen at run time
give the same bits), and the NaN/Inf check fused into the same pass."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from minicpm_convert.formats.gguf.layout import permute_rows
from minicpm_convert.quants import registry

pytestmark = pytest.mark.skipif(registry.compiled_module() is None, reason="the C extension is not built")
_c = registry._compiled
KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
FOLDS = [(None, None), (12.0, None), (1.4 / 40 ** 0.5, None), (None, 9.0), (None, 2304 / 256), (0.3, 7.0)]


def raw(t: torch.Tensor) -> np.ndarray:
    return (t.view(torch.int16) if t.dtype is torch.bfloat16 else t).numpy()


def finite_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite bf16/f16 bit pattern; for f32 random patterns plus every exponent and the
    values next to f16 rounding ties (64 per row)."""
    if dtype is torch.float32:
        rng = np.random.default_rng(0)
        top = np.arange(2 ** 16, dtype=np.uint32)
        bits = np.concatenate([rng.integers(0, 2 ** 32, 2 ** 18, dtype=np.uint64).astype(np.uint32),
                               top << 16, (top << 13) | 0x1000, top << 13, ((top << 13) | 0x1000) + 1])
        t = torch.from_numpy(bits.view(np.float32).copy())
    else:
        t = torch.from_numpy(np.arange(2 ** 16, dtype=np.uint16).view(np.int16).copy()).view(dtype)
    t = t[torch.isfinite(t.float())]
    return t[:t.numel() // 64 * 64].reshape(-1, 64)


def convert(x: torch.Tensor, dtype: torch.dtype, factor=None, divisor=None, half_head=0, cols=None):
    out = torch.empty(x.shape, dtype=dtype)
    bad = _c.convert(raw(x.contiguous()), KIND[x.dtype], raw(out), KIND[dtype], cols or x.shape[-1], factor, divisor,
                     half_head)
    return out, bad


def oracle(x: torch.Tensor, dtype: torch.dtype, factor=None, divisor=None, heads=None) -> torch.Tensor:
    t = x.to(torch.float32)
    if factor is not None:
        t = t * factor
    if divisor is not None:
        t = t / divisor
    if heads:
        t = permute_rows(t, heads)
    return t.to(dtype)


@pytest.fixture(params=["portable", "best"])
def simd(request):
    """Each test on the portable C code and on the CPU's best instruction set (the same bits)."""
    best = _c.simd(99)  # the CPU's best
    level = _c.simd(0 if request.param == "portable" else best)
    assert level == (0 if request.param == "portable" else best)
    yield level
    _c.simd(best)


@pytest.mark.parametrize("src,dst", list(itertools.product(KIND, KIND)), ids=str)
def test_every_value_equals_torch(src, dst, simd):
    x = finite_values(src)
    for factor, divisor in FOLDS:
        got, bad = convert(x, dst, factor, divisor)
        assert bad == 0
        want = oracle(x, dst, factor, divisor)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (src, dst, factor, divisor)


@pytest.mark.parametrize("src,dst", [(torch.bfloat16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                     (torch.float32, torch.float16), (torch.float16, torch.float32)], ids=str)
def test_rope_permutation_and_odd_lengths(src, dst, simd):
    """Rows go to ggml's layout as permute_rows puts them; rows not a multiple of 8 long end in
    the scalar tail."""
    rng = np.random.default_rng(3)
    for heads, head_dim, cols in [(4, 8, 64), (3, 16, 37), (2, 4, 5), (1, 2, 9)]:
        x = torch.from_numpy(rng.standard_normal((heads * head_dim, cols)).astype(np.float32)).to(src)
        for factor, divisor in FOLDS[:2]:
            got, bad = convert(x, dst, factor, divisor, head_dim // 2)
            assert bad == 0
            want = oracle(x, dst, factor, divisor, heads)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (heads, head_dim, cols)


@pytest.mark.parametrize("src,dst", list(itertools.product(KIND, KIND)), ids=str)
def test_nan_and_inf_are_found_anywhere(src, dst, simd):
    """The check is fused into the conversion: one NaN or Inf at any position of any row (vector
    body or scalar tail) is reported, with or without a fold or a permutation."""
    for bad_value, (rows, cols), pos in itertools.product([float("nan"), float("inf"), float("-inf")],
                                                          [(4, 19), (2, 64)], [0, 7, 8, 18]):
        x = torch.ones(rows, cols, dtype=src)
        x[rows - 1, pos % cols] = bad_value
        for factor, half_head in [(None, 0), (3.0, 1)]:
            assert convert(x, dst, factor, None, half_head)[1] > 0


def test_sizes_are_checked():
    x = torch.zeros(4, 6, dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        _c.convert(raw(x), 2, np.empty(23, np.int16), 2, 6, None, None, 0)  # wrong destination size
    with pytest.raises(ValueError):
        _c.convert(raw(x), 2, np.empty(24, np.int16), 2, 5, None, None, 0)  # not whole rows
    with pytest.raises(ValueError):
        _c.convert(raw(x), 2, np.empty(24, np.int16), 2, 6, None, None, 3)  # not whole heads
