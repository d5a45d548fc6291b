"""INT4 checkpoint: the Llama-format stream with the seven projections of every block 4-bit
group-quantized (GPTQ or compressed-tensors packing), everything else float16.

Streaming: each shard's header is known in advance (packed shapes follow from the weight shapes),
then tensors are produced one at a time; a projection is read in row chunks (groups run along
the input dimension, so any split of output rows quantizes the same) and only its 4-bit codes
are held whole while it is packed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...sources.checkpoint import Checkpoint
from ...errors import ConvertError
from .int4 import Int4Scheme, check_shapes, is_projection, layer_type, packed_tensors, quantization_config
from ...progress import progress_bar
from ...quants import int4
from ...sources.safetensors_file import safetensors_header, write_tensor
from ...stream import TensorJob, llama_config
from .llama import plan_shards, write_side_files

FLOAT_DTYPE = torch.float16  # embeddings, norms and lm_head, as GPTQ and llm-compressor exports keep them
REPORT_FILE = "quantization_report.json"


@dataclass
class ErrorReport:
    """||W - W_hat|| / ||W|| of every quantized tensor, with the search and with plain rounding."""
    search: dict[str, float] = field(default_factory=dict)
    rtn: dict[str, float] = field(default_factory=dict)

    def by_layer_type(self) -> dict[str, dict[str, float | None]]:
        table: dict[str, dict[str, float | None]] = {}
        for name, rtn in self.rtn.items():
            kind = layer_type(name)
            table.setdefault(kind, {"rtn": [], "search": []})
            table[kind]["rtn"].append(rtn)
            if name in self.search:
                table[kind]["search"].append(self.search[name])
        mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
        return {k: {"rtn": mean(v["rtn"]), "search": mean(v["search"])} for k, v in table.items()}



def _sum_sq(t: torch.Tensor) -> float:
    """Sum of squares with NumPy's pairwise sum: torch's threaded reduction varies in the last
    bits with the thread count, and the report must be byte-identical across machines."""
    return float(np.square(t.double().numpy()).sum())

def _entries(job: TensorJob, scheme: Int4Scheme) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    if not is_projection(job.name):
        return [(job.name, FLOAT_DTYPE, job.shape)]
    prefix = job.name.removesuffix("weight")
    return [(prefix + suffix, dtype, shape) for suffix, dtype, shape in packed_tensors(scheme, *job.shape)]


def _nbytes(entries) -> int:
    return sum(int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
               for _, dtype, shape in entries)


def _quantize(job: TensorJob, scheme: Int4Scheme, search: bool, report: ErrorReport) -> dict[str, torch.Tensor]:
    """Quantize one projection chunk by chunk; pack it; record its error (and plain rounding's)."""
    g = scheme.group_size
    parts, sq = [], {"w": 0.0, "search": 0.0, "rtn": 0.0}
    for start, stop in job.chunks():
        w = job.read(start, stop)
        try:
            codes, scales, zeros = int4.quantize_groups(w, g, scheme.sym, search)
            rtn = int4.quantize_groups(w, g, scheme.sym, False) if search else (codes, scales, zeros)
        except ValueError as exc:
            raise ConvertError(f"tensor '{job.name}': cannot quantize ({exc})") from None
        sq["w"] += _sum_sq(w)
        sq["search"] += _sum_sq(w - int4.dequantize(codes, scales, zeros, g))
        sq["rtn"] += _sum_sq(w - int4.dequantize(*rtn, g))
        parts.append((codes, scales, zeros))
    codes, scales, zeros = (torch.cat(p) for p in zip(*parts))
    norm = sq["w"] ** 0.5 or 1.0
    report.rtn[job.name] = sq["rtn"] ** 0.5 / norm
    if search:
        report.search[job.name] = sq["search"] ** 0.5 / norm
    if scheme.format == "gptq":
        packed = int4.pack_gptq(codes, scales, zeros, g)
    else:
        packed = int4.pack_compressed(codes, scales, zeros, g, scheme.sym)
    prefix = job.name.removesuffix("weight")
    return {prefix + k: v for k, v in packed.items()}


def check_quantizable(ckpt: Checkpoint, jobs: list[TensorJob], group_size: int) -> None:
    """Before anything is written: every projection must cut into whole groups."""
    check_shapes({j.name: j.shape for j in jobs if is_projection(j.name)}, group_size, str(ckpt.folder))


def write_int4(ckpt: Checkpoint, jobs: list[TensorJob], out: Path, scheme: Int4Scheme, *, search: bool = True,
               shard_bytes: int = 2 * 1000 ** 3, quiet: bool = False) -> ErrorReport:
    """Write the INT4 export into the folder `out`; return the weight errors (also saved as JSON)."""
    check_quantizable(ckpt, jobs, scheme.group_size)
    report = ErrorReport()
    shards = plan_shards(jobs, lambda job: _nbytes(_entries(job, scheme)), shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    total_in = sum(j.rows * j.row_values * 4 for j in jobs)
    with progress_bar(f"to-int4 {scheme.format}", total_in, len(jobs), quiet=quiet) as advance:
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            entries = [e for job in shard for e in _entries(job, scheme)]
            with open(out / fname, "wb") as f:
                f.write(safetensors_header(entries))
                for job in shard:
                    if is_projection(job.name):
                        packed = _quantize(job, scheme, search, report)
                        # The header was written from packed_tensors(): the data must match it.
                        assert [(n, t.dtype, tuple(t.shape)) for n, t in packed.items()] == _entries(job, scheme)
                        for name, tensor in packed.items():
                            write_tensor(f, tensor)
                            weight_map[name] = fname
                    else:
                        for start, stop in job.chunks():
                            write_tensor(f, job.read(start, stop).to(FLOAT_DTYPE))
                        weight_map[job.name] = fname
                    advance(job.rows * job.row_values * 4, job.name)
            total += _nbytes(entries)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    qc = quantization_config(scheme, search)
    cfg = llama_config(ckpt.spec, FLOAT_DTYPE) | {"quantization_config": qc}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if scheme.format == "gptq":  # GPTQModel and AutoGPTQ read this file rather than config.json
        (out / "quantize_config.json").write_text(json.dumps(qc, indent=2) + "\n")
    write_side_files(ckpt, out)
    (out / REPORT_FILE).write_text(json.dumps(report_json(scheme, search, report), indent=2) + "\n")
    return report


def report_json(scheme: Int4Scheme, search: bool, report: ErrorReport) -> dict:
    return {
        "format": scheme.format, "group_size": scheme.group_size, "sym": scheme.sym, "search": search,
        "metric": "relative weight error ||W - W_hat|| / ||W||, mean over layers",
        "by_layer_type": report.by_layer_type(),
        "tensors": {name: {"rtn": rtn, "search": report.search.get(name)} for name, rtn in report.rtn.items()},
    }
