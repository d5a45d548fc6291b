"""llama.cpp through llama-cpp-python: the real client of every GGUF test."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch

from tests.requirements import require  # noqa: E402

llama_cpp = require("llama_cpp")

GGML_TYPE_F32 = 0


def logits(path: Path, tokens: list[int]) -> torch.Tensor:
    """llama.cpp's logits for every position (f32 KV cache, so only the weights' precision shows)."""
    model = llama_cpp.Llama(str(path), logits_all=True, n_ctx=256, n_batch=256, n_threads=2, verbose=False,
                            type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    try:
        model.eval(tokens)
        return torch.tensor(np.array(model.scores[: len(tokens)], dtype=np.float32))
    finally:
        model.close()


def tokenize(path: Path, text: str) -> list[int]:
    model = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        return model.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    finally:
        model.close()


GGML_TYPE_COUNT = 43  # ggml.h of the pinned llama.cpp: "no type chosen" in the quantize params


def _params(ftype: int, nthread: int = 2, *, output_tensor_type=None, token_embedding_type=None, tensor_types=(),
            pure=False, leave_output_tensor=False, keep=None):
    """llama_model_quantize_params with llama-quantize's per-tensor options; ``keep`` collects the
    ctypes arrays that must outlive the call."""
    keep = [] if keep is None else keep
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    params.output_tensor_type = GGML_TYPE_COUNT if output_tensor_type is None else int(output_tensor_type)
    params.token_embedding_type = GGML_TYPE_COUNT if token_embedding_type is None else int(token_embedding_type)
    params.pure = pure
    params.quantize_output_tensor = not leave_output_tensor
    if tensor_types:  # {pattern, type} ..., {NULL, GGML_TYPE_COUNT}
        arr = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, qtype) in enumerate(tensor_types):
            raw = ctypes.c_char_p(pattern.lower().encode())
            keep.append(raw)
            arr[i].pattern, arr[i].type = raw.value, int(qtype)
        arr[len(tensor_types)].pattern, arr[len(tensor_types)].type = None, GGML_TYPE_COUNT
        keep.append(arr)
        params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    return params, keep


def quantize(src: Path, dst: Path, ftype: int, nthread: int = 2, *, imatrix: dict[str, np.ndarray] | None = None,
             **options) -> None:
    """llama-quantize: llama.cpp's own quantization of a GGUF file (llama_model_quantize), with the
    importance data llama-quantize would load (name -> float32 weights) and its per-tensor options."""
    params, keep = _params(ftype, nthread, **options)
    if imatrix:  # {name, data, size} ..., {NULL, NULL, 0}, as tools/quantize builds it
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(values)
            arr[i].name = name.encode()
            arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = values.size
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed ({rc})"


class _ModelDesc(ctypes.Structure):  # llama_quant_model_desc (src/llama-ext.h)
    _fields_ = [("architecture", ctypes.c_char_p)] + [(f, ctypes.c_uint32) for f in (
        "n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert", "n_embd_head_k", "n_embd_head_v")]


class _InitParams(ctypes.Structure):  # ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def plan_types(arch: str, n_layer: int, n_head: int, n_head_kv: int, n_expert: int,
               tensors: list[tuple[str, tuple[int, ...]]], ftype: int, **options) -> list[int]:
    """llama.cpp's own type plan (llama_quant_compute_types on a mock model from its metadata,
    src/llama-ext.h: llama_tensor_get_type without an importance matrix) for F32 tensors
    (name, shape with the row length last), with llama-quantize's per-tensor options."""
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libllama.so"))
    base = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    from_meta = lib._Z31llama_quant_model_from_metadataPK22llama_quant_model_desc
    from_meta.restype, from_meta.argtypes = ctypes.c_void_p, [ctypes.POINTER(_ModelDesc)]
    init = lib._Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params
    init.restype, init.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p]
    compute = lib._Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem
    compute.restype = None
    compute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int),
                        ctypes.c_size_t]
    free_qs = lib._Z16llama_quant_freeP19quantize_state_impl
    free_qs.restype, free_qs.argtypes = None, [ctypes.c_void_p]
    lib.llama_model_free.restype, lib.llama_model_free.argtypes = None, [ctypes.c_void_p]
    base.ggml_init.restype, base.ggml_init.argtypes = ctypes.c_void_p, [_InitParams]
    base.ggml_new_tensor.restype = ctypes.c_void_p
    base.ggml_new_tensor.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
    base.ggml_set_name.restype, base.ggml_set_name.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]
    base.ggml_free.restype, base.ggml_free.argtypes = None, [ctypes.c_void_p]

    desc = _ModelDesc(arch.encode(), 64, 64, n_layer, n_head, n_head_kv, n_expert, 64, 64)
    model = from_meta(ctypes.byref(desc))
    params, keep = _params(ftype, **options)
    qs = init(model, ctypes.byref(params))
    ctx = base.ggml_init(_InitParams(len(tensors) * 1024 + 4096, None, True))
    try:
        ptrs = (ctypes.c_void_p * len(tensors))()
        for i, (name, shape) in enumerate(tensors):
            ne = (ctypes.c_int64 * len(shape))(*reversed(shape))
            t = base.ggml_new_tensor(ctx, 0, len(shape), ne)  # GGML_TYPE_F32
            base.ggml_set_name(t, name.encode())
            ptrs[i] = t
        out = (ctypes.c_int * len(tensors))()
        compute(qs, ftype, ptrs, out, len(tensors))
        return list(out)
    finally:
        base.ggml_free(ctx)
        free_qs(qs)
        lib.llama_model_free(model)
