"""GGUF for llama.cpp: the model family chooses the architecture (`minicpm` with the scales as
metadata, `llama` with them folded in, `minicpm3` for MLA), its keys and its tensors.

Tensors are written in llama-quantize's order with llama-quantize's type plan, each read,
permuted, quantized and written in row chunks, so memory stays at one chunk of one tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter

from ... import __version__
from ...errors import ConvertError
from ...families import family_of
from ...progress import progress_bar
from ...quants import quantize
from ...sources.checkpoint import Checkpoint
from ...stream import PARALLEL_CHUNK_VALUES, Scratch, TensorJob, ordered_map
from .metadata import GeneralMetadata, general_metadata
from .packing import ArrayPackingWriter
from .plan import FileType, ModelFacts, Options, Plan, TensorChoice, make_plan, sort_key
from .split import OUR_KEY, Split
from .vocab import add_vocab


def file_arch(ckpt: Checkpoint, requested: str | None) -> str:
    """The GGUF architecture written for `--arch requested` (None: the family's own)."""
    return family_of(ckpt.spec).gguf_arch(ckpt.spec, requested)


def gguf_jobs(ckpt: Checkpoint, arch: str) -> list[tuple[str, TensorJob]]:
    """(gguf name, job) in llama-quantize's order; a tied minicpm head is not written."""
    named = family_of(ckpt.spec).gguf_jobs(ckpt, arch)
    return sorted(named, key=lambda item: sort_key(item[0]))


def add_metadata(w: GGUFWriter, ckpt: Checkpoint, arch: str, ft: FileType, general: GeneralMetadata) -> None:
    """Every key but the imatrix provenance, in llama.cpp's converter's order: general.*, ours,
    the architecture's, file type, vocabulary."""
    spec = ckpt.spec
    general.write(w)
    w.add_string(OUR_KEY, __version__)
    w.add_string("minicpm_convert.arch", arch)
    family_of(spec).gguf_metadata(w, spec, arch)
    w.add_file_type(int(ft.ftype))
    w.add_quantization_version(2)
    add_vocab(w, ckpt.folder, spec.vocab_size)


def source_metadata(ckpt: Checkpoint, arch: str, source: str, **kwargs) -> GeneralMetadata:
    """The general.* keys for SRC `source` (kwargs: general_metadata's --metadata/--model-name)."""
    from ...sources.checkpoint import hub_repo_id
    jobs = gguf_jobs(ckpt, arch)
    return general_metadata(ckpt.folder, [(n, tuple(j.shape)) for n, j in jobs],
                            repo_id=hub_repo_id(source, ckpt.folder), **kwargs)


def encode(rows: torch.Tensor, qtype: T, qw: np.ndarray | None = None, first: int = 0) -> np.ndarray:
    """Rows (or, for a stacked 3-D tensor, experts ``first``..) in ``qtype``; ``qw``: the tensor's
    importance array (one slice of n_cols per expert for a stack, as llama-quantize slices it)."""
    x = rows.numpy()
    if qtype == T.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 3 and qw is not None:
        n = x.shape[-1]
        return np.concatenate([quantize(e, qtype, qw[(first + k) * n:(first + k + 1) * n]).reshape(-1)
                               for k, e in enumerate(x)])
    return quantize(x.reshape(-1, x.shape[-1]), qtype, qw)


def model_facts(ckpt: Checkpoint, arch: str, jobs: list[tuple[str, TensorJob]]) -> ModelFacts:
    spec = ckpt.spec
    return ModelFacts(arch, spec.num_hidden_layers, spec.num_attention_heads, spec.num_key_value_heads,
                      tuple((name, tuple(job.shape)) for name, job in jobs), spec.num_experts or 0)


def plan_gguf(ckpt: Checkpoint, arch: str | None, options: Options) -> Plan:
    """llama-quantize's type plan for this checkpoint's GGUF (what --dry-run shows)."""
    arch = file_arch(ckpt, arch)
    return make_plan(model_facts(ckpt, arch, gguf_jobs(ckpt, arch)), options)


def tensor_importance(t: TensorChoice, imatrix) -> np.ndarray | None:
    """llama-quantize's lookup of a tensor's importance data: by name, used when its size is
    n_cols (x n_expert); a size mismatch is an error but for token_embd; a type that needs the
    data and finds none is refused ("Missing importance matrix ... in a very low-bit quantization")."""
    if imatrix is None or t.type == T.F32:  # copied, not quantized
        return None
    qw = imatrix.weights(t.name)
    size = t.shape[-1] * (t.shape[0] if len(t.shape) == 3 else 1)
    if qw is not None and qw.size != size:
        if t.name not in ("token_embd.weight", "per_layer_token_embd.weight"):
            raise ConvertError(f"importance matrix: {t.name} has {qw.size} values, the tensor needs {size}")
        qw = None
    if qw is None and t.requires_imatrix:
        raise ConvertError(f"importance matrix: no data for {t.name}, which {t.type.name} needs")
    return qw


def _encode_chunk(item, buf: Scratch) -> tuple[bytes | np.ndarray, int]:
    """One unit of work for the pool: read rows, permute Q/K, quantize. Thread-safe."""
    job, start, stop, heads, qtype, qw = item
    float_type = FLOAT_TYPES.get(qtype)
    if float_type is not None:
        # A float type: read, permuted and cast in one pass into buf (stream.TensorJob.read_as).
        out = job.read_as(start, stop, float_type, heads, buf)
        return (out.view(torch.int16) if float_type is torch.bfloat16 else out).numpy(), out.numel() * 4
    # float32 rows for the quantizer, read, folded, permuted and checked in one pass into buf
    rows = job.read_as(start, stop, torch.float32, heads, buf)
    try:
        return encode(rows, qtype, qw, start), rows.numel() * 4
    except ValueError as e:  # a quantizer refusing what llama.cpp cannot quantize either
        raise ConvertError(f"{job.name}: {e}") from None


FLOAT_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}


