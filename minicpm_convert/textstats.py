"""Logits of source and export on real text, summarised as `llama-perplexity --kl-divergence`
summarises them, so that figures compare with llama.cpp's published tables.

As llama-perplexity: the tokens are cut into chunks of `ctx`, each chunk starts with BOS, and
only the second half of each chunk is scored (every position sees at least ctx/2 tokens of
context). Unlike it, the source's probabilities are kept in float64, not stored in 16 bits, so
the KL divergence has no storage floor.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_TEXT = Path(__file__).resolve().parent / "data" / "verify_text.txt"
DEFAULT_CTX = 512
POSITIONS_PER_BATCH = 32  # float64 softmax over a 120k vocabulary: ~30 MB per position


@dataclass(frozen=True)
class Chunk:
    tokens: list[int]
    first_scored: int  # positions first_scored .. len-2 predict tokens first_scored+1 .. len-1


def chunks(tokens: list[int], ctx: int, bos: int | None) -> list[Chunk]:
    """llama-perplexity's chunking; a text shorter than ctx is one chunk of all its tokens."""
    n = len(tokens) // ctx
    pieces = [tokens[i * ctx:(i + 1) * ctx] for i in range(n)] or [list(tokens)]
    out = []
    for piece in pieces:
        piece = list(piece)
        if bos is not None:
            piece[0] = bos
        out.append(Chunk(piece, max(0, min(len(piece) // 2, len(piece) - 2))))
    return out


@dataclass
class TextStats:
    chunks: int
    ctx: int
    scored: int  # positions scored
    ppl_source: float
    ppl_export: float
    ppl_ratio: float
    kl_mean: float
    kl_median: float
    kl_p90: float
    kl_p95: float
    kl_p99: float
    kl_p999: float
    kl_max: float
    top1: float  # share of scored positions with the same most likely token
    rms_dp: float  # RMS of p_export(next token) - p_source(next token)

    def as_dict(self) -> dict:
        return asdict(self)


class Accumulator:
    """Per-position figures of one export, chunk by chunk; `stats()` summarises them."""

    def __init__(self, ctx: int):
        self.ctx = ctx
        self.n_chunks = 0
        self.kl: list[np.ndarray] = []
        self.nll_src: list[np.ndarray] = []
        self.nll_out: list[np.ndarray] = []
        self.same: list[np.ndarray] = []
        self.dp: list[np.ndarray] = []

    def add(self, ref: torch.Tensor, out: torch.Tensor, targets: list[int]) -> None:
        """Logits [positions, vocab] of the source and the export, and the next tokens."""
        self.n_chunks += 1
        tgt = torch.tensor(targets, dtype=torch.long)
        for s in range(0, ref.shape[0], POSITIONS_PER_BATCH):
            logp = torch.log_softmax(ref[s:s + POSITIONS_PER_BATCH].double(), -1)
            logq = torch.log_softmax(out[s:s + POSITIONS_PER_BATCH].double(), -1)
            t = tgt[s:s + POSITIONS_PER_BATCH, None]
            p = logp.exp()
            self.kl.append((p * (logp - logq)).sum(-1).clamp(min=0).numpy())
            lp_t, lq_t = logp.gather(1, t)[:, 0], logq.gather(1, t)[:, 0]
            self.nll_src.append((-lp_t).numpy())
            self.nll_out.append((-lq_t).numpy())
            self.dp.append((lq_t.exp() - lp_t.exp()).numpy())
            self.same.append((logp.argmax(-1) == logq.argmax(-1)).numpy())

    def stats(self) -> TextStats:
        kl = np.concatenate(self.kl)
        nll_src, nll_out = np.concatenate(self.nll_src), np.concatenate(self.nll_out)
        ppl_src, ppl_out = math.exp(float(nll_src.mean())), math.exp(float(nll_out.mean()))
        q = lambda p: float(np.percentile(kl, p))  # noqa: E731
        return TextStats(chunks=self.n_chunks, ctx=self.ctx, scored=int(kl.size), ppl_source=ppl_src,
                         ppl_export=ppl_out, ppl_ratio=ppl_out / ppl_src, kl_mean=float(kl.mean()), kl_median=q(50),
                         kl_p90=q(90), kl_p95=q(95), kl_p99=q(99), kl_p999=q(99.9), kl_max=float(kl.max()),
                         top1=float(np.concatenate(self.same).mean()),
                         rms_dp=float(np.sqrt(np.mean(np.concatenate(self.dp) ** 2))))
