"""ArrayPackingWriter packs metadata arrays with the bytes of gguf-py's GGUFWriter, and leaves to
gguf-py what it refuses (mixed types, values a 32-bit field cannot hold)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFValueType, GGUFWriter, TokenType

from minicpm_convert.formats.gguf.packing import ArrayPackingWriter

rng = np.random.default_rng(5)
ARRAYS = {
    "tokens": [f"▁tok{i}".encode() for i in range(300)] + ["<用户>", "é", "", bytearray(b"\x00\xff")] * 20,
    "scores": [float(v) for v in rng.standard_normal(500) * 1e3] + [-1000.0, 0.0, -0.0, 1e-45, 3.4028235e38,
                                                                      float("inf"), float("nan"), 1.0000001] * 10,
    "types": [int(TokenType.NORMAL)] * 200 + [TokenType.CONTROL, TokenType.USER_DEFINED, -2 ** 31, 2 ** 31 - 1] * 30,
    "short": [1.5, 2.5],
}
REFUSED = {
    "mixed": [1.0] * 100 + [2],
    "bool": [1] * 100 + [True],
    "float overflow": [1.0] * 100 + [1e39],
    "int overflow": [1] * 100 + [2 ** 31],
    "strings and numbers": ["a"] * 100 + [1],
}


def pack(cls, val):
    return cls(None, "llama")._pack_val(val, GGUFValueType.ARRAY, add_vtype=True)


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_same_bytes_as_gguf_py(name):
    assert pack(ArrayPackingWriter, ARRAYS[name]) == pack(GGUFWriter, ARRAYS[name])


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_as_gguf_py_refuses(name):
    with pytest.raises(Exception) as theirs:
        pack(GGUFWriter, REFUSED[name])
    with pytest.raises(type(theirs.value)):
        pack(ArrayPackingWriter, REFUSED[name])