def row_bytes(qtype: T, ncols: int) -> int:
    from gguf import GGML_QUANT_SIZES
    block, size = GGML_QUANT_SIZES[qtype]
    return ncols // block * size


def _tensor_index(w: GGUFWriter, jobs, plan) -> None:
    """Each tensor's name, shape, type and size (the writer also assigns it to a split file)."""
    for name, job in jobs:
        nbytes = (job.rows * job.row_values // job.shape[-1] * row_bytes(plan[name], job.shape[-1])
                  if len(job.shape) > 1 else job.rows * 4)  # rows of all experts for a 3-D stack
        w.add_tensor_info(name, job.shape, np.dtype(np.float32), nbytes, raw_dtype=plan[name])


def _writer(arch: str, split: Split | None) -> GGUFWriter:
    """gguf-py's writer, vocabulary arrays packed whole (packing.py), split as asked."""
    import logging
    logging.getLogger("gguf.gguf_writer").setLevel(logging.ERROR)  # "not splitting": one file, as asked
    split = split or Split()
    return ArrayPackingWriter(None, arch, split_max_tensors=split.max_tensors, split_max_size=split.max_bytes)


def file_count(ckpt: Checkpoint, arch: str | None, options: Options, split: Split) -> int:
    """How many files the GGUF takes with these split limits (1: not split)."""
    arch = file_arch(ckpt, arch)
    jobs = gguf_jobs(ckpt, arch)
    w = _writer(arch, split)
    _tensor_index(w, jobs, make_plan(model_facts(ckpt, arch, jobs), options).types())
    return len(w.tensors)


def _header(ckpt, arch, ft, general, jobs, plan, imatrix, split=None) -> GGUFWriter:
    """A writer holding the metadata and tensor index of the file(s) (no data yet)."""
    w = _writer(arch, split)
    add_metadata(w, ckpt, arch, ft, general)
    if imatrix is not None:  # the provenance keys llama-quantize adds (tools/quantize, kv overrides)
        w.add_string("quantize.imatrix.file", str(imatrix.path)[:127])
        if imatrix.datasets:
            w.add_string("quantize.imatrix.dataset", imatrix.datasets[0][:127])
        w.add_uint32("quantize.imatrix.entries_count", len(imatrix.entries))
        if imatrix.chunk_count > 0:
            w.add_uint32("quantize.imatrix.chunks_count", imatrix.chunk_count)
    _tensor_index(w, jobs, plan)
    return w


