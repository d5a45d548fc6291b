"""Pure quantizers, one function per block format (the gguf-py `quants.py` model).

`quantize(x, qtype)` / `dequantize(data, qtype)` are byte-identical to llama.cpp's reference
quantizers (no imatrix); see `ggml.py` and `kquants.py`.
"""

from .ggml import dequantize, quantize

__all__ = ["quantize", "dequantize"]
