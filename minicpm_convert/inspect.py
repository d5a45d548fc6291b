"""`inspect`: what a checkpoint or an export holds."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .names import layer_index
from .spec import VARIANTS


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


def describe(path: str, console: Console) -> None:
    from .sources import is_gguf

    p = Path(path)
    if p.is_file() and is_gguf(p):
        return _describe_gguf(p, console)
    from .sources.checkpoint import Checkpoint
    from .sources.int4 import Int4Source, is_int4_folder

    # An INT4 export holds packed tensors, not the dense set its config implies: validate it as INT4.
    ckpt = Int4Source(p).ckpt if p.is_dir() and is_int4_folder(p) else Checkpoint.open(path)
    spec = ckpt.spec
    params = sum(_numel(ckpt.shape(n)) for n in ckpt.names())
    console.print(f"[bold]{ckpt.folder}[/]")
    console.print(f"variant: {spec.variant} ({VARIANTS.get(spec.variant, '?')})")
    quant = ckpt.config.get("quantization_config")
    if quant:
        console.print(f"quantization: {quant.get('quant_method')} {quant.get('format', '')} "
                      f"bits={quant.get('bits', '')} group_size={quant.get('group_size', '')}")
    console.print(f"layers {spec.num_hidden_layers}, hidden {spec.hidden_size}, heads {spec.num_attention_heads}/"
                  f"{spec.num_key_value_heads} (head_dim {spec.head_dim}), intermediate {spec.intermediate_size}, "
                  f"vocab {spec.vocab_size}, tied head: {spec.tie_word_embeddings}")
    if spec.is_mup:
        console.print(f"muP: scale_emb {spec.scale_emb:g}, residual scale {spec.residual_scale:.6g} "
                      f"(scale_depth {spec.scale_depth:g}/sqrt({spec.num_hidden_layers})), "
                      f"logit divisor {spec.logit_scale:g} (hidden/dim_model_base)")
    console.print(f"rope theta {spec.rope_theta:g}, scaling {spec.rope_scaling}, max positions "
                  f"{spec.max_position_embeddings}, rms eps {spec.rms_norm_eps:g}")
    console.print(f"weights: {', '.join(f.name for f in ckpt.weight_files)}")
    what = "stored values (4-bit weights packed 8 per int32)" if quant else "parameters"
    console.print(f"{len(ckpt.names())} tensors, {params:,} {what} ({params / 1e9:.3f} B)")
    rows = [(n, ckpt.shape(n), str(ckpt.dtype(n)).removeprefix("torch.")) for n in ckpt.names()]
    console.print(_tensor_table(rows))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _describe_gguf(path: Path, console: Console) -> None:
    from .sources.gguf import GgufSource

    src = GgufSource(path)
    console.print(f"[bold]{path}[/] (GGUF v{src.version}, {src.file_type_name})")
    for key, value in src.summary_fields():
        console.print(f"{key}: {value}")
    rows = [(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name) for t in src.tensors]
    params = sum(_numel(r[1]) for r in rows)
    console.print(f"{len(rows)} tensors, {params:,} parameters ({params / 1e9:.3f} B); shapes as rows x columns")
    console.print(_tensor_table(rows))
