"""The stream of tensors every exporter consumes.

A `TensorJob` names an output tensor (Hugging Face naming), its shape, and how to read any range
of its rows in float32. Nothing is read until a sink asks, and a sink asks for row chunks, so a
1 GB embedding never sits in memory whole. Two streams exist: the checkpoint as stored
(`source_stream`, for GGUF arch minicpm) and the Llama-format one (`llama_stream`, for to-llama,
GGUF arch llama and INT4), which the model's family makes (folding MiniCPM's muP scalars in).
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from .sources.checkpoint import Checkpoint

# Rows per read are chosen so a chunk holds about this many float32 values (64 MB).
CHUNK_VALUES = 16 * 1024 * 1024
# Chunks handed to worker threads: small enough that a few in flight stay far below 1 GB and
# every core has work until the end of a tensor, large enough that per-chunk overhead vanishes.
PARALLEL_CHUNK_VALUES = 4 * 1024 * 1024

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


def ordered_map(fn: Callable[[_In], _Out], items: Iterable[_In], threads: int | None = None,
                ahead: int | None = None) -> Iterator[_Out]:
    """fn over items on a thread pool, results yielded in the items' order.

    At most `ahead` results (default threads + 1) are pending, so memory stays bounded; the
    output never depends on the thread count (every item is computed the same way, and the
    consumer sees them in order). With one thread everything runs inline, in the caller's thread.
    The heavy work (file reads, torch casts, NumPy ops, the compiled quantizers) releases the GIL.
    """
    threads = worker_threads() if threads is None else max(1, threads)
    if threads == 1:
        for item in items:
            yield fn(item)
        return
    ahead = threads + 1 if ahead is None else max(1, ahead)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="minicpm-convert")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
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
    # Rows exactly as stored, when the job changes no value: a sink writing the source dtype
    # copies these instead of a float32 round trip (which would give the same bytes, slower).
    read_stored: Callable[[int, int], torch.Tensor] | None = None
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

    def chunks(self, values: int = CHUNK_VALUES) -> Iterator[tuple[int, int]]:
        step = max(1, values // max(1, self.row_values))
        for start in range(0, self.rows, step):
            yield start, min(self.rows, start + step)

    def read_all(self) -> torch.Tensor:
        return self.read(0, self.rows)

    def permuted(self, heads: int | None) -> "TensorJob":
        return replace(self, rope_heads=heads) if heads else self


def reader(ckpt: Checkpoint, name: str, factor: float | None = None, divisor: float | None = None):
    """Rows of a checkpoint tensor in float32, times `factor` and / `divisor` (folding in float32:
    the sink casts once at the end)."""
    def read(start: int, stop: int) -> torch.Tensor:
        t = ckpt.read(name, start, stop)
        if factor is not None:
            t = t * factor
        if divisor is not None:
            t = t / divisor
        return t
    return read


def stored_reader(ckpt: Checkpoint, name: str):
    return lambda start, stop: ckpt.read_stored(name, start, stop)


def source_stream(ckpt: Checkpoint) -> list[TensorJob]:
    """The checkpoint's tensors as stored (muP scalars left for the runtime)."""
    return [TensorJob(n, ckpt.shape(n), ckpt.dtype(n), reader(ckpt, n), stored_reader(ckpt, n))
            for n in ckpt.names()]


def llama_stream(ckpt: Checkpoint) -> list[TensorJob]:
    """The Llama-format tensors of the checkpoint, as its family makes them."""
    from .families import family_of
    return family_of(ckpt.spec).llama_jobs(ckpt)
