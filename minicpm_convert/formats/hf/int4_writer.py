"""INT4 checkpoint: the Llama-format stream with the seven projections of every block 4-bit
group-quantized (GPTQ, compressed-tensors or AWQ packing), everything else float16.

Streaming: each shard's header is known in advance (packed shapes follow from the weight shapes),
then tensors are produced in order; a projection is read in row chunks (groups run along the
input dimension, so any split of output rows quantizes the same), each chunk quantized and packed
on the thread pool, and only the packed tensors of one projection are held whole while they are
written.
"""

from __future__ import annotations

import json
from contextlib import closing, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ...sources.checkpoint import Checkpoint
from ...errors import ConvertError
from .int4 import Int4Scheme, check_shapes, is_projection, layer_type, packed_tensors, quantization_config
from ...progress import progress_bar
from ...quants import int4, int4_awq
from ...sources.safetensors_file import safetensors_header, write_tensor
from ...stream import PARALLEL_CHUNK_VALUES, TensorJob, ordered_map, torch_threads, worker_threads
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


def _pack(scheme: Int4Scheme, codes, scales, zeros) -> dict[str, torch.Tensor]:
    """suffix -> packed tensor of (rows of) one projection, in the export's layout."""
    g = scheme.group_size
    if scheme.format == "gptq":
        return int4.pack_gptq(codes, scales, zeros, g)
    if scheme.format == "awq":
        return int4_awq.pack_awq(codes, scales, zeros, g)
    return int4.pack_compressed(codes, scales, zeros, g, scheme.sym)


def _row_dims(scheme: Int4Scheme, inp: int) -> dict[str, int | None]:
    """Per packed tensor, the dimension along the output rows (0, or 1 in GPTQ's and AWQ's
    transposed layouts), None for one that does not grow with them (g_idx, weight_shape)."""
    one, two = packed_tensors(scheme, int4.PACK, inp), packed_tensors(scheme, 2 * int4.PACK, inp)
    return {name: next((d for d, (a, b) in enumerate(zip(s1, s2)) if a != b), None)
            for (name, _, s1), (_, _, s2) in zip(one, two)}


def _join(parts: list[dict[str, torch.Tensor]], scheme: Int4Scheme, out: int, inp: int) -> dict[str, torch.Tensor]:
    """A projection's packed tensors from those of its row chunks (in row order)."""
    joined = {}
    for name, dim in _row_dims(scheme, inp).items():
        pieces = [p[name] for p in parts]
        joined[name] = pieces[0] if dim is None or len(pieces) == 1 else torch.cat(pieces, dim)
    if "weight_shape" in joined:  # each chunk's names its own rows
        joined["weight_shape"] = torch.tensor([out, inp], dtype=torch.int64)
    return joined


def _quantize_chunk(job: TensorJob, span: tuple[int, int], scheme: Int4Scheme, search: bool):
    """One row chunk, on a worker thread: a projection's rows quantized and packed (with their
    error sums), any other tensor's cast to float16."""
    rows = job.read(*span)
    if not is_projection(job.name):
        return rows.to(FLOAT_DTYPE), None
    try:
        (codes, scales, zeros), sq = _quantize_rows(rows, scheme, search)
    except ValueError as exc:
        raise ConvertError(f"tensor '{job.name}': cannot quantize ({exc})") from None
    return _pack(scheme, codes, scales, zeros), sq


def _chunks(job: TensorJob) -> list[tuple[int, int]]:
    # whole zero-point words: 8 output rows per chunk at least (the last may be shorter only at the end)
    return list(job.chunks(PARALLEL_CHUNK_VALUES, int4.PACK))


def _record(report: ErrorReport, name: str, sq: dict, searched: bool) -> None:
    norm = sq["w"] ** 0.5 or 1.0
    report.rtn[name] = sq["rtn"] ** 0.5 / norm
    if searched:
        report.search[name] = sq["found"] ** 0.5 / norm


