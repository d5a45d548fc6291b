"""The stream of tensors every exporter consumes.

A `TensorJob` names an output tensor (Hugging Face naming), its shape, and how to read any range
of its rows in float32. Nothing is read until a sink asks, and a sink asks for row chunks, so a
1 GB embedding never sits in memory whole. Two streams exist: the checkpoint as stored
(`source_stream`, for GGUF arch minicpm) and the Llama-format one with the muP scalars folded in
(`llama_stream`, for to-llama, GGUF arch llama and INT4) -- one folding for all of them.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from .sources.checkpoint import Checkpoint
from .names import expert_parts, to_mixtral
from .spec import ModelSpec

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


def _reader(ckpt: Checkpoint, name: str, factor: float | None = None, divisor: float | None = None):
    def read(start: int, stop: int) -> torch.Tensor:
        t = ckpt.read(name, start, stop)
        # Fold in float32; the sink casts once at the end.
        if factor is not None:
            t = t * factor
        if divisor is not None:
            t = t / divisor
        return t
    return read


def _stored_reader(ckpt: Checkpoint, name: str):
    return lambda start, stop: ckpt.read_stored(name, start, stop)


def source_stream(ckpt: Checkpoint) -> list[TensorJob]:
    """The checkpoint's tensors as stored (muP scalars left for the runtime)."""
    return [TensorJob(n, ckpt.shape(n), ckpt.dtype(n), _reader(ckpt, n), _stored_reader(ckpt, n))
            for n in ckpt.names()]


def fold_factor(spec: ModelSpec, name: str) -> tuple[float | None, float | None]:
    """(multiplier, divisor) that folds the muP scalars into one tensor (facts §3)."""
    if not spec.is_mup:
        return None, None
    if name == "model.embed_tokens.weight":
        return spec.scale_emb, None
    if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")) or _is_expert_down(name):
        return spec.residual_scale, None
    if name == "lm_head.weight":
        return None, spec.logit_scale
    return None, None


def _is_expert_down(name: str) -> bool:
    parts = expert_parts(name)
    return parts is not None and parts[2] == "w2"


def llama_stream(ckpt: Checkpoint) -> list[TensorJob]:
    """Llama-format tensors: muP folded, head untied (a tied head is the *unscaled* embedding)."""
    spec = ckpt.spec
    jobs = []
    for name in ckpt.names():
        factor, divisor = fold_factor(spec, name)
        out = to_mixtral(name) if spec.num_experts else name  # MiniCPM-MoE -> Mixtral layout
        unchanged = factor is None and divisor is None
        jobs.append(TensorJob(out, ckpt.shape(name), ckpt.dtype(name), _reader(ckpt, name, factor, divisor),
                              _stored_reader(ckpt, name) if unchanged else None))
    if "lm_head.weight" not in ckpt.names():
        emb = "model.embed_tokens.weight"
        _, divisor = fold_factor(spec, "lm_head.weight")
        jobs.append(TensorJob("lm_head.weight", ckpt.shape(emb), ckpt.dtype(emb),
                              _reader(ckpt, emb, None, divisor)))
    return jobs


def llama_config(spec: ModelSpec, dtype: torch.dtype) -> dict:
    """config.json of the Llama-format export: no muP keys, no auto_map, untied."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "hidden_act": spec.hidden_act,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if spec.rope_type == "longrope":
        # transformers' Llama reads LongRoPE as rope_type "longrope" with both factor lists.
        orig = spec.rope_scaling.get("original_max_position_embeddings") or spec.raw["original_max_position_embeddings"]
        cfg["rope_scaling"] = {"rope_type": "longrope", "short_factor": list(spec.rope_scaling["short_factor"]),
                               "long_factor": list(spec.rope_scaling["long_factor"]),
                               "original_max_position_embeddings": orig}
        cfg["original_max_position_embeddings"] = orig
    elif spec.rope_scaling is not None:
        cfg["rope_scaling"] = spec.rope_scaling
    if spec.num_experts:
        cfg.update(mixtral_keys(spec))
    return cfg


def mixtral_keys(spec: ModelSpec) -> dict:
    """MiniCPM-MoE's Llama-format export is a Mixtral: same routing (softmax, top-k, renormalised)."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": spec.num_experts,
        "num_experts_per_tok": spec.num_experts_per_tok,
        # Training-only; MiniCPM-MoE trained with a load-balancing loss weight of 0.01.
        "router_aux_loss_coef": spec.raw.get("router_aux_loss_coef", 0.01),
        "output_router_logits": False,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
    }
