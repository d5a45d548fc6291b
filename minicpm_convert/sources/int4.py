"""An INT4 export folder (GPTQ v1, compressed-tensors pack-quantized or AutoAWQ GEMM) as a
`WeightSource`.

Packed projections are decoded to the float32 weights a loader computes (float16 scale times
code minus zero); every other tensor is read as stored. Names and layout are Hugging Face's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from ..errors import ConvertError
from ..formats.hf.int4 import Int4Scheme, is_projection, packed_tensors, read_scheme
from ..families import expected_shapes, family_of
from ..quants import int4, int4_awq
from ..spec import load_config

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def is_int4_folder(path: Path) -> bool:
    """A folder whose config.json declares a `quantization_config`."""
    config = Path(path) / "config.json"
    return config.is_file() and isinstance(cfg := load_config(config), dict) and "quantization_config" in cfg


class Int4Source:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.ckpt = Checkpoint(self.folder, validate=False)
        self.spec = self.ckpt.spec
        where = str(self.folder / "config.json")
        if not family_of(self.spec).llama_format:
            raise ConvertError(f"{where}: expected a Llama-format INT4 export, found model_type "
                               f"'{self.spec.raw.get('model_type')}'")
        self.scheme: Int4Scheme = read_scheme(self.ckpt.config.get("quantization_config"), where)
        self.kind = self.scheme.kind
        self._shapes = expected_shapes(self.spec)
        self._check_tensors()
        self.rescaling, self.rescaling_method = self._rescaling()
        self.compensated = self._compensated()
        self._cache: tuple[str, torch.Tensor] | None = None  # the last decoded projection

    def _check_tensors(self) -> None:
        for name, shape in self._shapes.items():
            if is_projection(name):
                stored = [(name.removesuffix("weight") + s, d, sh) for s, d, sh in packed_tensors(self.scheme, *shape)]
            else:
                stored = [(name, None, shape)]
            for tensor, dtype, tshape in stored:
                if not self.ckpt.has(tensor):
                    raise ConvertError(f"{self.folder}: missing tensor '{tensor}' ({self.kind})")
                if tuple(self.ckpt.shape(tensor)) != tuple(tshape):
                    raise ConvertError(f"{self.folder}: tensor '{tensor}' has shape {list(self.ckpt.shape(tensor))}, "
                                       f"expected {list(tshape)}")
                actual = self.ckpt.dtype(tensor)
                # Packed words must be the integer type; scales may be any float type.
                if dtype is not None and actual != dtype and not (dtype in FLOATS and actual in FLOATS):
                    raise ConvertError(f"{self.folder}: tensor '{tensor}' is {actual}, expected {dtype}")

    def _rescaling(self) -> tuple[dict[str, torch.Tensor], str | None]:
        """The column scales the export was rescaled by (int4_rescale.py), checked, and the method
        its metadata names; ({}, None) if none."""
        from ..formats.hf import int4_rescale
        path = self.folder / int4_rescale.FILE
        if not path.is_file():
            return {}, None
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                method = (f.metadata() or {}).get("method")
                scales = {k: f.get_tensor(k).to(torch.float32) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConvertError(f"{path}: cannot read ({exc})") from None
        problems = int4_rescale.check(scales, self.spec, self._shapes, str(path))
        if problems:
            raise ConvertError(problems[0])
        return scales, method

    def _compensated(self) -> bool:
        """Whether the codes may come from an error-compensating encoder (GPTQ with calibration
        data), which verify holds to a looser bound (fidelity.py): our exports say how they were
        made (quantization_report.json, and GPTQ's quantization_config meta); one that does not
        say is taken as compensated, as GPTQ is what makes most INT4 checkpoints."""
        from ..formats.hf.int4_writer import REPORT_FILE
        meta = self.ckpt.config["quantization_config"].get("meta")  # a dict: read_scheme checked
        method = meta.get("method") if isinstance(meta, dict) else None
        report = self.folder / REPORT_FILE
        if method is None and report.is_file():
            try:
                method = json.loads(report.read_text()).get("method")
            except (OSError, ValueError, AttributeError):
                method = None
        return not isinstance(method, str) or method.startswith("gptq")

    # -- WeightSource ----------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self._shapes

    def names(self) -> list[str]:
        return list(self._shapes)

    def storage_type(self, name: str) -> str:
        from ..fidelity import int4_storage
        if is_projection(name):
            return int4_storage(self.scheme.group_size, self.scheme.sym, self.compensated)
        return self.ckpt.storage_type(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if not is_projection(name):
            return self.ckpt.read(name, start, stop)
        if self._cache is None or self._cache[0] != name:
            self._cache = (name, self.dequantized(name))
        return self._cache[1][start:stop]

    def dequantized(self, name: str) -> torch.Tensor:
        """The float32 weight [out, in] of one projection, as a loader decodes it."""
        p = name.removesuffix("weight")
        get = lambda suffix: self.ckpt.get(p + suffix)  # noqa: E731
        try:
            if self.scheme.format == "gptq":
                parts = int4.unpack_gptq(get("qweight"), get("qzeros"), get("scales"), get("g_idx"))
            elif self.scheme.format == "awq":
                parts = int4_awq.unpack_awq(get("qweight"), get("qzeros"), get("scales"))
            else:
                zp = get("weight_zero_point") if not self.scheme.sym else None
                parts = int4.unpack_compressed(get("weight_packed"), get("weight_scale"), get("weight_shape"), zp)
        except ValueError as exc:
            raise ConvertError(f"{self.folder}: tensor '{name}': {exc}") from None
        codes, scales, zeros, group_size = parts
        if group_size != self.scheme.group_size:
            raise ConvertError(f"{self.folder}: tensor '{name}' has group size {group_size}, "
                               f"config.json says {self.scheme.group_size}")
        return int4.dequantize(codes, scales, zeros, group_size)
