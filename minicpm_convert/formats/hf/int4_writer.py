"""INT4 checkpoint: the Llama-format stream with the seven projections of every block 4-bit
group-quantized (GPTQ, compressed-tensors or AWQ packing), everything else float16.

Streaming: each shard's header is known in advance (packed shapes follow from the weight shapes),
then tensors are produced one at a time; a projection is read in row chunks (groups run along
the input dimension, so any split of output rows quantizes the same) and only its 4-bit codes
are held whole while it is packed.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...sources.checkpoint import Checkpoint
from ...errors import ConvertError
from .int4 import Int4Scheme, check_shapes, is_projection, layer_type, packed_tensors, quantization_config
from ...progress import progress_bar
from ...quants import int4, int4_awq
from ...sources.safetensors_file import safetensors_header, write_tensor
from ...stream import PARALLEL_CHUNK_VALUES, TensorJob, ordered_map, worker_threads
from ...families import family_of
from ...calibrated import Calibration, GptqQuantizer
from . import int4_rescale
from .llama import plan_shards, write_side_files
from safetensors.torch import save_file

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


def _quantize_rows(w: torch.Tensor, scheme: Int4Scheme, search: bool):
    """(codes, scales, zeros) of rows of a projection, the data-free way, and the squared errors
    of those codes and of plain rounding with the sum of squares (for the report); rows quantize
    independently, so chunks can run on any thread."""
    codes, scales, zeros, errors = int4.quantize_groups_with_errors(w, scheme.group_size, scheme.sym, search)
    # per-group float32 sums, added in float64 in a fixed order: the report is the same on any machine
    found, rtn, total = errors.reshape(-1, 3).double().numpy().sum(0).tolist()
    return (codes, scales, zeros), {"w": total, "found": found, "rtn": rtn}


def _quantize(job: TensorJob, scheme: Int4Scheme, search: bool, report: ErrorReport,
              calibrated=None) -> dict[str, torch.Tensor]:
    """Quantize one projection (data-free chunk by chunk on the thread pool, or by GPTQ with the
    calibration pass); pack it; record its error (and plain rounding's)."""
    g = scheme.group_size
    try:
        if calibrated is None:
            def rows(span):
                return _quantize_rows(job.read(*span), scheme, search)
            parts, sq = [], {"w": 0.0, "found": 0.0, "rtn": 0.0}
            for found, chunk_sq in ordered_map(rows, job.chunks(PARALLEL_CHUNK_VALUES)):
                parts.append(found)
                for k in sq:
                    sq[k] += chunk_sq[k]
            codes, scales, zeros = (torch.cat(p) for p in zip(*parts))
        else:
            codes, scales, zeros = calibrated.quantize(job.name)
            w = job.read_all()
            rtn = int4.quantize_groups(w, g, scheme.sym, False)
            sq = {"w": _sum_sq(w), "found": _sum_sq(w - int4.dequantize(codes, scales, zeros, g)),
                  "rtn": _sum_sq(w - int4.dequantize(*rtn, g))}
    except ValueError as exc:
        raise ConvertError(f"tensor '{job.name}': cannot quantize ({exc})") from None
    norm = sq["w"] ** 0.5 or 1.0
    report.rtn[job.name] = sq["rtn"] ** 0.5 / norm
    if search or calibrated is not None:
        report.search[job.name] = sq["found"] ** 0.5 / norm
    if scheme.format == "gptq":
        packed = int4.pack_gptq(codes, scales, zeros, g)
    elif scheme.format == "awq":
        packed = int4_awq.pack_awq(codes, scales, zeros, g)
    else:
        packed = int4.pack_compressed(codes, scales, zeros, g, scheme.sym)
    prefix = job.name.removesuffix("weight")
    return {prefix + k: v for k, v in packed.items()}


@contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_quantizable(ckpt: Checkpoint, jobs: list[TensorJob], group_size: int) -> None:
    """Before anything is written: every projection must cut into whole groups."""
    check_shapes({j.name: j.shape for j in jobs if is_projection(j.name)}, group_size, str(ckpt.folder))


def write_int4(ckpt: Checkpoint, jobs: list[TensorJob], out: Path, scheme: Int4Scheme, *, search: bool = True,
               rescale: bool = True, calibration: Calibration | None = None, shard_bytes: int = 2 * 1000 ** 3,
               quiet: bool = False) -> ErrorReport:
    """Write the INT4 export into the folder `out`; return the weight errors (also saved as JSON).

    `rescale`: balance o_proj/down_proj columns against v_proj/up_proj rows first
    (`int4_rescale.py`; the scales go beside the export for verify). `calibration`: quantize by
    GPTQ on these samples (`calibrated.py`) instead of the data-free search."""
    check_quantizable(ckpt, jobs, scheme.group_size)
    report = ErrorReport()
    llama_spec = family_of(ckpt.spec).export_spec(ckpt.spec, "llama")
    scales = int4_rescale.compute({j.name: j for j in jobs}, llama_spec) if rescale else {}
    jobs = int4_rescale.apply(jobs, llama_spec, scales)
    calibrated = None
    if calibration is not None:
        calibrated = GptqQuantizer(jobs, ckpt.spec, calibration, scheme.group_size, scheme.sym, search)
    shards = plan_shards(jobs, lambda job: _nbytes(_entries(job, scheme)), shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    total_in = sum(j.rows * j.row_values * 4 for j in jobs)
    # Data-free, the thread pool runs row chunks side by side: torch's own intra-op threads would
    # only contend with it. GPTQ's matrix products use them instead.
    intra = torch.get_num_threads() if calibrated is not None or worker_threads() == 1 else 1
    with progress_bar(f"to-int4 {scheme.format}", total_in, len(jobs), quiet=quiet) as advance, \
            torch_threads(intra):
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            entries = [e for job in shard for e in _entries(job, scheme)]
            with open(out / fname, "wb") as f:
                f.write(safetensors_header(entries))
                for job in shard:
                    if is_projection(job.name):
                        packed = _quantize(job, scheme, search, report, calibrated)
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
    if scales:
        save_file({k: v.contiguous() for k, v in scales.items()}, str(out / int4_rescale.FILE),
                  metadata={"method": int4_rescale.METHOD})
    method = method_name(search, rescale, calibration)
    qc = quantization_config(scheme, method)
    cfg = family_of(ckpt.spec).llama_config(ckpt.spec, FLOAT_DTYPE) | {"quantization_config": qc}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if scheme.format == "gptq":  # GPTQModel and AutoGPTQ read this file rather than config.json
        (out / "quantize_config.json").write_text(json.dumps(qc, indent=2) + "\n")
    write_side_files(ckpt, out)
    (out / REPORT_FILE).write_text(json.dumps(report_json(scheme, method, report), indent=2) + "\n")
    return report


def method_name(search: bool, rescale: bool, calibration: Calibration | None) -> str:
    """How the codes were chosen, as the report and quantization_config's meta say."""
    if calibration is not None:
        base = f"gptq{'-act-order' if calibration.act_order else ''} ({len(calibration.samples)} x " \
               f"{calibration.seq_len} tokens of {calibration.name}), {'search' if search else 'minmax'} scales"
    else:
        base = "minmax-search" if search else "round-to-nearest"
    return base + (", sinkhorn-rescaled o/down" if rescale else "")


def report_json(scheme: Int4Scheme, method: str, report: ErrorReport) -> dict:
    return {
        "format": scheme.format, "group_size": scheme.group_size, "sym": scheme.sym,
        "search": bool(report.search), "method": method,
        "metric": "relative weight error ||W - W_hat|| / ||W||, mean over layers",
        "by_layer_type": report.by_layer_type(),
        "tensors": {name: {"rtn": rtn, "search": report.search.get(name)} for name, rtn in report.rtn.items()},
    }
