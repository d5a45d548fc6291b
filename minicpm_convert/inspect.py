"""`inspect`: what a checkpoint or an export holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .names import layer_index
from .families import family_of


def _tensor_table(rows: list[tuple[str, tuple[int, ...], str]]) -> Table:
    """Tensors outside blocks and those of block 0 in full; other blocks summarised."""
    table = Table(show_header=True)
    table.add_column("tensor")
    table.add_column("shape", justify="right")
    table.add_column("type")
    hidden = 0
    for name, shape, kind in rows:
        idx = layer_index(name)
        if idx is None or idx == 0:
            table.add_row(name, "x".join(map(str, shape)), kind)
        else:
            hidden += 1
    if hidden:
        table.add_row(f"... {hidden} more tensors in the other blocks", "", "")
    return table


@dataclass
class Inspection:
    """What `inspect` found: a title, facts in reading order, and the tensors (name, shape, type)."""

    title: str
    facts: list[str] = field(default_factory=list)
    tensors: list[tuple[str, tuple[int, ...], str]] = field(default_factory=list)


def inspect(path: str) -> Inspection:
    from .sources import is_gguf

    p = Path(path)
    if p.is_file() and (p.suffix == ".gguf" or is_gguf(p)):  # a damaged .gguf is still named as one
        return _inspect_gguf(p)
    from .sources.checkpoint import Checkpoint
    from .sources.int4 import Int4Source, is_int4_folder

    # An INT4 export holds packed tensors, not the dense set its config implies: validate it as INT4.
    ckpt = Int4Source(p).ckpt if p.is_dir() and is_int4_folder(p) else Checkpoint.open(path)
    spec = ckpt.spec
    params = sum(_numel(ckpt.shape(n)) for n in ckpt.names())
    found = Inspection(str(ckpt.folder))
    say = found.facts.append
    family = family_of(spec)
    say(f"variant: {spec.variant} ({family.title})")
    if family.refused:
        say(f"refused by every command: {family.refused}")
    quant = ckpt.config.get("quantization_config")
    if quant:
        say(f"quantization: {quant.get('quant_method')} {quant.get('format', '')} "
            f"bits={quant.get('bits', '')} group_size={quant.get('group_size', '')}")
    say(f"layers {spec.num_hidden_layers}, hidden {spec.hidden_size}, heads {spec.num_attention_heads}/"
        f"{spec.num_key_value_heads} (head_dim {spec.head_dim}), intermediate {spec.intermediate_size}, "
        f"vocab {spec.vocab_size}, tied head: {spec.tie_word_embeddings}")
    found.facts.extend(family.facts(spec))
    say(f"rope theta {spec.rope_theta:g}, scaling {spec.rope_scaling}, max positions "
        f"{spec.max_position_embeddings}, rms eps {spec.rms_norm_eps:g}")
    say(f"weights: {', '.join(f.name for f in ckpt.weight_files)}")
    what = "stored values (4-bit weights packed 8 per int32)" if quant else "parameters"
    say(f"{len(ckpt.names())} tensors, {params:,} {what} ({params / 1e9:.3f} B)")
    found.tensors = [(n, ckpt.shape(n), str(ckpt.dtype(n)).removeprefix("torch.")) for n in ckpt.names()]
    return found


def render(found: Inspection, console: Console) -> None:
    console.print(f"[bold]{found.title}[/]")
    for fact in found.facts:
        console.print(fact, highlight=False, markup=False)
    console.print(_tensor_table(found.tensors))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _inspect_gguf(path: Path) -> Inspection:
    from .sources.gguf import GgufSource

    src = GgufSource(path)
    files = f", split into {len(src.readers)} files" if len(src.readers) > 1 else ""
    found = Inspection(f"{path} (GGUF v{src.version}, {src.file_type_name}{files})")
    for key, value in src.summary_fields():
        found.facts.append(f"{key}: {value}")
    found.tensors = [(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name)
                     for t in src.tensors]
    params = sum(_numel(r[1]) for r in found.tensors)
    found.facts.append(f"{len(found.tensors)} tensors, {params:,} parameters ({params / 1e9:.3f} B); "
                       "shapes as rows x columns")
    return found
