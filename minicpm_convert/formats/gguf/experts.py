"""MiniCPM-MoE's experts for GGUF: one stacked 3-D tensor per layer and kind.

The checkpoint holds each expert's w1 (gate), w3 (up) and w2 (down) separately
(`model.layers.N.mlp.experts.E.wK.weight`); llama.cpp wants `blk.N.ffn_{gate,up,down}_exps.weight`
of shape [n_expert, rows, cols] (ggml ne = cols, rows, n_expert), expert E at index E -- what
llama.cpp's converter builds with `torch.stack` for Mixtral. A stacked job reads whole experts,
so a chunk is a range of experts and memory stays at a few expert matrices.
"""

from __future__ import annotations

import torch

from ...names import expert_parts, stacked_name
from ...stream import TensorJob


def _stacked_reader(parts: list[TensorJob]):
    def read(start: int, stop: int) -> torch.Tensor:
        return torch.stack([parts[e].read_all() for e in range(start, stop)])
    return read


def stack_experts(jobs: list[TensorJob], n_experts: int) -> list[TensorJob]:
    """Replace the per-expert jobs by one stacked job per (layer, kind), at the first expert's place."""
    groups: dict[tuple[int, str], dict[int, TensorJob]] = {}
    for job in jobs:
        parts = expert_parts(job.name)
        if parts is not None:
            layer, expert, w = parts
            groups.setdefault((layer, w), {})[expert] = job
    out: list[TensorJob] = []
    for job in jobs:
        parts = expert_parts(job.name)
        if parts is None:
            out.append(job)
            continue
        layer, expert, w = parts
        group = groups[(layer, w)]
        if expert != min(group):
            continue
        if sorted(group) != list(range(n_experts)):
            raise ValueError(f"layer {layer} {w}: experts {sorted(group)}, expected 0..{n_experts - 1}")
        ordered = [group[e] for e in range(n_experts)]
        first = ordered[0]
        out.append(TensorJob(stacked_name(layer, w), (n_experts, *first.shape), first.source_dtype,
                             _stacked_reader(ordered)))
    return out