def _quantize_calibrated(job: TensorJob, scheme: Int4Scheme, search: bool, report: ErrorReport,
                         calibrated) -> dict[str, torch.Tensor]:
    """Quantize one projection by GPTQ with the calibration pass; pack it; record its error (and
    plain rounding's)."""
    g = scheme.group_size
    try:
        codes, scales, zeros = calibrated.quantize(job.name)
        w = calibrated.scaled_weight(job.name, job.read_all())
        rtn = int4.quantize_groups(w, g, scheme.sym, False)
    except ValueError as exc:
        raise ConvertError(f"tensor '{job.name}': cannot quantize ({exc})") from None
    sq = {"w": _sum_sq(w), "found": _sum_sq(w - int4.dequantize(codes, scales, zeros, g)),
          "rtn": _sum_sq(w - int4.dequantize(*rtn, g))}
    _record(report, job.name, sq, True)
    prefix = job.name.removesuffix("weight")
    return {prefix + k: v for k, v in _pack(scheme, codes, scales, zeros).items()}


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
        if calibration.awq:  # the norms are written as AWQ scaled them, once their block is calibrated
            norms = {n.norm for n in int4_rescale.norm_scales(llama_spec)}
            jobs = [replace(j, read=lambda a, b, n=j.name: calibrated.norm(n)[a:b]) if j.name in norms else j
                    for j in jobs]
    shards = plan_shards(jobs, lambda job: _nbytes(_entries(job, scheme)), shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    total_in = sum(j.rows * j.row_values * 4 for j in jobs)
    # Data-free, the thread pool runs row chunks side by side: torch's own intra-op threads would
    # only contend with it. GPTQ's matrix products use them instead.
    intra = torch.get_num_threads() if calibrated is not None or worker_threads() == 1 else 1
    with progress_bar(f"to-int4 {scheme.format}", total_in, len(jobs), quiet=quiet) as advance, \
            torch_threads(intra):
        if calibrated is not None:
            calibrated.on_progress = advance.status
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            entries = [e for job in shard for e in _entries(job, scheme)]
            # Data-free, every row chunk of the shard (projections and float tensors alike) is one
            # stream on the thread pool, so it never drains at a tensor's end; this thread writes.
            stream = None
            if calibrated is None:
                items = [(job, span) for job in shard for span in _chunks(job)]
                stream = ordered_map(lambda item: _quantize_chunk(*item, scheme, search), items)
            with open(out / fname, "wb") as f, (closing(stream) if stream is not None else nullcontext()):
                f.write(safetensors_header(entries))
                for job in shard:
                    if is_projection(job.name):
                        if calibrated is None:
                            parts, sq = [], {"w": 0.0, "found": 0.0, "rtn": 0.0}
                            for _ in _chunks(job):
                                packed_rows, chunk_sq = next(stream)
                                parts.append(packed_rows)
                                for k in sq:
                                    sq[k] += chunk_sq[k]
                            _record(report, job.name, sq, search)
                            prefix = job.name.removesuffix("weight")
                            packed = {prefix + k: v for k, v in _join(parts, scheme, *job.shape).items()}
                        else:
                            packed = _quantize_calibrated(job, scheme, search, report, calibrated)
                        # The header was written from packed_tensors(): the data must match it.
                        assert [(n, t.dtype, tuple(t.shape)) for n, t in packed.items()] == _entries(job, scheme)
                        for name, tensor in packed.items():
                            write_tensor(f, tensor)
                            weight_map[name] = fname
                    else:
                        for span in _chunks(job):
                            write_tensor(f, next(stream)[0] if stream is not None
                                         else job.read(*span).to(FLOAT_DTYPE))
                        weight_map[job.name] = fname
                    advance(job.rows * job.row_values * 4, job.name)
            total += _nbytes(entries)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    methods = [int4_rescale.METHOD] if scales else []
    if calibrated is not None and calibrated.awq_scales:
        scales = scales | calibrated.awq_scales
        methods.append(int4_rescale.AWQ_METHOD)
    if scales:
        save_file({k: v.contiguous() for k, v in scales.items()}, str(out / int4_rescale.FILE),
                  metadata={"method": "+".join(methods)})
    method = method_name(search, rescale, calibration)
    qc = quantization_config(scheme, method, family_of(llama_spec).int4_ignore(llama_spec))
    cfg = family_of(ckpt.spec).llama_config(ckpt.spec, FLOAT_DTYPE) | {"quantization_config": qc}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if scheme.format == "gptq":  # GPTQModel and AutoGPTQ read this file rather than config.json
        (out / "quantize_config.json").write_text(json.dumps(qc, indent=2) + "\n")
    write_side_files(ckpt, out)
    summary = report_json(scheme, method, report)
    if calibrated is not None and calibrated.awq_alphas:  # AWQ's chosen exponent per norm (null: no scaling)
        summary["awq_alpha"] = calibrated.awq_alphas
    if calibrated is not None and calibrated.uncalibrated:  # experts no calibration token reached: data-free
        summary["uncalibrated"] = calibrated.uncalibrated
    (out / REPORT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return report


def method_name(search: bool, rescale: bool, calibration: Calibration | None) -> str:
    """How the codes were chosen, as the report and quantization_config's meta say."""
    if calibration is not None:
        what = f"({len(calibration.samples)} x {calibration.seq_len} tokens of {calibration.name})"
        scales = "search" if search else "minmax"
        if calibration.gptq:  # verify reads a method starting with "gptq" as error-compensated codes
            base = f"gptq{'-act-order' if calibration.act_order else ''} {what}, {scales} scales"
        else:
            base = f"awq {what}, {scales} scales"
        if calibration.awq:
            base += ", awq-scaled q/k/v and gate/up"
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
