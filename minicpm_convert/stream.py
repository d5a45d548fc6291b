"""The stream of tensors every exporter consumes.

A `TensorJob` names an output tensor (Hugging Face naming), its shape, and how to read any range
of its rows in float32. Nothing is read until a sink asks, and a sink asks for row chunks, so a
1 GB embedding never sits in memory whole. Two streams exist: the checkpoint as stored
(`source_stream`, for GGUF arch minicpm) and the Llama-format one (`llama_stream`, for to-llama,
GGUF arch llama and INT4), which the model's family makes (folding MiniCPM's muP scalars in).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch

from .sources.checkpoint import Checkpoint, check_finite

# Rows per read are chosen so a chunk holds about this many float32 values (64 MB).
CHUNK_VALUES = 16 * 1024 * 1024
# Chunks handed to worker threads: small enough that a chunk's source and result stay in a
# core's cache (1 MB each in bf16) until they are written, large enough that per-chunk overhead
# vanishes. On the 2B f16 GGUF, 4M-value chunks cost 9.4 s of kernel time in write() (copying
# 8 MB buffers that left the cache), 512K-value ones 2.2-3.1 s; 128K ones add Python overhead.
PARALLEL_CHUNK_VALUES = 512 * 1024

_In = TypeVar("_In")
_Out = TypeVar("_Out")


def worker_threads() -> int:
    """Threads for chunk work: MINICPM_CONVERT_THREADS, else the CPUs this process may use."""
    env = os.environ.get("MINICPM_CONVERT_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class Scratch:
    """A reusable buffer: `get(nbytes)` gives the first nbytes of memory kept from call to call
    (grown when too small). Fresh chunk-sized arrays cost a page fault and the zeroing of every
    4 KB page, more than the cast written into them (the f16 GGUF profile: 3-4 s of kernel time
    for 5.45 GB, against 1 s for reading and casting into reused memory)."""

    def __init__(self):
        self._buf = np.empty(0, np.uint8)

    def get(self, nbytes: int) -> np.ndarray:
        if self._buf.size < nbytes:
            self._buf = np.empty(nbytes, np.uint8)
        return self._buf[:nbytes]


_thread_scratch = threading.local()


def thread_scratch() -> Scratch:
    """This thread's own scratch buffer (for data that does not leave the call that reads it)."""
    s = getattr(_thread_scratch, "s", None)
    if s is None:
        s = _thread_scratch.s = Scratch()
    return s


def ordered_map(fn: Callable[..., _Out], items: Iterable[_In], threads: int | None = None,
                ahead: int | None = None, *, scratch: bool = False) -> Iterator[_Out]:
    """fn over items on a thread pool, results yielded in the items' order.

    At most `ahead` results (default threads + 1) are pending, so memory stays bounded; the
    output never depends on the thread count (every item is computed the same way, and the
    consumer sees them in order). With one thread everything runs inline, in the caller's thread.
    The heavy work (file reads, torch casts, NumPy ops, the compiled quantizers) releases the GIL.

    With `scratch`, fn(item, buf) also gets a `Scratch` to build its result in: no running call
    and no result the consumer can still use shares it, provided the consumer is done with a
    result when it asks for the next one. (Item j is submitted only once the consumer asks for
    the result after item j - ahead, so items j - ahead + 1 .. j are the only live ones: slot
    j % ahead is free.)
    """
    threads = worker_threads() if threads is None else max(1, threads)
    if threads == 1:
        one = Scratch()
        for item in items:
            yield fn(item, one) if scratch else fn(item)
        return
    ahead = threads + 1 if ahead is None else max(1, ahead)
    slots = [Scratch() for _ in range(ahead)] if scratch else None
    pool = ThreadPoolExecutor(threads, thread_name_prefix="minicpm-convert")
    pending: deque = deque()
    try:
        for j, item in enumerate(items):
            pending.append(pool.submit(fn, item, slots[j % ahead]) if scratch else pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)