def dry_run(ckpt: Checkpoint, arch: str | None, source: str, options: Options, imatrix=None, *,
            general: GeneralMetadata | None = None, split: Split | None = None) -> dict:
    """llama-quantize --dry-run: the plan report (type per tensor, fallbacks, bits per weight and
    the exact file size; with split limits, each file's) without quantizing anything."""
    import tempfile

    from .plan import report

    arch = file_arch(ckpt, arch)
    jobs = gguf_jobs(ckpt, arch)
    chosen = make_plan(model_facts(ckpt, arch, jobs), options)
    w = _header(ckpt, arch, options.file_type, general or source_metadata(ckpt, arch, source), jobs,
                chosen.types(), imatrix, split)
    with tempfile.TemporaryDirectory() as tmp:
        w.write_header_to_file(Path(tmp) / "header.gguf")
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        heads = [f.tell() for f in w.fout]
        w.close()
    found = report(chosen, heads[0])
    if len(heads) > 1:
        pad = lambda n: -(-n // 32) * 32  # noqa: E731 - GGUF's default alignment
        found["files"] = [{"tensors": len(t), "bytes": pad(h) + sum(pad(ti.nbytes) for ti in t.values())}
                          for h, t in zip(heads, w.tensors)]
        found["file_bytes"] = sum(f["bytes"] for f in found["files"])
    return found


def write_gguf(ckpt: Checkpoint, out: Path, ft: FileType, arch: str | None, source: str, *, quiet: bool = False,
               threads: int | None = None, options: Options | None = None, imatrix=None,
               general: GeneralMetadata | None = None, split: Split | None = None) -> dict[str, T]:
    """Write the GGUF file at `out` (with split limits, the set `out`'s stem names, beside it:
    formats/gguf/split.py); return the type chosen for each tensor.

    `arch`: the requested architecture (None: the family's own).
    `options`: llama-quantize's per-tensor options (default: none, for file type `ft`);
    `imatrix`: an ImportanceMatrix (formats.gguf.imatrix) or None.
    `general`: the general.* keys (default: llama.cpp's converter's for `source`).
    `threads`: worker threads (default: every CPU, see stream.worker_threads); the file's bytes
    are the same for any count."""
    arch = file_arch(ckpt, arch)
    jobs = gguf_jobs(ckpt, arch)
    chosen = make_plan(model_facts(ckpt, arch, jobs), options or Options(ft, imatrix=imatrix is not None))
    chosen.check()
    if imatrix is not None:
        imatrix.check_finite()
    qws = {t.name: tensor_importance(t, imatrix) for t in chosen.tensors}
    plan = chosen.types()
    w = _header(ckpt, arch, ft, general or source_metadata(ckpt, arch, source), jobs, plan, imatrix, split)
    w.write_header_to_file(out)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    file_of = {name: w.fout[k] for k, tensors in enumerate(w.tensors) for name in tensors}
    total = sum(j.rows * j.row_values * 4 for _, j in jobs)

    def work():  # (tensor index, is its last chunk, work item) in file order
        for i, (name, job) in enumerate(jobs):
            head_rows = job.rows // job.rope_heads if job.rope_heads else 1
            chunks = list(job.chunks(PARALLEL_CHUNK_VALUES, head_rows))  # a permutation needs whole heads
            for k, (start, stop) in enumerate(chunks):
                heads = (stop - start) // head_rows if job.rope_heads else None  # in this chunk
                yield i, k == len(chunks) - 1, (job, start, stop, heads, plan[name], qws[name])

    items = list(work())
    with progress_bar(f"to-gguf {ft.name}", total, len(jobs), quiet=quiet) as advance:
        # Threads read and quantize chunks; this thread writes them in file order, so the bytes
        # do not depend on the thread count.
        results = ordered_map(_encode_chunk, [it for _, _, it in items], threads, scratch=True)
        current = -1
        for (i, last, _), (data, nbytes) in zip(items, results):
            f = file_of[jobs[i][0]]
            if i != current:
                w.write_padding(f, f.tell())
                current = i
            f.write(memoryview(data).cast("B"))
            advance(nbytes, "")
            if last:
                advance(0, jobs[i][0])
                w.write_padding(f, f.tell())
    w.close()
    return plan
