"""Model cards: the README.md of every folder export (to-llama, to-int4) and, with `to-gguf --card`,
beside a GGUF, so that `huggingface-cli upload` publishes a correct card.

The front matter is what the Hub reads: `base_model` (the Hub repo the export was converted from,
when known: SRC given as a repo id or a folder of the Hugging Face cache; the Hub refuses a
`base_model` that is no repo, so a local folder gets none), `base_model_relation: quantized` for
quantized exports, `library_name`, `pipeline_tag`, `tags` (the family, the format, the
quantization), and the source card's `license`, `license_name`, `license_link` and `language`.
It is written by hand (scalars JSON-quoted, which YAML reads as they are), so the bytes do not
depend on a YAML library's version. The body says what the export is, how it was made and how
to run it; its verification section is filled in by `verify SRC EXPORT --card`.

A card we wrote carries MARKER (and, beside a GGUF, the files it describes); only such a card is
ever rewritten.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import ConvertError

CARD = "README.md"
MARKER = "<!-- minicpm-convert model card"
VERIFY_START, VERIFY_END = "<!-- verify -->", "<!-- /verify -->"
_FILES = re.compile(r"^<!-- minicpm-convert model card (\{.*\}) -->$", re.MULTILINE)


def source_card(folder: Path) -> dict:
    """The front matter of the source's own model card (README.md), as llama.cpp's converter reads it."""
    import gguf
    import yaml

    try:
        return gguf.Metadata.load_model_card(Path(folder))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConvertError(f"{Path(folder) / CARD}: cannot read the model card's front matter "
                           f"({str(exc).splitlines()[0][:120]})") from None


@dataclass
class Card:
    """What a card says; `render()` gives the README.md text."""

    title: str
    summary: str  # a paragraph: what the export is and how it was made
    library: str  # library_name: transformers, gguf
    tags: list[str]
    quantized: bool
    repo_id: str | None  # the source on the Hub (base_model), if known
    source_meta: dict  # the source card's front matter
    facts: list[tuple[str, str]] = field(default_factory=list)  # the "what it holds" table
    sections: list[tuple[str, str]] = field(default_factory=list)  # (heading, markdown)
    files: list[str] | None = None  # beside a GGUF: the files the card describes
    extra: dict = field(default_factory=dict)  # further front matter (quantized_by)
    source: str = ""  # SRC as the verify command should name it

    def front_matter(self) -> dict:
        meta = self.source_meta
        out: dict = {}
        for key in ("license", "license_name", "license_link"):
            if isinstance(meta.get(key), str):
                out[key] = meta[key]
        language = meta.get("language", meta.get("languages"))
        if isinstance(language, str):
            language = [language]
        if isinstance(language, list) and language and all(isinstance(x, str) for x in language):
            out["language"] = language
        if self.repo_id:
            out["base_model"] = self.repo_id
            if self.quantized:
                out["base_model_relation"] = "quantized"
        out["library_name"] = self.library
        out["pipeline_tag"] = "text-generation"
        out["tags"] = list(dict.fromkeys(self.tags))
        out.update(self.extra)
        return out

    def render(self, verification: str | None = None) -> str:
        lines = ["---"]
        for key, value in self.front_matter().items():
            if isinstance(value, list):
                lines.append(f"{key}:")
                lines += [f"- {json.dumps(v, ensure_ascii=False)}" for v in value]
            else:
                lines.append(f"{key}: {json.dumps(value, ensure_ascii=False)}")
        lines += ["---", ""]
        described = {"files": self.files} if self.files is not None else {}
        lines += [f"{MARKER} {json.dumps(described)} -->", "", f"# {self.title}", "", self.summary, ""]
        if self.facts:
            lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in self.facts), ""]
        for heading, text in self.sections:
            lines += [f"## {heading}", "", text.rstrip(), ""]
        lines += ["## Verification", "", VERIFY_START, (verification or self.unverified()).rstrip(), VERIFY_END, ""]
        return "\n".join(lines)

    def unverified(self) -> str:
        return (f"Not verified yet: `minicpm-convert verify {self.source} EXPORT --card` checks every tensor "
                "against the error bound of its storage type and the metadata against the source, compares the "
                "logits on real text (perplexity, KL divergence), and writes its figures here.")


def hub_link(repo_id: str | None, name: str) -> str:
    return f"[{repo_id}](https://huggingface.co/{repo_id})" if repo_id else f"`{name}`"


def source_tags(spec) -> list[str]:
    from .families import family_of
    return ["minicpm", "minicpm-convert", family_of(spec).name]


def written_by_us(path: Path) -> bool:
    """Whether `path` is a model card minicpm-convert wrote."""
    try:
        return path.is_file() and MARKER in path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def describes(card: Path, name: str) -> bool:
    """Whether the card of ours beside a GGUF describes the file `name`."""
    try:
        m = _FILES.search(card.read_text(encoding="utf-8"))
        return bool(m) and name in json.loads(m.group(1)).get("files", [])
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def card_of(export: Path) -> Path | None:
    """The card of ours that describes `export`: an export folder's README.md (listed in its
    manifest), or the README.md beside a GGUF that names the file; None if there is none."""
    from .output import read_manifest
    export = Path(export)
    if export.is_dir():
        path = export / CARD
        return path if CARD in (read_manifest(export) or []) and written_by_us(path) else None
    path = export.parent / CARD
    return path if written_by_us(path) and describes(path, export.name) else None


def update_verification(card: Path, verification: str) -> None:
    """Rewrite the card's verification section (atomically, as every output)."""
    from .output import atomic_file
    text = card.read_text(encoding="utf-8")
    with atomic_file(card) as tmp:
        tmp.write_text(with_verification(text, verification), encoding="utf-8")


