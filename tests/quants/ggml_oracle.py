"""ctypes access to llama.cpp's own quantizers (libggml-base from llama-cpp-python), the oracle
for byte-exactness tests.  Nothing here is built or vendored: it loads the installed library."""

from __future__ import annotations

import ctypes
import importlib.util
import os

import numpy as np

# enum ggml_type, from ggml/include/ggml.h
GGML_TYPE = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14,
    "IQ2_XXS": 16, "IQ2_XS": 17, "IQ3_XXS": 18, "IQ1_S": 19, "IQ4_NL": 20, "IQ3_S": 21, "IQ2_S": 22,
    "IQ4_XS": 23, "IQ1_M": 29, "BF16": 30, "TQ1_0": 34, "TQ2_0": 35,
}

_c_float_p = ctypes.POINTER(ctypes.c_float)


def library_path() -> str | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
            p = os.path.join(base, "lib", name)
            if os.path.exists(p):
                return p
    return None


class GGML:
    """Thin wrapper: float32 rows in, llama.cpp's bytes out."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, _c_float_p, ctypes.c_void_p,
            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _c_float_p,
        ]
        lib.ggml_quantize_init.restype = None
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        for fn in ("ggml_fp32_to_fp16_row", "ggml_fp32_to_bf16_row_ref"):
            getattr(lib, fn).restype = None
            getattr(lib, fn).argtypes = [_c_float_p, ctypes.c_void_p, ctypes.c_int64]
        for t in ("q4_0", "q5_0", "q5_1", "q8_0", "q4_K", "q5_K", "q6_K"):
            fn = getattr(lib, f"quantize_row_{t}_ref")
            fn.restype = None
            fn.argtypes = [_c_float_p, ctypes.c_void_p, ctypes.c_int64]
        for name in [self._dequantizer(t) for t in GGML_TYPE if t != "F32"]:
            fn = getattr(lib, name)
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p, _c_float_p, ctypes.c_int64]
        self.lib = lib

    @staticmethod
    def _rows(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x

    def row_size(self, type_name: str, n_per_row: int) -> int:
        return self.lib.ggml_row_size(GGML_TYPE[type_name], n_per_row)

    def quantize_chunk(self, type_name: str, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """ggml_quantize_chunk(type, x, dst, 0, nrows, n_per_row, imatrix) -> uint8 [nrows, row_size]."""
        x = self._rows(x)
        nrows, n = x.shape
        rs = self.row_size(type_name, n)
        dst = np.zeros((nrows, rs), dtype=np.uint8)
        qw = None
        if imatrix is not None:
            imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
            assert imatrix.shape == (n,)
            qw = imatrix.ctypes.data_as(_c_float_p)
        got = self.lib.ggml_quantize_chunk(
            GGML_TYPE[type_name], x.ctypes.data_as(_c_float_p), dst.ctypes.data, 0, nrows, n, qw
        )
        assert got == nrows * rs
        return dst

    def quantize_chunk_or_abort(self, type_name: str, x: np.ndarray, imatrix: np.ndarray | None = None):
        """quantize_chunk in a forked child: its bytes, or None where llama.cpp aborts (GGML_ASSERT:
        the IQ codebook searches find no point on inputs whose weights overflow)."""
        self.lib.ggml_quantize_init(GGML_TYPE[type_name])  # the codebook tables, built once, inherited
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: quantize, send the bytes, leave without running any Python cleanup
            code = 1
            try:
                os.close(rfd)
                data = self.quantize_chunk(type_name, x, imatrix).tobytes()
                with os.fdopen(wfd, "wb") as f:
                    f.write(data)
                code = 0
            finally:
                os._exit(code)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
            return None
        rows = self._rows(x)
        return np.frombuffer(data, np.uint8).reshape(rows.shape[0], -1)

    def quantize_row_ref(self, type_name: str, x: np.ndarray) -> np.ndarray:
        """quantize_row_<type>_ref over all of x (rows concatenated) -> uint8 [nrows, row_size]."""
        x = self._rows(x)
        nrows, n = x.shape
        name = type_name.lower().replace("_k", "_K")
        dst = np.zeros((nrows, self.row_size(type_name, n)), dtype=np.uint8)
        getattr(self.lib, f"quantize_row_{name}_ref")(x.ctypes.data_as(_c_float_p), dst.ctypes.data, x.size)
        return dst

    def dequantize_row(self, type_name: str, data: np.ndarray, n_per_row: int) -> np.ndarray:
        """dequantize_row_<type> (or ggml_fp16/bf16_to_fp32_row) -> float32 [nrows, n_per_row]."""
        data = np.ascontiguousarray(data).view(np.uint8)
        nrows = data.size // self.row_size(type_name, n_per_row)
        y = np.empty((nrows, n_per_row), dtype=np.float32)
        getattr(self.lib, self._dequantizer(type_name))(data.ctypes.data, y.ctypes.data_as(_c_float_p), y.size)
        return y

    @staticmethod
    def _dequantizer(type_name: str) -> str:
        return {"F16": "ggml_fp16_to_fp32_row", "BF16": "ggml_bf16_to_fp32_row"}.get(
            type_name, "dequantize_row_" + type_name.lower().replace("_k", "_K"))

    def fp32_to_fp16(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        dst = np.empty(x.shape, dtype=np.uint16)
        self.lib.ggml_fp32_to_fp16_row(x.ctypes.data_as(_c_float_p), dst.ctypes.data, x.size)
        return dst

    def fp32_to_bf16(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        dst = np.empty(x.shape, dtype=np.uint16)
        self.lib.ggml_fp32_to_bf16_row_ref(x.ctypes.data_as(_c_float_p), dst.ctypes.data, x.size)
        return dst


def load() -> GGML | None:
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")  # an abort in a forked child: no gdb session
    p = library_path()
    return GGML(p) if p else None
