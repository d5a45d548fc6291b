"""The one registry of GGML tensor types: ``quantize(x, qtype, imatrix=None)`` / ``dequantize``.

Every production quantization goes through :func:`quantize`; it chooses, in this one place, the
compiled kernel (``_kquants``, built by setup.py) or the NumPy port (the oracle, and the fallback
when the extension is not built or ``MINICPM_CONVERT_NO_C=1``).  Both give the bytes of
``ggml_quantize_chunk`` (llama.cpp's ggml-quants.c) for the same rows and importance array.

``imatrix`` is llama.cpp's ``quant_weights``: one float32 weight per column, shared by all rows
given in the call (the caller slices it per expert for stacked MoE tensors).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq
from gguf.constants import GGML_QUANT_SIZES

from . import iquants, kquants, legacy, ternary

try:  # the compiled kernels (setup.py builds them when a C compiler is present)
    from . import _kquants as _compiled
except ImportError:  # pragma: no cover - depends on the install
    _compiled = None

__all__ = ["quantize", "dequantize", "SUPPORTED", "FORMATS", "Format", "row_bytes", "compiled_types"]

IGNORED, USED, REQUIRED = "ignored", "used", "required"


@dataclass(frozen=True)
class Format:
    qtype: QT
    numpy: Callable[[np.ndarray, np.ndarray | None], np.ndarray]  # (rows [r, n], qw [n] | None) -> bytes
    importance: str  # what ggml does with an importance array: IGNORED, USED, or REQUIRED (asserts it)

    @property
    def block(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]


FORMATS: dict[QT, Format] = {f.qtype: f for f in (
    Format(QT.F32, lambda x, qw: x, IGNORED),
    Format(QT.F16, lambda x, qw: legacy.f16(x), IGNORED),
    Format(QT.BF16, lambda x, qw: legacy.bf16(x), IGNORED),
    Format(QT.Q8_0, legacy.q8_0, IGNORED),
    Format(QT.Q4_0, legacy.q4_0, USED),
    Format(QT.Q4_1, legacy.q4_1, USED),
    Format(QT.Q5_0, legacy.q5_0, USED),
    Format(QT.Q5_1, legacy.q5_1, USED),
    Format(QT.Q2_K, kquants.q2_k, USED),
    Format(QT.Q3_K, kquants.q3_k, USED),
    Format(QT.Q4_K, kquants.q4_k, USED),
    Format(QT.Q5_K, kquants.q5_k, USED),
    Format(QT.Q6_K, kquants.q6_k, USED),
    Format(QT.IQ4_NL, iquants.iq4_nl, USED),
    Format(QT.IQ4_XS, iquants.iq4_xs, USED),
    Format(QT.IQ3_XXS, iquants.iq3_xxs, USED),
    Format(QT.IQ3_S, iquants.iq3_s, USED),
    Format(QT.IQ2_XXS, iquants.iq2_xxs, REQUIRED),
    Format(QT.IQ2_XS, iquants.iq2_xs, REQUIRED),
    Format(QT.IQ2_S, iquants.iq2_s, USED),
    Format(QT.TQ1_0, ternary.tq1_0, IGNORED),
    Format(QT.TQ2_0, ternary.tq2_0, IGNORED),
)}
SUPPORTED = frozenset(FORMATS)
FLOATS = (QT.F32, QT.F16, QT.BF16)

# NumPy temporaries are a few dozen arrays of the chunk's size: bound it (at least one row).
_NUMPY_CHUNK_VALUES = 1 << 16

# MINICPM_CONVERT_NO_C=1 selects the NumPy ports everywhere (also in worker processes).
use_compiled = _compiled is not None and not os.environ.get("MINICPM_CONVERT_NO_C")
_tables_lock = threading.Lock()
_tables_loaded: set[QT] = set()


def compiled_module():
    """The compiled extension, or None when it is not built or MINICPM_CONVERT_NO_C is set."""
    return _compiled if use_compiled else None


def compiled_types() -> frozenset[QT]:
    """The types the built extension implements (empty when it is not built)."""
    return frozenset(QT(t) for t in getattr(_compiled, "TYPES", ())) if _compiled is not None else frozenset()


def row_bytes(qtype: QT, n: int) -> int:
    block, size = GGML_QUANT_SIZES[QT(qtype)]
    return n // block * size


def _load_iq_tables(qtype: QT) -> None:
    """Hand the IQ codebook search tables (built once, in NumPy) to the compiled kernels."""
    if qtype in _tables_loaded or qtype not in iquants.GRID_OF:
        return
    with _tables_lock:
        if qtype not in _tables_loaded:
            t = iquants.tables_for(qtype)
            _compiled.set_tables(int(qtype), t.grid, t.index, t.start, t.count, t.flat)
            _tables_loaded.add(qtype)


def _check_imatrix(fmt: Format, imatrix, n: int):
    if imatrix is None or fmt.importance == IGNORED:
        if imatrix is None and fmt.importance == REQUIRED:
            raise ValueError(f"{fmt.qtype.name} needs an importance matrix (llama.cpp refuses without one)")
        return None
    qw = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
    if qw.size != n:
        raise ValueError(f"{fmt.qtype.name}: importance array has {qw.size} values for rows of {n}")
    if not np.isfinite(qw).all():
        raise ValueError(f"{fmt.qtype.name}: importance array holds non-finite values")
    return qw


def quantize(x: np.ndarray, qtype: QT, imatrix: np.ndarray | None = None, *, backend: str | None = None) -> np.ndarray:
    """Quantize float32 ``[..., n]`` to ``qtype`` exactly as ``ggml_quantize_chunk`` does.

    Returns F32 -> float32, F16 -> float16, BF16 -> uint16 bit patterns (each ``[..., n]``);
    block types -> uint8 ``[..., n // block * type_size]``.  ``imatrix``: float32 ``[n]`` or None.
    ``backend``: "c", "numpy", or None (the compiled kernel when built).
    Block types refuse NaN/Inf input (llama.cpp writes garbage blocks); float types convert them
    bit for bit as ggml does."""
    qtype = QT(qtype)
    fmt = FORMATS.get(qtype)
    if fmt is None:
        raise NotImplementedError(f"quantization to {qtype.name} is not supported")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise ValueError("expected an array with at least one dimension")
    n = x.shape[-1]
    if n % fmt.block:
        raise ValueError(f"{qtype.name}: row length {n} is not a multiple of {fmt.block}")
    qw = _check_imatrix(fmt, imatrix, n)
    if qtype in FLOATS:
        return _float(x, qtype)
    rows = x.reshape(-1, n) if n else x.reshape(int(np.prod(x.shape[:-1])), 0)
    out = np.empty((rows.shape[0], row_bytes(qtype, n)), np.uint8)
    if rows.size:
        if backend is None:
            backend = "c" if use_compiled and qtype in compiled_types() else "numpy"
        if backend == "c":
            if _compiled is None or qtype not in compiled_types():
                raise RuntimeError(f"no compiled kernel for {qtype.name}")
            _load_iq_tables(qtype)
            # counts NaN/Inf first (one pass in C, no temporary) and then quantizes only if none
            bad = _compiled.quantize(int(qtype), rows, out, n, qw)  # releases the GIL
        elif backend == "numpy":
            bad = int(np.count_nonzero(~np.isfinite(rows)))
            step = max(1, _NUMPY_CHUNK_VALUES // n)
            with np.errstate(all="ignore"):  # out-of-domain roundings are reproduced, not reported
                for s in range(0, rows.shape[0] if not bad else 0, step):
                    out[s:s + step] = fmt.numpy(rows[s:s + step], qw)
        else:
            raise ValueError(f"unknown backend {backend!r}")
        if bad:
            raise ValueError(f"{qtype.name}: input holds {bad} non-finite values (NaN or Inf)")
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _float(x: np.ndarray, qtype: QT) -> np.ndarray:
    if qtype == QT.F32:
        return x
    if x.size == 0:
        return np.empty(x.shape, np.float16 if qtype == QT.F16 else np.uint16)
    if qtype == QT.F16 and use_compiled and _compiled is not None:
        out = np.empty(x.shape, np.float16)  # the bits of legacy.f16 (NaN, inf too), ~5x faster
        _compiled.f16(x, out)
        return out
    return FORMATS[qtype].numpy(x, None)


def dequantize(data: np.ndarray, qtype: QT) -> np.ndarray:
    """Inverse of :func:`quantize` (float32 ``[..., n]``), via ``gguf.quants.dequantize``."""
    qtype = QT(qtype)
    if qtype == QT.BF16 and data.dtype == np.uint16:
        data = data.view(np.uint8)
    return gq.dequantize(data, qtype)
