"""What an INT4 export holds on disk: the tensors of each quantized Linear and the config keys.

Shared by the writer (`int4_writer.py`) and the reader (`sources/int4.py`) so the two cannot
disagree. Three formats (facts §7):
- `gptq`: GPTQ v1 as GPTQModel/AutoGPTQ write it, read by transformers (+optimum +gptqmodel),
  vLLM and SGLang. Per layer P: P.qweight, P.qzeros, P.scales, P.g_idx.
- `compressed-tensors`: `pack-quantized` as llm-compressor writes it, read by transformers (with
  only the compressed-tensors package) and vLLM. Per layer P: P.weight_packed, P.weight_scale,
  P.weight_shape and, asymmetric only, P.weight_zero_point.
- `awq`: AutoAWQ's GEMM layout (`quants/int4_awq.py`), read by transformers (+gptqmodel) and
  vLLM. Per layer P: P.qweight [in, out/8], P.qzeros [in/g, out/8], P.scales [in/g, out]. It
  always stores a zero point (AutoAWQ cannot pack GEMM without one), so it is asymmetric.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import __version__
from ...errors import ConvertError
from ...names import PROJECTIONS, expert_parts

FORMATS = ("gptq", "compressed-tensors", "awq")
GROUP_SIZES = (32, 64, 128)
PACK = 8  # 4-bit codes per int32


@dataclass(frozen=True)
class Int4Scheme:
    format: str
    group_size: int
    sym: bool

    @property
    def kind(self) -> str:
        """The verify kind: int4-gptq, int4-compressed-tensors or int4-awq."""
        return f"int4-{self.format}"


def is_projection(name: str) -> bool:
    """One of the seven Linear weights of a block, or an expert's w1/w3/w2 (the tensors INT4
    quantizes; a MoE router stays float16, as llm-compressor leaves it)."""
    return name.startswith("model.layers.") and (name.endswith(tuple(f".{p}.weight" for p in PROJECTIONS))
                                                 or expert_parts(name) is not None)


def layer_type(name: str) -> str:
    """'q_proj', 'gate_proj', ... ('w1', 'w3', 'w2' for an expert) of a projection weight name."""
    return name.rsplit(".", 2)[-2]


def packed_tensors(scheme: Int4Scheme, out: int, inp: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(suffix replacing 'weight', dtype, shape) of one quantized Linear, in file order."""
    groups = inp // scheme.group_size
    if scheme.format == "gptq":
        return [("qweight", torch.int32, (inp // PACK, out)),
                ("qzeros", torch.int32, (groups, out // PACK)),
                ("scales", torch.float16, (groups, out)),
                ("g_idx", torch.int32, (inp,))]
    if scheme.format == "awq":
        return [("qweight", torch.int32, (inp, out // PACK)),
                ("qzeros", torch.int32, (groups, out // PACK)),
                ("scales", torch.float16, (groups, out))]
    tensors = [("weight_packed", torch.int32, (out, inp // PACK)),
               ("weight_scale", torch.float16, (out, groups)),
               ("weight_shape", torch.int64, (2,))]
    if not scheme.sym:
        tensors.append(("weight_zero_point", torch.int32, (out // PACK, groups)))
    return tensors


def check_shapes(shapes: dict[str, tuple[int, ...]], group_size: int, where: str) -> None:
    """Every projection must cut into whole groups; the first that cannot is refused by name,
    with the group sizes that would fit the whole model (if any)."""
    inputs = sorted({shape[1] for shape in shapes.values()})
    fits = [g for g in GROUP_SIZES if all(i % g == 0 for i in inputs)]
    hint = (f"use --group-size {' or '.join(map(str, fits))}" if fits else
            f"no supported group size ({', '.join(map(str, GROUP_SIZES))}) divides every input size "
            f"of this model: {', '.join(map(str, inputs))}")
    for name, (out, inp) in shapes.items():
        if inp % group_size:
            raise ConvertError(f"{where}: tensor '{name}' has input size {inp}, not a multiple of "
                               f"--group-size {group_size} ({hint})")
        if out % PACK:
            raise ConvertError(f"{where}: tensor '{name}' has output size {out}, not a multiple of {PACK} "
                               "(INT4 packs 8 output columns per zero-point word)")


def quantization_config(scheme: Int4Scheme, method: str, ignore: tuple[str, ...] = ("lm_head",)) -> dict:
    """config.json's `quantization_config` (and GPTQ's quantize_config.json); `method` says how the
    codes were chosen (int4_writer.method_name); `ignore`: the Linear modules compressed-tensors
    leaves unquantized (the family's `int4_ignore`)."""
    if scheme.format == "gptq":
        return {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": scheme.group_size,
            "desc_act": False,
            "sym": scheme.sym,
            "lm_head": False,
            "true_sequential": True,
            "static_groups": False,
            "checkpoint_format": "gptq",
            "pack_dtype": "int32",
            "meta": {"quantizer": [f"minicpm-convert:{__version__}"], "method": method},
        }
    if scheme.format == "awq":
        # AutoAWQ's AwqConfig.to_transformers_dict() (keys in its order); the method is in
        # quantization_report.json and the card. modules_to_not_convert names lm_head (AutoAWQ's
        # quantize(modules_to_not_convert=...) writes a list the same way): left null, vLLM guesses
        # the unquantized modules from every *.safetensors file in the folder, and the names in
        # rescaling.safetensors ('model.layers.0.mlp.down_proj') make it skip every projection.
        return {
            "quant_method": "awq",
            "zero_point": True,
            "group_size": scheme.group_size,
            "bits": 4,
            "version": "gemm",
            "modules_to_not_convert": ["lm_head"],
        }
    weights = {"num_bits": 4, "type": "int", "symmetric": scheme.sym, "strategy": "group",
               "group_size": scheme.group_size, "dynamic": False, "actorder": None, "observer": "minmax"}
    if not scheme.sym:
        weights["zp_dtype"] = "torch.int8"  # compressed-tensors' signed int4 zero point
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": None, "output_activations": None,
                                      "format": "pack-quantized"}},
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def read_scheme(qc, where: str) -> Int4Scheme:
    """The scheme of an export's `quantization_config`; anything this reader cannot decode is refused."""
    if not isinstance(qc, dict):
        raise ConvertError(f"{where}: 'quantization_config' is not an object")
    method = qc.get("quant_method")
    if method == "gptq":
        if qc.get("bits") != 4:
            raise ConvertError(f"{where}: GPTQ with bits={qc.get('bits')!r} (only 4-bit is supported)")
        fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
        if fmt != "gptq":
            raise ConvertError(f"{where}: GPTQ checkpoint_format {fmt!r} (only 'gptq', v1, is supported)")
        if qc.get("desc_act"):
            raise ConvertError(f"{where}: GPTQ with desc_act=true is not supported")
        return Int4Scheme("gptq", _group_size(qc.get("group_size"), where), bool(qc.get("sym", True)))
    if method == "compressed-tensors":
        if qc.get("format") != "pack-quantized":
            raise ConvertError(f"{where}: compressed-tensors format {qc.get('format')!r} "
                               "(only 'pack-quantized' is supported)")
        groups = qc.get("config_groups") or {}
        if len(groups) != 1:
            raise ConvertError(f"{where}: expected one compressed-tensors config group, found {len(groups)}")
        weights = next(iter(groups.values())).get("weights") or {}
        if weights.get("num_bits") != 4 or weights.get("type") != "int" or weights.get("strategy") != "group":
            raise ConvertError(f"{where}: compressed-tensors weights {weights!r} are not 4-bit int groups")
        return Int4Scheme("compressed-tensors", _group_size(weights.get("group_size"), where),
                          bool(weights.get("symmetric", True)))
    if method == "awq":
        bits = qc.get("bits", qc.get("w_bit"))
        if bits != 4:
            raise ConvertError(f"{where}: AWQ with bits={bits!r} (only 4-bit is supported)")
        version = qc.get("version", qc.get("format", "gemm"))
        if not isinstance(version, str) or version.lower() != "gemm":
            raise ConvertError(f"{where}: AWQ version {version!r} (only 'gemm' is supported)")
        if qc.get("zero_point", True) is not True:
            raise ConvertError(f"{where}: AWQ with zero_point={qc.get('zero_point')!r} (only zero_point true, "
                               "the GEMM layout AutoAWQ packs, is supported)")
        return Int4Scheme("awq", _group_size(qc.get("group_size", qc.get("q_group_size")), where), False)
    raise ConvertError(f"{where}: quant_method {method!r} is not an INT4 format this tool reads "
                       f"({', '.join(FORMATS)})")


def _group_size(value, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % PACK:
        raise ConvertError(f"{where}: group_size {value!r} must be a positive multiple of {PACK}")
    return value
