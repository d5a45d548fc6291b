"""minicpm-convert: MiniCPM checkpoints to Llama format, GGUF and INT4, with numerical proof.

The Python API (see `api.py`): `to_llama`, `to_gguf`, `to_int4`, `verify`, `inspect`, `imatrix`,
`gguf_plan`, each returning a result object; bad input raises `ConvertError`.
"""

__version__ = "0.1.0"

_API = ("to_llama", "to_gguf", "to_int4", "verify", "inspect", "imatrix", "gguf_plan")
__all__ = [*_API, "ConvertError", "__version__"]


def __getattr__(name: str):
    # Imported on first use: `minicpm_convert.__version__` and the CLI's --help stay cheap.
    if name in _API:
        from . import api
        return getattr(api, name)
    if name == "ConvertError":
        from .errors import ConvertError
        return ConvertError
    raise AttributeError(f"module 'minicpm_convert' has no attribute {name!r}")
