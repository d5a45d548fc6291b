"""`verify`: a verdict on each export that holds on real models.

1. **Weights**: every tensor of the export, decoded to float32 in Hugging Face layout, against
   what the source says it must hold (the same tensor stream the export was written from: as
   stored, or with the muP scalars folded in), within the bound its storage type guarantees
   (`fidelity.py`); the worst tensor is named.
2. **Metadata**: every number and name that defines the model (sizes, heads, head_dim, eps,
   rope theta and scaling, the muP scalars, experts, vocabulary size, special token ids) against
   the source config.
3. **Real text**: the logits of source and export on a text (`--text`, default a bundled English
   and Chinese one) in chunks of `--ctx`, with llama-perplexity's statistics (`textstats.py`).

An export passes when 1 and 2 hold: a correct file's quantization loss is reported, never a
failure, unless the user sets a quality gate of their own (`max_kl`, on the mean KL divergence).
The pass over the model is layer-major: each layer's weights are read once, checked, and run on
every chunk of text, for the source and each export.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import reference
from .errors import ConvertError
from .families.rope import stated_rope
from .fidelity import TensorCheck, compare_rows, has_bound
from .names import expert_parts, hf_to_gguf, layer_index, stacked_name
from .sources import open_export
from .sources.checkpoint import Checkpoint
from .textstats import DEFAULT_CTX, DEFAULT_TEXT, Accumulator, TextStats, chunks

DEFAULT_PROMPT = ("<用户>Write a short poem about the sea, then translate it into Chinese: "
                  "大海是蓝色的。<AI>")


def compare(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Logit figures of one sequence (tests compare a client's logits with the reference's)."""
    ref, out = ref.double(), out.double()
    diff = (ref - out).abs()
    max_abs = diff.max().item()
    rel = max_abs / max(ref.abs().max().item(), 1e-30)
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=-1).min().item()
    top1 = (ref.argmax(-1) == out.argmax(-1)).double().mean().item()
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(out, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    return {"max_abs_err": max_abs, "rel_err": rel, "cosine": cos, "top1": top1, "kl": max(kl, 0.0)}


def prompt_tokens(src: Checkpoint, prompt: str | None, tokens: list[int] | None) -> list[int]:
    """Explicit ids, or the prompt encoded with SRC's own tokenizer (tokenizer.json when it ships
    one, else tokenizer.model), BOS first as the model adds it."""
    vocab = src.spec.vocab_size
    if tokens is not None:
        if not tokens:
            raise ConvertError("--tokens: no token ids given")
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise ConvertError(f"--tokens: id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        return tokens
    from .sources.tokenizer import text_encoder
    return text_encoder(src.folder, src.spec.bos_token_id)(prompt or DEFAULT_PROMPT)


def text_tokens(src: Checkpoint, text: str | None = None, tokens: list[int] | None = None) -> list[int]:
    """The tokens verify scores: explicit ids, a text, or the bundled default text."""
    if tokens is None and text is None:
        text = DEFAULT_TEXT.read_text(encoding="utf-8")
    return prompt_tokens(src, text, tokens)


@dataclass
class Report:
    export: str
    kind: str
    target: str  # what the export must hold: 'llama', 'gguf-minicpm', 'gguf-llama', 'gguf-minicpm3'
    tensors: list[TensorCheck] = field(default_factory=list)
    metadata: list[str] = field(default_factory=list)  # problems, one line each
    text: TextStats | None = None
    max_kl: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def worst(self) -> TensorCheck | None:
        return max(self.tensors, key=lambda t: t.worst, default=None)

    def as_dict(self) -> dict:
        return {"export": self.export, "kind": self.kind, "target": self.target, "passed": self.passed,
                "failures": self.failures, "metadata_problems": self.metadata, "max_kl": self.max_kl,
                "text": self.text.as_dict() if self.text else None,
                "worst_tensor": self.worst.as_dict() if self.worst else None,
                "tensors": [t.as_dict() for t in self.tensors]}


class LayerCache:
    """A WeightSource (or checkpoint) whose block tensors are read once per layer: the forward
    pass and the weight check share them. Tensors outside blocks pass through in row chunks."""

    def __init__(self, source):
        self._source = source
        self.spec = source.spec
        self._layer: int | None = None
        self._cache: dict[str, torch.Tensor] = {}

    def __getattr__(self, name):  # names(), shape(), dtype(), folder, ... of the wrapped source
        return getattr(self._source, name)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        layer = layer_index(name)
        if layer is None:
            return self._source.read(name, start, stop)
        if layer != self._layer:
            self._cache.clear()
            self._layer = layer
        t = self._cache.get(name)
        if t is None:
            t = self._cache[name] = self._source.read(name)
        return t[start:stop]


def export_target(source, kind: str) -> str:
    """What the export must hold: Llama-format tensors, or a GGUF of its architecture's layout."""
    if kind.startswith("gguf-"):
        return f"gguf-{source.arch}"
    return "llama"


def expected_jobs(src, target: str) -> dict:
    """name -> TensorJob of what an export of `target` holds, in Hugging Face naming and layout."""
    from .families import family_of
    from .stream import source_stream
    if target in ("llama", "gguf-llama"):
        jobs = family_of(src.spec).llama_jobs(src)
    else:
        jobs = source_stream(src)
    return {j.name: j for j in jobs}


def display_name(name: str, target: str) -> str:
    """A tensor as the export names it (GGUF names for GGUF files)."""
    if not target.startswith("gguf"):
        return name
    parts = expert_parts(name)
    if parts:
        return f"{hf_to_gguf(stacked_name(parts[0], parts[2]))} (expert {parts[1]})"
    try:
        return hf_to_gguf(name)
    except KeyError:
        return name


def check_tensor(job, export, target: str) -> TensorCheck:
    storage = export.storage_type(job.name)
    check = TensorCheck(display_name(job.name, target), storage)
    if not has_bound(storage):
        check.worst, check.where = math.inf, f"verify has no error bound for storage type {storage}"
        return check
    if tuple(export.shape(job.name)) != tuple(job.shape):
        check.worst, check.where = math.inf, f"shape {list(export.shape(job.name))}, expected {list(job.shape)}"
        return check
    for start, stop in job.chunks():
        compare_rows(check, job.read(start, stop), export.read(job.name, start, stop), start)
    return check.finish()


def tensor_set_problems(expected: dict, export, target: str) -> list[str]:
    canon = lambda n: n.replace(".block_sparse_moe.", ".mlp.")  # noqa: E731  (GGUF names both alike)
    have = {canon(n) for n in export.names()}
    want = {canon(n): n for n in expected}
    missing = [n for c, n in want.items() if c not in have]
    extra = sorted(have - set(want))
    out = [f"missing tensor '{display_name(n, target)}'" for n in missing[:3]]
    out += [f"unexpected tensor '{display_name(n, target)}'" for n in extra[:3]]
    return out


# -- metadata ----------------------------------------------------------------------------------
# (spec attribute, GGUF key under the architecture, config.json key)
SPEC_FIELDS = [
    ("hidden_size", "embedding_length", "hidden_size"),
    ("num_hidden_layers", "block_count", "num_hidden_layers"),
    ("num_attention_heads", "attention.head_count", "num_attention_heads"),
    ("num_key_value_heads", "attention.head_count_kv", "num_key_value_heads"),
    ("head_dim", "attention.key_length", "head_dim"),
    ("intermediate_size", "feed_forward_length", "intermediate_size"),
    ("vocab_size", "vocab_size", "vocab_size"),
    ("rms_norm_eps", "attention.layer_norm_rms_epsilon", "rms_norm_eps"),
    ("rope_theta", "rope.freq_base", "rope_theta"),
    ("max_position_embeddings", "context_length", "max_position_embeddings"),
    ("scale_emb", "embedding_scale", "scale_emb"),
    ("residual_scale", "residual_scale", "scale_depth"),
    ("logit_scale", "logit_scale", "dim_model_base"),
    ("num_experts", "expert_count", "num_local_experts"),
    ("num_experts_per_tok", "expert_used_count", "num_experts_per_tok"),
    ("mla", "attention.q_lora_rank / kv_lora_rank / key_length / value_length", "q_lora_rank, kv_lora_rank, ..."),
    ("rope_scaling", "rope.scaling.* and rope_factors_long/short", "rope_scaling"),
]


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=2e-6, abs_tol=0.0)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def metadata_problems(expected, got, target: str, arch: str | None) -> list[str]:
    problems = []
    for attr, gguf_key, config_key in SPEC_FIELDS:
        want, have = getattr(expected, attr), getattr(got, attr)
        if attr == "rope_scaling":
            want, have = stated_rope(expected), stated_rope(got)
        if not _same(want, have):
            key = f"{arch}.{gguf_key}" if target.startswith("gguf") else config_key
            problems.append(f"metadata '{key}' gives {attr} {_show(have)}, the source says {_show(want)}")
    return problems


def _show(v) -> str:
    if isinstance(v, float):
        return f"{v:.7g}"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def token_id_problems(src: Checkpoint, export, target: str) -> list[str]:
    """Special token ids and the vocabulary's size against what the source's tokenizer states."""
    if not target.startswith("gguf"):
        want = {"bos_token_id": src.spec.bos_token_id, "eos_token_id": src.spec.eos_token_id}
        got = {"bos_token_id": export.spec.bos_token_id, "eos_token_id": export.spec.eos_token_id}
        return [f"config.json '{k}' is {got[k]!r}, the source says {want[k]!r}" for k in want if got[k] != want[k]]
    import logging

    from gguf import SpecialVocab
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    special = SpecialVocab(src.folder, load_merges=False, n_vocab=src.spec.vocab_size)
    problems = []
    for kind, want in special.special_token_ids.items():
        key = f"tokenizer.ggml.{'unknown' if kind == 'unk' else 'padding' if kind == 'pad' else kind}_token_id"
        have = export.field(key)
        if have is not None and have != want:
            problems.append(f"metadata '{key}' is {have}, the source's tokenizer says {want}")
    tokens = export.field("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != src.spec.vocab_size:
        problems.append(f"metadata 'tokenizer.ggml.tokens' holds {len(tokens)} tokens, the source's vocabulary "
                        f"has {src.spec.vocab_size}")
    return problems


def expected_spec(src: Checkpoint, target: str):
    from .families import family_of
    return family_of(src.spec).export_spec(src.spec, target)


# -- the pass ------------------------------------------------------------------------------------

def verify(src: Checkpoint, exports: list[Path], tokens: list[int], *, ctx: int = DEFAULT_CTX,
           max_kl: float | None = None) -> list[Report]:
    """Check every export of SRC; one Report each (see the module docstring)."""
    opened = []
    for export in exports:  # open (and validate) all before the slow work
        source, kind = open_export(export)
        target = export_target(source, kind)
        opened.append((export, source, kind, target))
    spec = src.spec
    text = chunks(tokens, ctx, spec.bos_token_id)
    ropes: dict = {}

    def rope(model_spec, n: int):  # each model's own tables: an export may state another head_dim
        key = (id(model_spec), n)
        if key not in ropes:
            ropes[key] = reference.rope_tables(model_spec, torch.arange(n))
        return ropes[key]

    src_cached = LayerCache(src)
    runs = []
    for export, source, kind, target in opened:
        theirs = source.spec
        if (theirs.hidden_size, theirs.num_hidden_layers) != (spec.hidden_size, spec.num_hidden_layers):
            raise ConvertError(f"{export}: is not an export of {src.folder} (hidden {theirs.hidden_size} vs "
                               f"{spec.hidden_size}, layers {theirs.num_hidden_layers} vs {spec.num_hidden_layers})")
        report = Report(str(export), kind, target, max_kl=max_kl)
        report.metadata = metadata_problems(expected_spec(src, target), theirs, target, getattr(source, "arch", None))
        report.metadata += token_id_problems(src, source, target)
        jobs = expected_jobs(src_cached, target)
        if getattr(source, "rescaling", None):  # an INT4 export's function-preserving column scales
            from .formats.hf import int4_rescale
            if source.compensated:  # the per-group bound of other exports already fails a wrong entry
                report.metadata += int4_rescale.check_against(source.rescaling, source.rescaling_method, jobs,
                                                              theirs, str(Path(export) / int4_rescale.FILE))
            jobs = {j.name: j for j in int4_rescale.apply(list(jobs.values()), theirs, source.rescaling)}
        report.metadata += tensor_set_problems(jobs, source, target)
        # Logits compare only over the same vocabulary (a truncated one fails on its metadata).
        runs.append({"report": report, "source": LayerCache(source), "jobs": jobs,
                     "run": theirs.vocab_size == spec.vocab_size})

    with torch.no_grad():
        h_src = [reference.embed(src_cached, c.tokens) for c in text]
        for run in runs:
            run["h"] = [reference.embed(run["source"], c.tokens) if run["run"] else None for c in text]
        for i in range(spec.num_hidden_layers):
            h_src = [reference.decoder_layer(src_cached, i, h, rope(spec, len(c.tokens))) for h, c in zip(h_src, text)]
            prefix = f"model.layers.{i}."
            for run in runs:
                exp = run["source"]
                for name, job in run["jobs"].items():
                    if name.startswith(prefix) and exp.has(name):
                        run["report"].tensors.append(check_tensor(job, exp, run["report"].target))
                if run["run"] and i < exp.spec.num_hidden_layers:
                    run["h"] = [reference.decoder_layer(exp, i, h, rope(exp.spec, len(c.tokens)))
                                for h, c in zip(run["h"], text)]
        for run in runs:  # tensors outside the blocks (embedding, head, final norm), in row chunks
            exp = run["source"]
            for name, job in run["jobs"].items():
                if layer_index(name) is None and exp.has(name):
                    run["report"].tensors.append(check_tensor(job, exp, run["report"].target))
        accumulators = [Accumulator(ctx) for _ in runs]
        for k, c in enumerate(text):
            first, last = c.first_scored, len(c.tokens) - 1
            ref = reference.final_logits(src_cached, h_src[k][first:last])
            for run, acc in zip(runs, accumulators):
                if run["run"]:
                    acc.add(ref, reference.final_logits(run["source"], run["h"][k][first:last]), c.tokens[first + 1:])
    reports = []
    for run, acc in zip(runs, accumulators):
        report = run["report"]
        report.text = acc.stats() if run["run"] and acc.kl else None
        report.failures = failures(report)
        reports.append(report)
    return reports


def failures(report: Report) -> list[str]:
    """The reasons an export fails, one line each, naming the tensor or key and by how much."""
    out = list(report.metadata)
    bad = sorted((t for t in report.tensors if not t.passed), key=lambda t: -t.worst)
    for t in bad[:5]:
        out.append(f"tensor '{t.name}' ({t.storage}): {t.where}" if t.worst == math.inf else
                   f"tensor '{t.name}' ({t.storage}): error {t.worst:.3g}x its bound at {t.where}")
    if len(bad) > 5:
        out.append(f"... and {len(bad) - 5} more tensors out of their bounds")
    if report.max_kl is not None and report.text is not None and report.text.kl_mean > report.max_kl:
        out.append(f"mean KL divergence {report.text.kl_mean:.4g} exceeds --max-kl {report.max_kl:g}")
    return out
