"""llama.cpp's importance matrix, computed with our forward pass.

For every weight matrix of the blocks (GGUF names `blk.N.*`; `output.weight` too with
`process_output`), the per-input-column sum of the squared activations that multiply it over the
calibration tokens, and how many activation rows went in (per expert for stacked MoE experts):
what `llama-imatrix` accumulates and `llama-quantize --imatrix` reads. The tokens are chunked as
llama-imatrix chunks them: `ctx` tokens per chunk, the first of each replaced by BOS when the model
adds one, at least two chunks of text.

The pass is layer-major over groups of chunks, so each layer's weights are read once per group.
Sums are kept in float64 and stored as float32, as the file does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import reference
from .errors import ConvertError
from .formats.gguf.imatrix import Entry, ImportanceMatrix
from .names import expert_parts, hf_to_gguf, stacked_name
from .progress import progress_bar

# Chunks run side by side through a layer: their activations stay below ~256 MB at 2B sizes.
GROUP_VALUES = 64 * 1024 * 1024


def calibration_chunks(tokens: list[int], ctx: int, chunks: int | None, bos: int | None,
                       where: str) -> list[list[int]]:
    """llama-imatrix's chunks: `ctx` tokens each, BOS first, at most `chunks` of them."""
    if ctx < 2:
        raise ConvertError(f"--ctx: must be at least 2, got {ctx}")
    if len(tokens) < 2 * ctx:
        raise ConvertError(f"{where}: tokenizes to {len(tokens)} tokens; a context of {ctx} needs at least "
                           f"{2 * ctx} (give more text or a smaller --ctx)")
    n = len(tokens) // ctx
    if chunks is not None:
        if chunks < 1:
            raise ConvertError(f"--chunks: must be at least 1, got {chunks}")
        n = min(n, chunks)
    out = []
    for i in range(n):
        piece = list(tokens[i * ctx:(i + 1) * ctx])
        if bos is not None:
            piece[0] = bos
        out.append(piece)
    return out


class Collector:
    """The capture hook: squared activations summed per GGUF tensor (and expert)."""

    def __init__(self, spec, process_output: bool):
        self.n_experts = spec.num_experts
        self.process_output = process_output
        self.sums: dict[str, dict[int, torch.Tensor]] = {}
        self.counts: dict[str, dict[int, int]] = {}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        parts = expert_parts(name)
        if parts is not None:
            gguf, expert = hf_to_gguf(stacked_name(parts[0], parts[2])), parts[1]
        else:
            gguf, expert = hf_to_gguf(name), 0
        if not (gguf.startswith("blk.") or (self.process_output and gguf == "output.weight")):
            return
        sq = x.double().pow(2).sum(0)
        bucket = self.sums.setdefault(gguf, {})
        bucket[expert] = bucket[expert] + sq if expert in bucket else sq
        counts = self.counts.setdefault(gguf, {})
        counts[expert] = counts.get(expert, 0) + x.shape[0]

    def matrix(self, datasets: list[str], chunk_count: int, chunk_size: int) -> ImportanceMatrix:
        entries = {}
        for gguf in sorted(self.sums):
            found = self.sums[gguf]
            n_mat = self.n_experts if gguf.endswith("_exps.weight") else 1
            cols = next(iter(found.values())).numel()
            sums = np.zeros((n_mat, cols), np.float32)
            counts = np.zeros(n_mat, np.int64)
            for e, s in found.items():  # an expert no token reached keeps zeros (llama.cpp: count 0)
                sums[e] = s.numpy().astype(np.float32)
                counts[e] = self.counts[gguf][e]
            entries[gguf] = Entry(sums, counts)
        return ImportanceMatrix(entries, datasets=datasets, chunk_count=chunk_count, chunk_size=chunk_size)


def compute(source, tokens: list[int], *, ctx: int = 512, chunks: int | None = None, dataset: str = "",
            process_output: bool = False, quiet: bool = True, where: str = "the text") -> ImportanceMatrix:
    """The importance matrix of `source` (a checkpoint or any WeightSource) on `tokens`."""
    spec = source.spec
    pieces = calibration_chunks(tokens, ctx, chunks, spec.bos_token_id, where)
    collector = Collector(spec, process_output)
    group = max(1, GROUP_VALUES // (ctx * spec.hidden_size))
    rope = reference.rope_tables(spec, torch.arange(ctx))
    layers = spec.num_hidden_layers
    with progress_bar("imatrix", len(pieces) * layers, layers, quiet=quiet) as advance, torch.no_grad():
        for g in range(0, len(pieces), group):
            batch = pieces[g:g + group]
            hs = [reference.embed(source, p) for p in batch]
            for i in range(layers):
                hs = [reference.decoder_layer(source, i, h, rope, collector) for h in hs]
                advance(len(batch), f"layer {i}" if g + group >= len(pieces) else "")
            if process_output:  # the head's input: the final norm, divided by the logit scale
                for h in hs:
                    x = reference.rms_norm(h, source.read("model.norm.weight"), spec.rms_norm_eps) / spec.logit_scale
                    collector("lm_head.weight", x)
    return collector.matrix([dataset] if dataset else [], len(pieces), ctx)


def compute_from_text(ckpt, text_path: Path, **kwargs) -> ImportanceMatrix:
    from .api import read_text
    from .verify import text_tokens

    tokens = text_tokens(ckpt, read_text(text_path))
    return compute(ckpt, tokens, dataset=str(text_path.name), where=str(text_path), **kwargs)
