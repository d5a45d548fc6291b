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

MoE (the Mixtral layout), per expert as GPTQModel does: an expert's w1/w3 share the Hessian of
the tokens routed to it, its w2 that of its own hidden activations; an expert no calibration
token reached has no Hessian and is quantized data-free (the scale search), not zeroed as GPTQ
treats an input it never saw; the report lists it. The router stays float16.

`method` "awq" or "awq-gptq" first takes AWQ's activation-aware scales (`quants/awq_scale.py`)
for q/k/v and gate/up from the same Hessians and the mean |x| of their inputs: the norm that feeds
them is multiplied by c = 1/s, their columns divided by c, their Hessian becomes diag(c) H diag(c)
(the function is unchanged before quantization). Then "awq" rounds to the nearest code with the
scale search weighted by the activation energy, as AutoAWQ rounds after its clip search;
"awq-gptq" runs GPTQ on the scaled weights. The scaled norms are written in place of the
originals, and the scales go to rescaling.safetensors for verify.

Memory: the hidden states of all samples (samples x seq_len x hidden float32), one block's
weights (each projection's original dropped once its dequantized value replaces it), its
Hessians (each freed after its last projection) and GPTQ's inverse-Hessian factor of one
projection (float32, two [in, in] matrices at its peak). The writer asks for projections in file order; a block is
processed the first time one of its projections is asked for, its codes kept until written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import reference
from .errors import ConvertError
from .names import expert_parts, layer_index
from .quants import awq_scale, gptq, int4

METHODS = ("gptq", "awq", "awq-gptq")
# Projections whose inputs are the same activations share one Hessian.
_INPUT_OF = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "down"}


@dataclass(frozen=True)
class Calibration:
    samples: list[list[int]]  # token ids, seq_len each, BOS first
    name: str  # the file's name, for the report
    act_order: bool = True
    method: str = "gptq"  # one of METHODS

    @property
    def awq(self) -> bool:
        return self.method.startswith("awq")

    @property
    def gptq(self) -> bool:
        return self.method.endswith("gptq")

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


def _input_of(name: str) -> str | None:
    """Which Hessian a projection's codes are computed with: the distinct input it multiplies
    ('attn', 'o', 'mlp', 'down'; 'experts.E.mlp' / 'experts.E.down' per expert); None: not a
    projection (norms, the router)."""
    parts = expert_parts(name)
    if parts is not None:
        return f"experts.{parts[1]}.{'down' if parts[2] == 'w2' else 'mlp'}"
    return _INPUT_OF.get(_kind(name))


