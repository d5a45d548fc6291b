"""Pure quantizers, one function per block format (the gguf-py `quants.py` model), reached through
one registry: ``quantize(x, qtype, imatrix=None)`` / ``dequantize(data, qtype)`` (see registry.py).

The bytes are llama.cpp's (``ggml_quantize_chunk``, with or without an importance matrix);
the compiled kernels (_kquants) are used when built, the NumPy ports otherwise and as oracle.
"""

from .registry import FORMATS, SUPPORTED, dequantize, quantize, row_bytes

__all__ = ["quantize", "dequantize", "SUPPORTED", "FORMATS", "row_bytes"]
