"""Hard inputs for the quantizer tests: the values llama.cpp's arithmetic is most fragile on
(subnormals, ties, zero and constant blocks, outliers, -0.0, huge and tiny scales), and the
importance arrays they are quantized with."""

from __future__ import annotations

import numpy as np


def each_simd_level():
    """The compiled kernels at every instruction-set level this CPU runs (0 portable C, 1 AVX2 +
    F16C, 2 also AVX-512F): yields each level once it is set; the CPU's best is restored after."""
    from minicpm_convert.quants import registry

    c = registry.compiled_module()
    best = c.simd(99)
    try:
        for level in range(best + 1):
            assert c.simd(level) == level
            yield level
    finally:
        c.simd(best)


def _normal(rng, shape, s):
    return (rng.standard_normal(shape) * s).astype(np.float32)


def _outlier_cols(rng, shape):
    x = _normal(rng, shape, 0.02)
    cols = rng.choice(shape[1], size=max(1, shape[1] // 300), replace=False)
    x[:, cols] *= 300.0
    return x


def _zero_blocks(rng, shape):
    x = _normal(rng, shape, 1.0)
    x[:, :256] = 0.0  # a whole super-block
    x[:, 288:320] = 0.0  # one 32-sub-block
    x[:, 528:544] = 0.0  # one 16-sub-block
    x[1::2, 1024:1536] = -0.0
    return x


def _const_blocks(rng, shape):
    x = np.empty(shape, np.float32)
    vals = np.array([0.37, -2.5, 1e-3, -7.0, 1.0, 65504.0, -1e-30, 3.0], np.float32)
    for i in range(shape[1] // 256):
        x[:, 256 * i : 256 * (i + 1)] = vals[i % len(vals)]
    x[:, 32:64] = 5.0  # a constant sub-block inside a constant block of another value
    return x


def _single_nonzero(rng, shape):
    x = np.zeros(shape, np.float32)
    for b in range(shape[1] // 32):
        x[:, 32 * b + (7 * b) % 32] = (b % 5 - 2.2) * 10.0 ** ((b % 9) - 4)
    return x


def _subnormal(rng, shape):
    return (rng.standard_normal(shape) * 1e-40).astype(np.float32)


def _mixed_subnormal(rng, shape):
    x = _normal(rng, shape, 1e-3)
    x[:, ::3] = (rng.standard_normal(x[:, ::3].shape) * 1e-39).astype(np.float32)
    x[:, 256:512] *= np.float32(1e-36)  # a super-block at the bottom of the normal range
    return x


def _bf16(rng, shape):
    x = _normal(rng, shape, 0.05)
    return (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)


def _fp16(rng, shape):
    return _normal(rng, shape, 0.5).astype(np.float16).astype(np.float32)


def _one_big_subblock(rng, shape):
    x = _normal(rng, shape, 1e-3)
    x[:, 0:32] *= 1e6  # other sub-blocks' scales round to 0 -> "if (!d) continue"
    x[:, 256 + 16 : 512] *= 1e-9
    return x


def _sparse(rng, shape):
    return (_normal(rng, shape, 1.0) * (rng.random(shape) < 0.05)).astype(np.float32)  # keeps -0.0


CASES = {
    "normal_1e-8": lambda r, s: _normal(r, s, 1e-8),
    "normal_1e-6": lambda r, s: _normal(r, s, 1e-6),
    "normal_1e-4": lambda r, s: _normal(r, s, 1e-4),
    "normal_1e-2": lambda r, s: _normal(r, s, 1e-2),
    "normal_1": lambda r, s: _normal(r, s, 1.0),
    "normal_1e2": lambda r, s: _normal(r, s, 1e2),
    "normal_1e4": lambda r, s: _normal(r, s, 1e4),
    "outlier_columns": _outlier_cols,
    "zero_blocks": _zero_blocks,
    "all_zero": lambda r, s: np.zeros(s, np.float32),
    "constant_blocks": _const_blocks,
    "single_nonzero": _single_nonzero,
    "negative_only": lambda r, s: -np.abs(_normal(r, s, 1.0)),
    "positive_only": lambda r, s: np.abs(_normal(r, s, 1.0)),
    "negative_offset": lambda r, s: _normal(r, s, 1e-3) - np.float32(1000.0),
    "positive_offset": lambda r, s: _normal(r, s, 1e-3) + np.float32(1000.0),
    "bf16_values": _bf16,
    "fp16_values": _fp16,
    "subnormal": _subnormal,
    "mixed_subnormal": _mixed_subnormal,
    "tiny_1e-20": lambda r, s: _normal(r, s, 1e-20),
    "huge_1e30": lambda r, s: _normal(r, s, 1e30),
    "integers": lambda r, s: r.integers(-8, 9, s).astype(np.float32),
    "halves": lambda r, s: (r.integers(-40, 41, s) * 0.5).astype(np.float32),
    "uniform": lambda r, s: r.uniform(-1, 1, s).astype(np.float32),
    "one_big_subblock": _one_big_subblock,
    "sparse_signed_zeros": _sparse,
}


def make(case: str, shape=(4, 2304), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, *map(ord, case)])
    return np.ascontiguousarray(CASES[case](rng, shape), dtype=np.float32)


def importance(kind: str, n: int, seed: int = 0) -> np.ndarray | None:
    """Deterministic importance arrays (llama.cpp's in_sum2/counts are non-negative)."""
    rng = np.random.default_rng([seed, n, *map(ord, kind)])
    if kind == "none":
        return None
    if kind == "random":
        return (rng.random(n) ** 3 * 10 + 1e-3).astype(np.float32)
    if kind == "zeros":  # columns a calibration text never activates
        z = (rng.random(n) * 2).astype(np.float32)
        z[::7] = 0
        z[:40] = 0
        return z
    if kind == "ones":
        return np.ones(n, np.float32)
    if kind == "range":  # twelve decades
        return (10.0 ** rng.uniform(-6, 6, n)).astype(np.float32)
    raise KeyError(kind)


IMPORTANCE = ["none", "random", "zeros", "ones", "range"]