def with_verification(text: str, verification: str) -> str:
    """The card's text with its verification section replaced."""
    head, sep, rest = text.partition(VERIFY_START)
    _, sep2, tail = rest.partition(VERIFY_END)
    if not sep or not sep2:
        return text.rstrip() + f"\n\n## Verification\n\n{VERIFY_START}\n{verification.rstrip()}\n{VERIFY_END}\n"
    return f"{head}{VERIFY_START}\n{verification.rstrip()}\n{VERIFY_END}{tail}"


def verification_text(report, source: str, text_label: str) -> str:
    """verify's figures for one export (a verify.Report) as the card shows them."""
    w, t = report.worst, report.text
    rows = [("verdict", "pass" if report.passed else "FAIL: " + "; ".join(report.failures[:3]))]
    if w is not None:
        rows.append(("weights", f"{len(report.tensors)} tensors within the error bound of their storage type; "
                                f"closest `{w.name}` ({w.storage}) at {w.worst:.3g} of its bound"))
    rows.append(("metadata", "equal to the source's (sizes, heads, scales, rope, vocabulary, special tokens)"
                 if not report.metadata else f"{len(report.metadata)} keys differ from the source"))
    if t is not None:
        rows += [("perplexity", f"source {t.ppl_source:.4f}, export {t.ppl_export:.4f} (ratio {t.ppl_ratio:.4f})"),
                 ("KL divergence", f"mean {t.kl_mean:.4g}, median {t.kl_median:.4g}, p99 {t.kl_p99:.4g}, "
                                   f"max {t.kl_max:.4g}"),
                 ("same top-1 token", f"{t.top1:.1%}"),
                 ("text", f"{text_label}: {t.scored} positions scored in {t.chunks} chunks of {t.ctx} tokens")]
    table = "\n".join(["| check | result |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    return (f"`minicpm-convert verify {source} EXPORT` (minicpm-convert {__version__}) against the original, "
            f"in float32:\n\n{table}\n")


# -- the cards of each export ------------------------------------------------------------------------
def _model_facts(spec, params: int) -> list[tuple[str, str]]:
    from .families import family_of
    facts = [("model family", family_of(spec).title), ("layers", str(spec.num_hidden_layers)),
             ("hidden size", str(spec.hidden_size)),
             ("attention heads (key/value)", f"{spec.num_attention_heads} ({spec.num_key_value_heads}), "
                                            f"head size {spec.head_dim}"),
             ("vocabulary", str(spec.vocab_size)), ("context", str(spec.max_position_embeddings))]
    return facts + [("parameters", f"{params:,}")]


def _notes(notes: list[str]) -> list[tuple[str, str]]:
    return [("Notes", "\n".join(f"- {n}" for n in notes))] if notes else []


def _base(ckpt, source: str, repo_id: str | None) -> dict:
    return dict(repo_id=repo_id, source_meta=source_card(ckpt.folder), source=repo_id or source)


TRANSFORMERS_USE = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{where}")  # {loads}
tokenizer = AutoTokenizer.from_pretrained("{where}")
```

or serve it with vLLM: `vllm serve {where}`{vllm}"""


def llama_card(ckpt, source: str, repo_id: str | None, architecture: str, dtype: str, params: int,
               notes: list[str]) -> Card:
    """The card of a to-llama export."""
    name = repo_id or source
    summary = (f"{hub_link(repo_id, source)} in the Llama format, converted by minicpm-convert {__version__} "
               f"(`minicpm-convert to-llama {name} OUT --dtype {dtype}`): `{architecture}` in {dtype}, which "
               "transformers, vLLM and any Llama tooling load without remote code, with the original's logits "
               "(the muP scale factors, where the model has them, folded into the weights).")
    use = TRANSFORMERS_USE.format(where="path/to/this/folder", loads=f"{architecture}, no trust_remote_code",
                                  vllm=".")
    return Card(f"{name} (Llama format, {dtype})", summary, "transformers",
                [*source_tags(ckpt.spec), architecture.removesuffix("ForCausalLM").lower(), dtype],
                quantized=False, facts=[("architecture", f"`{architecture}`"), ("weights", dtype),
                                        *_model_facts(ckpt.spec, params)],
                sections=[("Use", use), *_notes(notes)], **_base(ckpt, source, repo_id))


def int4_card(ckpt, source: str, repo_id: str | None, scheme, search: bool, report, params: int,
              notes: list[str], rescale: bool = True, calibration=None) -> Card:
    """The card of a to-int4 export (`calibration`: the GPTQ calibration it was made with, or None)."""
    from .families import family_of
    name = repo_id or source
    family = family_of(ckpt.spec)
    architecture = family.llama_architecture(ckpt.spec)
    quantized, rescaled = family.int4_card_terms(ckpt.spec)
    fmt = {"gptq": "GPTQ (v1)", "awq": "AutoAWQ GEMM (`awq`)"}.get(scheme.format, "compressed-tensors `pack-quantized`")
    flags = f"--format {scheme.format} --group-size {scheme.group_size} {'--sym' if scheme.sym else '--asym'}"
    flags += ("" if search else " --no-search") + ("" if rescale else " --no-rescale")
    if calibration is not None:
        no_act_order = calibration.gptq and not calibration.act_order
        flags += (f" --calibration {calibration.name} --samples {len(calibration.samples)} "
                  f"--seq-len {calibration.seq_len}{' --no-act-order' if no_act_order else ''}"
                  f"{'' if calibration.method == 'gptq' else ' --method ' + calibration.method}")
    by = {"gptq": "GPTQ", "awq": "AWQ", "awq-gptq": "AWQ and GPTQ"}[calibration.method] if calibration else ""
    how_made = (f"quantized by {by} on calibration text" if calibration is not None
                else "group-quantized without calibration data")
    summary = (f"{hub_link(repo_id, source)} with 4-bit weights, converted by minicpm-convert {__version__} "
               f"(`minicpm-convert to-int4 {name} OUT {flags}`): the Llama "
               f"format as to-llama writes it (`{architecture}`), whose {quantized} are {fmt}, "
               f"{how_made}; embeddings, norms and the head stay float16.")
    rows = ["| layer | round to nearest | this export |", "|---|---|---|"]
    for kind, err in report.by_layer_type().items():
        mine = err["search"] if err["search"] is not None else err["rtn"]
        rows.append(f"| {kind} | {err['rtn']:.4f} | {mine:.4f} |")
    how = ("a per-group search of the scale (and zero) for the least error weighted as llama.cpp's k-quants "
           "weight it, plain rounding among the candidates" if search else "plain rounding to nearest")
    if calibration is not None:
        tokens = f"{len(calibration.samples)} x {calibration.seq_len} tokens of `{calibration.name}`"
        if calibration.gptq:
            how = f"GPTQ on {tokens} (group scales by {how})"
        else:
            how = f"{how}, each column's error weighted by its activation energy on {tokens}"
        if calibration.awq:
            how += ("; before quantizing, AWQ's activation-aware scales (from the same tokens) were folded into "
                    "the input and post-attention norms and divided out of the q/k/v and gate/up input columns "
                    "(the function is unchanged; the scales are in `rescaling.safetensors`)")
    if rescale:
        how += (f"; before quantizing, {rescaled} (the function is unchanged; the scales are in "
                "`rescaling.safetensors`)")
    quant = (f"{fmt}, 4 bits, group size {scheme.group_size}, {'symmetric' if scheme.sym else 'asymmetric'}, "
             f"{how}. Mean relative weight error ||W-Ŵ||/||W|| per layer type (`quantization_report.json` has "
             "every tensor's):\n\n" + "\n".join(rows))
    needs = {"gptq": "GPTQ: needs `optimum` and `gptqmodel`",
             "awq": "AWQ: needs `gptqmodel` (transformers 5 loads AWQ through it)"}.get(
        scheme.format, "needs `compressed-tensors`")
    vllm = "" if scheme.sym or scheme.format != "gptq" else " (vLLM 0.32 refuses asymmetric GPTQ)"
    use = TRANSFORMERS_USE.format(where="path/to/this/folder", loads=needs, vllm=f".{vllm}")
    return Card(f"{name} (INT4, {scheme.format}, group {scheme.group_size})", summary, "transformers",
                [*source_tags(ckpt.spec), architecture.removesuffix("ForCausalLM").lower(), scheme.format, "4-bit",
                 "int4"], quantized=True,
                facts=[("architecture", f"`{architecture}`"),
                       ("quantization", f"{scheme.format}, 4-bit, group {scheme.group_size}, "
                                        f"{'sym' if scheme.sym else 'asym'}"),
                       *_model_facts(ckpt.spec, params)],
                sections=[("Quantization", quant), ("Use", use), *_notes(notes)], **_base(ckpt, source, repo_id))


FLOAT_GGUF = ("F32", "F16", "BF16")


def gguf_card(ckpt, source: str, repo_id: str | None, arch: str, file_type: str, files: list[Path], params: int,
              imatrix: str | None, quantized_by: str | None, notes: list[str]) -> Card:
    """The card written beside a GGUF (a split set: its files) by `to-gguf --card`."""
    name = repo_id or source
    type_name = file_type.upper()  # llama.cpp's spelling: Q4_K_M, IQ2_XXS
    size = sum(f.stat().st_size for f in files)
    summary = (f"{hub_link(repo_id, source)} as GGUF for llama.cpp (and ollama, LM Studio, llama-cpp-python), "
               f"converted by minicpm-convert {__version__} (`minicpm-convert to-gguf {name} OUT --quant "
               f"{file_type}{' --arch ' + arch if arch == 'llama' else ''}`): architecture `{arch}`, file type "
               f"{type_name}, every tensor byte-identical to llama.cpp's `llama-quantize` with its type plan.")
    first = files[0].name
    rows = ["| file | bytes |", "|---|---|", *(f"| `{f.name}` | {f.stat().st_size:,} |" for f in files)]
    facts = [("architecture", f"`{arch}`"), ("file type", type_name),
             ("bits per weight", f"{size * 8 / params:.2f} (file size over parameters)")]
    if imatrix:
        facts.append(("importance matrix", f"`{imatrix}`"))
    use = (f"```sh\nllama-cli -m {first} -p \"<用户>Hello<AI>\" -n 128\nllama-server -m {first} --port 8080\n```"
           + ("\n\nThe files are a split set: llama.cpp opens it by its first file." if len(files) > 1 else ""))
    tags = [*source_tags(ckpt.spec), "gguf", "llama.cpp", file_type.lower()]
    quantized = type_name not in FLOAT_GGUF
    return Card(f"{name} GGUF ({type_name})", summary, "gguf", tags, quantized,
                facts=[*facts, *_model_facts(ckpt.spec, params)], files=[f.name for f in files],
                sections=[("Files", "\n".join(rows)), ("Use", use), *_notes(notes)],
                extra={"quantized_by": quantized_by} if quantized_by else {}, **_base(ckpt, source, repo_id))