def _sums_input(name: str) -> bool:
    """Whether the capture of this projection's input is summed (k/v see q's input, up sees
    gate's, an expert's w3 its w1's)."""
    parts = expert_parts(name)
    return parts[2] != "w3" if parts is not None else _kind(name) not in ("k_proj", "v_proj", "up_proj")


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

    def __init__(self, layer: int, abs_sums: bool = False):
        self.prefix = f"model.layers.{layer}."
        self.sums: dict[str, torch.Tensor] = {}
        self.abs_sums: dict[str, torch.Tensor] | None = {} if abs_sums else None  # sum |x| (AWQ's x_mean)

    def __call__(self, name: str, x: torch.Tensor) -> None:
        if not name.startswith(self.prefix):
            return
        kind = _input_of(name)
        if kind is None or not _sums_input(name):
            return
        if kind not in self.sums:
            self.sums[kind] = torch.zeros(x.shape[1], x.shape[1])
            if self.abs_sums is not None:
                self.abs_sums[kind] = torch.zeros(x.shape[1], dtype=torch.float64)
        self.sums[kind].addmm_(x.T, x)  # float32, as GPTQModel and llm-compressor accumulate it
        if self.abs_sums is not None:
            self.abs_sums[kind] += x.abs().sum(0, dtype=torch.float64)


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
        self.norms: dict[str, torch.Tensor] = {}  # AWQ-scaled norm weights, until written
        self.awq_scales: dict[str, torch.Tensor] = {}  # NormScale key -> c, for rescaling.safetensors
        self.awq_alphas: dict[str, float | None] = {}  # NormScale key -> AWQ's a (None: not scaled)
        self.uncalibrated: list[str] = []  # experts' projections no calibration token reached
        self._column_scale: dict[str, torch.Tensor] = {}  # projection -> the c its columns were divided by
        self.next_layer = 0
        self.hidden: torch.Tensor | None = None  # [samples, seq_len, hidden], one buffer
        self.rope = reference.rope_tables(self.llama_spec, torch.arange(calibration.seq_len))

    def quantize(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._take(self.done, name, "a projection")

    def norm(self, name: str) -> torch.Tensor:
        """The AWQ-scaled weight of a norm that feeds projections (its block calibrated first)."""
        return self._take(self.norms, name, "an AWQ-scaled norm")

    def _take(self, results: dict, name: str, what: str):
        """results[name], once the blocks up to name's have been calibrated (in order)."""
        layer = layer_index(name)
        while name not in results:
            if layer is None or self.next_layer > layer:
                raise ValueError(f"'{name}' is not {what} of a block still to be calibrated")
            self._layer(self.next_layer)
            self.next_layer += 1
        return results.pop(name)

    def scaled_weight(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """The weight the codes of projection `name` approximate: `w` with AWQ's column scale."""
        c = self._column_scale.get(name)
        return w if c is None else w / c

    def _awq(self, i: int, hessians: _Hessians) -> None:
        """AWQ's scales of block i's two norm-fed groups, folded in (module docstring)."""
        from .formats.hf import int4_rescale
        w = self.weights
        prefix = f"model.layers.{i}."
        for group in int4_rescale.norm_scales(self.llama_spec):
            if not group.key.startswith(prefix):
                continue
            kind = _input_of(group.cols[0])
            originals = [w.read(n) for n in group.cols]
            h = hessians.sums[kind]
            try:
                s, alpha, _ = awq_scale.search(originals, h, hessians.abs_sums[kind], self.group_size, self.sym)
            except ValueError as exc:
                raise ConvertError(f"tensor '{group.cols[0]}': cannot quantize ({exc})") from None
            c = 1.0 / s
            self.norms[group.norm] = w.read(group.norm) * c
            w.replace(group.norm, self.norms[group.norm])
            for name, original in zip(group.cols, originals):
                w.replace(name, original / c)
                self._column_scale[name] = c
            h.mul_(c[:, None]).mul_(c[None, :])  # the inputs are now x * c
            self.awq_scales[group.key], self.awq_alphas[group.key] = c, alpha

    def _weighted_rtn(self, w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes by the scale search alone, each group's columns weighted by their activation
        energy (H's diagonal, as GPTQ's static groups are chosen), no error feedback."""
        g = self.group_size
        energy = h.diagonal().to(torch.float32)
        parts = []
        for k in range(w.shape[1] // g):
            e = energy[k * g:(k + 1) * g]
            parts.append(int4.quantize_groups(w[:, k * g:(k + 1) * g], g, self.sym, self.search,
                                              e / e.mean().clamp_min(1e-30) + 1e-6))
        return tuple(torch.cat(p, dim=1) for p in zip(*parts))

    def _layer(self, i: int) -> None:
        w, samples = self.weights, self.calibration.samples
        layers = self.llama_spec.num_hidden_layers
        step = lambda what, k, n: self.on_progress(f"GPTQ block {i + 1}/{layers}: {what} {k}/{n}")
        with torch.no_grad():
            if self.hidden is None:  # one buffer, overwritten block after block: a list of per-sample
                # tensors replaced one by one left the heap fragmented (3.1 GB peak on the 2B for 604 MB)
                self.hidden = torch.empty(len(samples), len(samples[0]), self.llama_spec.hidden_size)
                for k, s in enumerate(samples):
                    self.hidden[k] = reference.embed(w, s)
            hessians = _Hessians(i, abs_sums=self.calibration.awq)
            for k, h in enumerate(self.hidden):
                reference.decoder_layer(w, i, h, self.rope, hessians)
                step("Hessians", k + 1, len(samples))
            if self.calibration.awq:
                step("AWQ scales", 0, 2)
                self._awq(i, hessians)
            prefix = f"model.layers.{i}."
            names = [n for n in w.jobs if n.startswith(prefix) and _input_of(n) is not None
                     and n.endswith(".weight")]
            last_user = {_input_of(n): n for n in names}
            for k, name in enumerate(names):
                kind = _input_of(name)
                try:
                    if kind not in hessians.sums:  # an expert no token was routed to
                        parts = int4.quantize_groups(w.read(name), self.group_size, self.sym, self.search)
                        self.uncalibrated.append(name)
                    elif self.calibration.gptq:
                        # A Hessian's last user gets it in a list: GPTQ takes the only reference
                        # and works on it in place, so the 2B's down_proj peaks at two float32
                        # [in, in] matrices (265 MB), not three.
                        h = [hessians.sums.pop(kind)] if last_user[kind] == name else hessians.sums[kind]
                        parts = gptq.gptq(w.read(name), h, self.group_size, self.sym, self.search,
                                          act_order=self.calibration.act_order)
                        del h
                    else:
                        parts = self._weighted_rtn(w.read(name), hessians.sums[kind])
                        if last_user[kind] == name:
                            del hessians.sums[kind]
                except ValueError as exc:
                    raise ConvertError(f"tensor '{name}': cannot quantize ({exc})") from None
                self.done[name] = parts
                w.replace(name, int4.dequantize(*parts, self.group_size))
                step("GPTQ" if self.calibration.gptq else "rounding", k + 1, len(names))
            for k, h in enumerate(self.hidden):  # in place: one set of hidden states in memory
                h.copy_(reference.decoder_layer(w, i, h, self.rope))
                step("forward", k + 1, len(samples))
            for name in [n for n in w.replaced if n.startswith(prefix)]:  # the next block reads its own
                del w.replaced[name]
