"""Llama-format checkpoint: sharded safetensors + index, config, tokenizer and generation config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from ...sources.checkpoint import Checkpoint
from ...progress import progress_bar
from ...sources.safetensors_file import safetensors_header, write_tensor
from ...stream import PARALLEL_CHUNK_VALUES, Scratch, TensorJob, ordered_map
from ...families import family_of

ELEMENT_SIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def plan_shards(jobs: list[TensorJob], size_of: Callable[[TensorJob], int], shard_bytes: int
                ) -> list[list[TensorJob]]:
    """Greedy shards in stream order, each at most shard_bytes unless one tensor is larger."""
    shards: list[list[TensorJob]] = [[]]
    size = 0
    for job in jobs:
        nbytes = size_of(job)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(job)
        size += nbytes
    return shards


def write_safetensors_shards(out: Path, jobs: list[TensorJob], dtype: torch.dtype, shard_bytes: int,
                             *, quiet: bool = False, label: str = "to-llama", threads: int | None = None) -> None:
    """Stream jobs, cast to `dtype`, into model-0000i-of-0000n.safetensors plus the index."""
    shards = plan_shards(jobs, lambda job: job.rows * job.row_values * ELEMENT_SIZE[dtype], shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    total_in = sum(j.rows * j.row_values * ELEMENT_SIZE[dtype] for j in jobs)
    def cast(item: tuple[TensorJob, int, int], buf: Scratch) -> torch.Tensor:  # runs on a worker thread
        job, start, stop = item
        return job.read_as(start, stop, dtype, out=buf)

    with progress_bar(label, total_in, len(jobs), quiet=quiet) as advance:
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            entries = [(j.name, dtype, j.shape) for j in shard]
            items = [(job, start, stop) for job in shard for start, stop in job.chunks(PARALLEL_CHUNK_VALUES)]
            with open(out / fname, "wb") as f:
                f.write(safetensors_header(entries))
                # Worker threads read and cast the next chunks while this one writes, in order.
                for (job, _, stop), rows in zip(items, ordered_map(cast, items, threads, scratch=True)):
                    write_tensor(f, rows)
                    advance(rows.numel() * ELEMENT_SIZE[dtype], "")
                    if stop == job.rows:
                        advance(0, job.name)
                for job in shard:
                    weight_map[job.name] = fname
                    total += job.rows * job.row_values * ELEMENT_SIZE[dtype]
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_llama(ckpt: Checkpoint, jobs: list[TensorJob], out: Path, dtype: torch.dtype, shard_bytes: int,
                *, quiet: bool = False) -> None:
    write_safetensors_shards(out, jobs, dtype, shard_bytes, quiet=quiet)
    cfg = family_of(ckpt.spec).llama_config(ckpt.spec, dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_side_files(ckpt, out)


def write_side_files(ckpt: Checkpoint, out: Path) -> None:
    """Tokenizer files and generation_config.json (one made from the spec if SRC has none)."""
    for path in ckpt.files_to_copy():
        shutil.copyfile(path, out / path.name)
    if not (out / "generation_config.json").exists():
        gen = {"bos_token_id": ckpt.spec.bos_token_id, "eos_token_id": ckpt.spec.eos_token_id}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
