"""The calibration pass of `to-int4 --calibration`: GPTQ, layer by layer, on our forward pass.

The calibration text is cut into `samples` sequences of `seq_len` tokens (BOS first). Their
hidden states go through the Llama-format model (the very tensors the export is written from,
rescaling included) one block at a time, as GPTQModel and llm-compressor's sequential pipeline do:

1. block i runs on the hidden states that came out of the already-quantized blocks 0..i-1, with
   its original weights; the reference forward pass reports the input of every projection (its
   capture hook), and the inputs are summed into one Hessian per distinct input (q/k/v share
   one, gate/up another, o and down their own);
2. each of the seven projections is quantized by GPTQ (`quants/gptq.py`) with its Hessian;
3. block i runs again with the dequantized weights: its output is the next block's input.

Memory: the hidden states of all samples (samples x seq_len x hidden float32), one block's
weights (each projection's original dropped once its dequantized value replaces it), its
Hessians (each freed after its last projection) and GPTQ's inverse-Hessian factor of one
projection (float64, two [in, in] matrices at its peak). The writer asks for projections in file order; a block is
processed the first time one of its projections is asked for, its codes kept until written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import reference
from .errors import ConvertError
from .names import layer_index
from .quants import gptq, int4

# Projections whose inputs are the same activations share one Hessian.
_INPUT_OF = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "down"}


@dataclass(frozen=True)
class Calibration:
    samples: list[list[int]]  # token ids, seq_len each, BOS first
    name: str  # the file's name, for the report
    act_order: bool = True

    @property
    def seq_len(self) -> int:
        return len(self.samples[0])


def calibration_samples(tokens: list[int], samples: int, seq_len: int, bos: int | None, where: str
                        ) -> list[list[int]]:
    """`samples` consecutive pieces of `seq_len` tokens, BOS first; too little text is refused."""
    if samples < 1:
        raise ConvertError(f"--samples: must be at least 1, got {samples}")
    if seq_len < 2:
        raise ConvertError(f"--seq-len: must be at least 2, got {seq_len}")
    need = samples * seq_len
    if len(tokens) < need:
        raise ConvertError(f"{where}: tokenizes to {len(tokens)} tokens; --samples {samples} x --seq-len {seq_len} "
                           f"needs {need} (give more text, or fewer or shorter samples)")
    out = []
    for i in range(samples):
        piece = list(tokens[i * seq_len:(i + 1) * seq_len])
        if bos is not None:
            piece[0] = bos
        out.append(piece)
    return out


def _kind(name: str) -> str:
    return name.rsplit(".", 2)[-2]


class _Weights:
    """The Llama-format model as a WeightSource: the jobs' tensors, with the projections of
    quantized blocks replaced by their dequantized values; one block's tensors cached."""

    def __init__(self, jobs: dict, spec):
        self.jobs, self.spec = jobs, spec
        self.replaced: dict[str, torch.Tensor] = {}
        self._layer, self._cache = None, {}

    def has(self, name: str) -> bool:
        return name in self.jobs

    def shape(self, name: str):
        return self.jobs[name].shape

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if name in self.replaced:
            return self.replaced[name][start:stop]
        layer = layer_index(name)
        if layer is None:
            job = self.jobs[name]
            return job.read(start, job.rows if stop is None else stop)
        if layer != self._layer:
            self._layer, self._cache = layer, {}
        if name not in self._cache:
            self._cache[name] = self.jobs[name].read_all()
        return self._cache[name][start:stop]

    def replace(self, name: str, value: torch.Tensor) -> None:
        """From now on `name` reads as `value`; its original is dropped (one copy of a block in memory)."""
        self.replaced[name] = value
        self._cache.pop(name, None)


class _Hessians:
    """The capture hook: sum of x^T x per distinct projection input of one block."""

    def __init__(self, layer: int):
        self.prefix = f"model.layers.{layer}."
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0

    def __call__(self, name: str, x: torch.Tensor) -> None:
        if not name.startswith(self.prefix):
            return
        kind = _INPUT_OF.get(_kind(name))
        if kind is None or (kind in ("attn", "mlp") and _kind(name) not in ("q_proj", "gate_proj")):
            return  # k/v see q's input, up sees gate's
        if kind not in self.sums:
            self.sums[kind] = torch.zeros(x.shape[1], x.shape[1])
        self.sums[kind].addmm_(x.T, x)  # float32, as GPTQModel and llm-compressor accumulate it

    def of(self, name: str) -> torch.Tensor:
        return self.sums[_INPUT_OF[_kind(name)]]


class GptqQuantizer:
    """Codes of every projection by GPTQ on the calibration samples (see the module docstring)."""

    def __init__(self, jobs: list, spec, calibration: Calibration, group_size: int, sym: bool, search: bool,
                 on_progress: Callable[[str], None] = lambda what: None):
        from .families import family_of
        self.llama_spec = family_of(spec).export_spec(spec, "llama")
        self.weights = _Weights({j.name: j for j in jobs}, self.llama_spec)
        self.calibration, self.group_size, self.sym, self.search = calibration, group_size, sym, search
        self.on_progress = on_progress  # called with "GPTQ block i/n: <stage> k/m" as the work goes
        self.done: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.next_layer = 0
        self.hidden: list[torch.Tensor] | None = None
        self.rope = reference.rope_tables(self.llama_spec, torch.arange(calibration.seq_len))

    def quantize(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layer = layer_index(name)
        while name not in self.done:
            if layer is None or self.next_layer > layer:
                raise ValueError(f"'{name}' is not a projection of a block still to be quantized")
            self._layer(self.next_layer)
            self.next_layer += 1
        return self.done.pop(name)

    def _layer(self, i: int) -> None:
        w, samples = self.weights, self.calibration.samples
        layers = self.llama_spec.num_hidden_layers
        step = lambda what, k, n: self.on_progress(f"GPTQ block {i + 1}/{layers}: {what} {k}/{n}")
        with torch.no_grad():
            if self.hidden is None:
                self.hidden = [reference.embed(w, s) for s in samples]
            hessians = _Hessians(i)
            for k, h in enumerate(self.hidden):
                reference.decoder_layer(w, i, h, self.rope, hessians)
                step("Hessians", k + 1, len(samples))
            prefix = f"model.layers.{i}."
            names = [n for n in w.jobs if n.startswith(prefix) and _kind(n) in _INPUT_OF and n.endswith(".weight")]
            last_user = {_INPUT_OF[_kind(n)]: n for n in names}
            for k, name in enumerate(names):
                try:
                    parts = gptq.gptq(w.read(name), hessians.of(name), self.group_size, self.sym, self.search,
                                      act_order=self.calibration.act_order)
                except ValueError as exc:
                    raise ConvertError(f"tensor '{name}': cannot quantize ({exc})") from None
                self.done[name] = parts
                w.replace(name, int4.dequantize(*parts, self.group_size))
                if last_user[_INPUT_OF[_kind(name)]] == name:  # memory: down's Hessian alone is in^2 floats
                    del hessians.sums[_INPUT_OF[_kind(name)]]
                step("GPTQ", k + 1, len(names))
            for k, h in enumerate(self.hidden):  # in place: one set of hidden states in memory
                self.hidden[k] = reference.decoder_layer(w, i, h, self.rope)
                step("forward", k + 1, len(samples))
            for name in names:  # the next block reads its own weights; these are no longer needed
                del w.replaced[name]
