"""Property tests of the GGML quantizers: error bounds derived from each block format, exact
re-quantization where the format guarantees it, and NaN/Inf refused.

Hypothesis chooses the shape, the magnitude (1e-8 .. 1e4), the pattern (gaussian, heavy
tails, outliers, zeros, constant blocks, one-signed, subnormals) and the random seed; NumPy
draws the values from the seed (fast, and every failure is reproducible from its example).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minicpm_convert.quants import dequantize, quantize

F16_MIN_SUB = 2.0 ** -24  # the smallest positive float16: the coarsest a block scale can be rounded
PATTERNS = ("gauss", "cubed", "outliers", "zeros", "constant", "positive", "subnormal", "mixed-zero-blocks")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tensors(draw, block: int):
    rows = draw(st.integers(1, 3))
    blocks = draw(st.integers(1, 3))
    scale = 10.0 ** draw(st.floats(-8, 4))
    pattern = draw(st.sampled_from(PATTERNS))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    x = rng.standard_normal((rows, blocks * block))
    if pattern == "cubed":
        x = x ** 3
    elif pattern == "outliers":
        x[:, rng.integers(0, x.shape[1], 3)] *= 100
    elif pattern == "zeros":
        x[:] = 0
    elif pattern == "constant":
        x[:] = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 2)
    elif pattern == "positive":
        x = np.abs(x)
    elif pattern == "mixed-zero-blocks":
        x.reshape(-1, block)[::2] = 0
    # The formats keep scales (and Q5_1/K-quant minima) in float16: keep values inside its range.
    x = np.clip(x * scale, -6e4, 6e4).astype(np.float32)
    if pattern == "subnormal":  # float32 subnormals, alone or mixed with normal values
        x = (rng.standard_normal(x.shape) * 1e-40).astype(np.float32)
        if rng.random() < 0.5:
            x.reshape(-1, block)[:, 0] = np.float32(scale)
    return x


def f16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).astype(np.float64)


def roundtrip(x: np.ndarray, qtype: T) -> np.ndarray:
    return dequantize(quantize(x, qtype), qtype).reshape(x.shape).astype(np.float64)


def blocks_of(x: np.ndarray, block: int) -> np.ndarray:
    return x.astype(np.float64).reshape(-1, block)


def check(x, y, bound, block):
    err = np.abs(blocks_of(x, block) - blocks_of(y, block)).max(axis=1)
    slack = 1e-6 * np.abs(blocks_of(x, block)).max(axis=1) + 1e-45  # float32 arithmetic inside the quantizer
    assert np.isfinite(y).all()
    bad = np.flatnonzero(err > bound + slack)
    assert bad.size == 0, (f"block {bad[0]}: error {err[bad[0]]:.6g} > bound {bound[bad[0]]:.6g} "
                           f"(amax {np.abs(blocks_of(x, block)[bad[0]]).max():.6g})")


# -- 32-weight block formats: bounds straight from the block's arithmetic -------------------------

@SETTINGS
@given(tensors(32))
def test_q8_0_error_within_half_a_step(x):
    """d = amax/127 (stored as float16 d16), q = round(x/d): |x - d16 q| <= d/2 + 127 |d - d16|."""
    amax = np.abs(blocks_of(x, 32)).max(axis=1)
    d = (amax.astype(np.float32) / np.float32(127)).astype(np.float64)
    check(x, roundtrip(x, T.Q8_0), d / 2 + 127 * np.abs(d - f16(d)), 32)


@SETTINGS
@given(tensors(32))
def test_q4_0_and_q5_0_error_within_one_step(x):
    """d = max/-2^(b-1) (max: the signed value of largest magnitude); q = x/d rounded, clipped at
    the top: within d/2 except the clipped side (one step), plus the float16 rounding of d."""
    for qtype, half in ((T.Q4_0, 8), (T.Q5_0, 16)):
        amax = np.abs(blocks_of(x, 32)).max(axis=1)
        d = amax / half
        check(x, roundtrip(x, qtype), d + half * np.abs(d - f16(d)), 32)


@SETTINGS
@given(tensors(32))
def test_q5_1_error_within_half_a_step(x):
    """d = (max - min)/31, m = min: |x - (d16 q + m16)| <= d/2 + 31 |d - d16| + |m - m16|."""
    b = blocks_of(x, 32)
    mn, mx = b.min(axis=1), b.max(axis=1)
    d = (mx - mn) / 31
    check(x, roundtrip(x, T.Q5_1), d / 2 + 31 * np.abs(d - f16(d)) + np.abs(mn - f16(mn)), 32)


# -- k-quants: 256-weight super-blocks of 16 or 32-weight sub-blocks with 6/8-bit sub-scales -------

@SETTINGS
@given(tensors(256))
@pytest.mark.parametrize("qtype,levels,asym", [(T.Q4_K, 15, True), (T.Q5_K, 31, True), (T.Q6_K, 63, False)])
def test_k_quants_error_within_two_steps(qtype, levels, asym, x):
    """Every weight lies within two steps of the super-block's span / levels (the sub-block
    searches may clip an extreme, one step; the 6/8-bit sub-scales add up to one more), plus
    the rounding of the float16 super-scales times the largest sub-scale and level."""
    b = blocks_of(x, 256)
    # Q4_K/Q5_K: x = d*sc*q - dmin*m with the min clamped to <= 0, so the grid spans [min(mn, 0), max(mx, 0)]
    span = (np.maximum(b.max(axis=1), 0) - np.minimum(b.min(axis=1), 0)) if asym else 2 * np.abs(b).max(axis=1)
    step = span / levels
    # Super-scales d, dmin are float16; when subnormal (tiny blocks) each keeps only an absolute
    # granularity of 2^-24, which a sub-scale (< 128) times a level (<= levels) multiplies.
    check(x, roundtrip(x, qtype), 2 * step + 2 * levels * 128 * F16_MIN_SUB / 2, 256)


# -- exact round trips ---------------------------------------------------------------------------

@SETTINGS
@given(tensors(32))
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0])
def test_requantizing_a_dequantized_block_is_exact(qtype, x):
    """Dequantized values sit on the block's grid, whose extreme gives back the same d16: quantizing
    them again gives the same bytes (blocks whose d16 is zero decode to zeros both times)."""
    q = quantize(x, qtype)
    y = dequantize(q, qtype).reshape(x.shape)
    q2 = quantize(y, qtype)
    d16 = q.reshape(-1, q.shape[-1] // (x.shape[-1] // 32))[:, :2].copy().view(np.float16).ravel()
    if (d16 != 0).all():
        assert np.array_equal(q2, q)
    assert np.array_equal(dequantize(q2, qtype), dequantize(q, qtype))


@SETTINGS
@given(tensors(32))
@pytest.mark.parametrize("qtype", [T.F16, T.BF16, T.F32])
def test_float_types_round_trip(qtype, x):
    """F32 is the identity; F16/BF16 are one rounding; quantizing their decode gives the same bits."""
    q = quantize(x, qtype)
    y = dequantize(q, qtype).reshape(x.shape)
    if qtype == T.F32:
        assert np.array_equal(y, x)
    assert np.array_equal(quantize(y, qtype), q)


@SETTINGS
@given(tensors(256), st.sampled_from([np.nan, np.inf, -np.inf]), st.integers(0, 10 ** 6))
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K])
def test_non_finite_input_is_refused(qtype, x, bad, where):
    """Block formats refuse NaN/Inf (F32/F16/BF16 keep ggml's bits: tests/quants/test_kquants.py)."""
    x = x.copy()
    x.reshape(-1)[where % x.size] = bad
    with pytest.raises(ValueError, match="non-finite"):
        quantize(x, qtype)