@dataclass(frozen=True)
class TensorJob:
    name: str
    shape: tuple[int, ...]
    source_dtype: torch.dtype
    read: Callable[[int, int], torch.Tensor]  # rows [start, stop) in float32
    # GGUF: rows of this many heads go to ggml's rope layout (q/k); the writer reads whole heads.
    rope_heads: int | None = None

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_values(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n

    def chunks(self, values: int = CHUNK_VALUES, multiple: int = 1) -> Iterator[tuple[int, int]]:
        """Row ranges of about `values` values, each a multiple of `multiple` rows (but the last)."""
        step = max(multiple, values // max(1, self.row_values) // multiple * multiple)
        for start in range(0, self.rows, step):
            yield start, min(self.rows, start + step)

    def read_all(self) -> torch.Tensor:
        return self.read(0, self.rows)

    def read_as(self, start: int, stop: int, dtype: torch.dtype, heads: int | None = None,
                out: Scratch | None = None) -> torch.Tensor:
        """Rows [start, stop) in a float dtype, in ggml's rope layout for `heads` heads (whole
        heads only): the values of ``permute_rows(read(start, stop), heads).to(dtype)``. A
        stored tensor (`StoredRows`) gets them in one pass, in `out`'s memory when given;
        anything else through float32."""
        if isinstance(self.read, StoredRows):
            return self.read.read_as(start, stop, dtype, heads, out)
        return _cast(self.read(start, stop), dtype, heads)

    def permuted(self, heads: int | None) -> "TensorJob":
        return replace(self, rope_heads=heads) if heads else self


# Compiled kernel codes of the float dtypes (quants/csrc/convert.c).
_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@dataclass(frozen=True)
class StoredRows:
    """Rows of a checkpoint tensor in float32, times `factor` and / `divisor` (folding in float32:
    the sink casts once at the end). Calling it gives those float32 rows; `read_as` the same
    values already cast, read and converted in one pass."""

    ckpt: Checkpoint
    name: str
    factor: float | None = None
    divisor: float | None = None

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        return self._fold(self.ckpt.read(self.name, start, stop))

    def _fold(self, t: torch.Tensor) -> torch.Tensor:
        if self.factor is not None:
            t = t * self.factor
        if self.divisor is not None:
            t = t / self.divisor
        return t

    def read_as(self, start: int, stop: int, dtype: torch.dtype, heads: int | None = None,
                out: Scratch | None = None) -> torch.Tensor:
        """``permute_rows(self(start, stop), heads).to(dtype)``: with the compiled kernel, one pass
        over the stored values (widen, check NaN/Inf, fold, permute, round: the same bits as torch's
        float32 path, tested on every bf16 and f16 value), read into this thread's scratch memory
        and written into `out` (else fresh memory); without it, torch from the stored rows (through
        float32 only when a value changes)."""
        from .quants.registry import compiled_module

        kernel = compiled_module()
        if kernel is None or dtype not in _KINDS or self.ckpt.dtype(self.name) not in _KINDS:
            src = self.ckpt.read_stored(self.name, start, stop)
            same = self.factor is None and self.divisor is None and src.dtype in _KINDS
            return _cast(src if same else self._fold(src.to(torch.float32)), dtype, heads)
        src = self.ckpt.read_unchecked(self.name, start, stop, thread_scratch()).contiguous()
        if src.numel() == 0:
            return torch.empty(src.shape, dtype=dtype)
        n = src.numel() * dtype.itemsize
        result = torch.empty(src.shape, dtype=dtype) if out is None else \
            torch.frombuffer(out.get(n), dtype=dtype).view(src.shape)
        cols = src.numel() // src.shape[0] if heads else src.numel()  # no permutation: one long row
        if kernel.convert(_raw(src), _KINDS[src.dtype], _raw(result), _KINDS[dtype], cols, self.factor,
                          self.divisor, src.shape[0] // heads // 2 if heads else 0):
            check_finite(self.name, src, self.ckpt.folder)  # raises, naming the tensor
        return result


def _cast(rows: torch.Tensor, dtype: torch.dtype, heads: int | None) -> torch.Tensor:
    if heads:
        from .formats.gguf.layout import permute_rows
        rows = permute_rows(rows, heads)
    return rows.to(dtype)


def _raw(t: torch.Tensor):
    """A NumPy view of a contiguous tensor's bytes (bfloat16 as int16)."""
    return (t.view(torch.int16) if t.dtype is torch.bfloat16 else t).numpy()


def reader(ckpt: Checkpoint, name: str, factor: float | None = None, divisor: float | None = None) -> StoredRows:
    """Rows of a checkpoint tensor in float32, times `factor` and / `divisor`."""
    return StoredRows(ckpt, name, factor, divisor)


def source_stream(ckpt: Checkpoint) -> list[TensorJob]:
    """The checkpoint's tensors as stored (muP scalars left for the runtime)."""
    return [TensorJob(n, ckpt.shape(n), ckpt.dtype(n), reader(ckpt, n)) for n in ckpt.names()]


def llama_stream(ckpt: Checkpoint) -> list[TensorJob]:
    """The Llama-format tensors of the checkpoint, as its family makes them."""
    from .families import family_of
    return family_of(ckpt.spec).llama_jobs(ckpt)


@contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` for the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
