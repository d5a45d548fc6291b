"""The `minicpm-convert` command line."""

from __future__ import annotations

import json
import re
import sys
from enum import Enum
from functools import wraps
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import ConvertError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Convert MiniCPM checkpoints (Hugging Face layout) to Llama format, GGUF and INT4, "
         "and verify every export numerically against a reference forward pass.",
)
# Not a terminal (CI logs, pipes): wide enough that tables keep their columns.
out_console = Console(width=None if Console().is_terminal else 160)
err_console = Console(stderr=True, width=None if Console(stderr=True).is_terminal else 160)


def run_safely(fn):
    """Bad input: one line on stderr and exit 2. Ctrl-C: exit 130 (temporaries already removed)."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConvertError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; no output was written", highlight=False)
            raise typer.Exit(130) from None
    return wrapper


def version_callback(value: bool):
    if value:
        out_console.print(f"minicpm-convert {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                      help="Print the version and exit.")):
    pass


class DType(str, Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise ConvertError(f"--shard-size: cannot read {text!r} (examples: 2GB, 500MB)")
    value = float(m.group(1)) * 1000 ** "_KMGT".index(m.group(2).upper() or "_")
    if value < 1:
        raise ConvertError(f"--shard-size: must be positive, got {text!r}")
    return int(value)


SRC_HELP = "MiniCPM checkpoint: a local folder or a Hugging Face repo id (e.g. openbmb/MiniCPM-2B-sft-bf16)."
FORCE_HELP = "Overwrite OUT if it exists."
QUIET_HELP = "No progress bar."


@app.command("to-llama")
@run_safely
def to_llama(
    src: str = typer.Argument(..., help=SRC_HELP),
    out: Path = typer.Argument(..., help="Output folder (LlamaForCausalLM checkpoint)."),
    dtype: DType = typer.Option(DType.auto, "--dtype", help="Weight dtype; auto keeps the source's."),
    shard_size: str = typer.Option("2GB", "--shard-size", help="Largest safetensors shard."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Fold the muP scale factors into the weights and write a Llama-format checkpoint.

    The result loads in transformers (LlamaForCausalLM), vLLM and any Llama tooling without
    remote code, and gives the same logits as the MiniCPM original.
    """
    from .sources.checkpoint import Checkpoint
    from .output import atomic_folder, write_manifest
    from .formats.hf.llama import write_llama
    from .stream import llama_stream

    shard_bytes = parse_size(shard_size)
    ckpt = Checkpoint.open(src)
    target_folder = folder_target(out, force, ckpt)
    refuse_unsupported(ckpt, "to-llama")
    target = ckpt.storage_dtype if dtype is DType.auto else getattr(torch, dtype.value)
    if target not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConvertError(f"{ckpt.folder}: stored as {target}; pass --dtype bfloat16|float16|float32")
    warn_lossy(ckpt, out)
    with atomic_folder(target_folder) as tmp:
        write_llama(ckpt, llama_stream(ckpt), tmp, target, shard_bytes, quiet=quiet)
        write_manifest(tmp, command="to-llama", source=source_name(src))
    arch_name = "MixtralForCausalLM" if ckpt.spec.num_experts else "LlamaForCausalLM"
    err_console.print(f"wrote {target_folder.path} ({arch_name}, {str(target).removeprefix('torch.')})",
                      highlight=False)


class Arch(str, Enum):
    minicpm = "minicpm"
    llama = "llama"


@app.command("to-gguf")
@run_safely
def to_gguf(
    src: str = typer.Argument(..., help=SRC_HELP),
    out: Path = typer.Argument(..., help="Output .gguf file."),
    quant: str = typer.Option("q4_K_M", "--quant", help="File type, any llama-quantize spelling (case-insensitive): "
                              "f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_K q2_K_S q3_K_S q3_K_M q3_K_L q4_K_S q4_K_M "
                              "q5_K_S q5_K_M q6_K iq4_nl iq4_xs iq3_xxs iq3_xs iq3_s iq3_m iq2_xxs iq2_xs iq2_s iq2_m "
                              "tq1_0 tq2_0 (aliases Q4_K, q4km, ...)."),
    arch: Arch = typer.Option(Arch.minicpm, "--arch", help="minicpm: scales as metadata, as llama.cpp's converter "
                                                         "writes it; llama: scales folded in, runs on any Llama runtime."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix (llama-imatrix's GGUF or legacy "
                                           ".dat), as llama-quantize --imatrix."),
    output_tensor_type: Optional[str] = typer.Option(None, "--output-tensor-type", help="ggml type of output.weight."),
    token_embedding_type: Optional[str] = typer.Option(None, "--token-embedding-type",
                                                       help="ggml type of token_embd.weight."),
    tensor_type: list[str] = typer.Option([], "--tensor-type", help="REGEX=TYPE: tensors whose name matches get TYPE "
                                          "(repeatable; the first match wins), e.g. attn_v=q8_0."),
    pure: bool = typer.Option(False, "--pure", help="Every quantized tensor in the file type's default type."),
    leave_output_tensor: bool = typer.Option(False, "--leave-output-tensor", help="Leave output.weight unquantized (F32)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the type plan (per tensor, fallbacks, bits per "
                                 "weight, file size) and write nothing."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Write a GGUF file for llama.cpp (and ollama, LM Studio, llama-cpp-python).

    Quantized tensors are byte-identical to llama.cpp's llama-quantize on the same weights,
    with llama-quantize's choice of type per tensor, quantized from the exact source values.
    """
    from .formats.gguf import imatrix as imatrix_file
    from .formats.gguf.metadata import default_file_name, model_metadata
    from .formats.gguf.plan import format_report, parse_options
    from .formats.gguf.writer import dry_run as plan_report
    from .formats.gguf.writer import gguf_jobs, write_gguf
    from .output import Protected, atomic_file, file_output
    from .sources.checkpoint import Checkpoint

    options = parse_options(quant, imatrix=imatrix is not None, output_tensor_type=output_tensor_type,
                            token_embedding_type=token_embedding_type, tensor_types=tensor_type, pure=pure,
                            leave_output_tensor=leave_output_tensor)
    ft = options.file_type
    importance = imatrix_file.read(imatrix) if imatrix is not None else None
    ckpt = Checkpoint.open(src)
    if dry_run:
        refuse_unsupported(ckpt, "to-gguf", arch.value)
        out_console.print(format_report(plan_report(ckpt, arch.value, src, options, importance)), highlight=False,
                          markup=False, soft_wrap=True)
        return

    def default_name() -> str:
        file_arch = "minicpm3" if ckpt.spec.mla else arch.value
        jobs = gguf_jobs(ckpt, file_arch)
        return default_file_name(model_metadata(ckpt.folder, [(n, j.shape) for n, j in jobs]), ft)

    final = file_output(out, default_name, force, Protected.of([ckpt.folder]))
    refuse_unsupported(ckpt, "to-gguf", arch.value)
    warn_lossy(ckpt, final)
    if ckpt.spec.rope_type == "dynamic":
        err_console.print(f"warning: llama.cpp has no dynamic NTK rope scaling; {final} is exact up to "
                          f"{ckpt.spec.max_position_embeddings} tokens (max_position_embeddings)", highlight=False)
    with atomic_file(final) as tmp:
        write_gguf(ckpt, tmp, ft, arch.value, src, quiet=quiet, options=options, imatrix=importance)
    file_arch = "minicpm3" if ckpt.spec.mla else arch.value
    err_console.print(f"wrote {final} (GGUF arch {file_arch}, {ft.name})", highlight=False)


class Int4Format(str, Enum):
    gptq = "gptq"
    compressed_tensors = "compressed-tensors"


@app.command("to-int4")
@run_safely
def to_int4(
    src: str = typer.Argument(..., help=SRC_HELP),
    out: Path = typer.Argument(..., help="Output folder (LlamaForCausalLM with 4-bit Linear layers)."),
    fmt: Int4Format = typer.Option(Int4Format.gptq, "--format", help="gptq: GPTQ v1 (transformers+gptqmodel, vLLM, "
                                   "SGLang); compressed-tensors: pack-quantized (transformers, vLLM)."),
    group_size: int = typer.Option(128, "--group-size", help="Weights per scale along the input: 32, 64 or 128."),
    sym: bool = typer.Option(True, "--sym/--asym", help="Symmetric (zero 8) or asymmetric (a zero per group)."),
    search: bool = typer.Option(True, "--search/--no-search", help="Search each group's scale (and zero) for the "
                                "least weighted error; --no-search rounds to nearest."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Write a 4-bit group-quantized Llama-format checkpoint (no calibration data needed).

    The seven projections of every block are quantized; embeddings, norms and lm_head stay
    float16. Prints the relative weight error per layer type and writes quantization_report.json.
    """
    from .formats.hf.int4 import GROUP_SIZES, Int4Scheme
    from .formats.hf.int4_writer import REPORT_FILE, write_int4
    from .output import atomic_folder, write_manifest
    from .sources.checkpoint import Checkpoint
    from .stream import llama_stream

    if group_size not in GROUP_SIZES:
        raise ConvertError(f"--group-size: {group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")
    ckpt = Checkpoint.open(src)
    target_folder = folder_target(out, force, ckpt)
    refuse_unsupported(ckpt, "to-int4")
    scheme = Int4Scheme(fmt.value, group_size, sym)
    with atomic_folder(target_folder) as tmp:
        report = write_int4(ckpt, llama_stream(ckpt), tmp, scheme, search=search, quiet=quiet)
        write_manifest(tmp, command="to-int4", source=source_name(src))
    table = Table(title=f"relative weight error ||W-Ŵ||/||W|| (mean over layers; {REPORT_FILE})")
    for col in ("layer", "round-to-nearest", "search", "change"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for kind, err in report.by_layer_type().items():
        found = err["search"]
        table.add_row(kind, f"{err['rtn']:.4f}", "-" if found is None else f"{found:.4f}",
                      "-" if found is None else f"{(found - err['rtn']) / err['rtn']:+.1%}")
    out_console.print(table)
    err_console.print(f"wrote {target_folder.path} (INT4 {fmt.value}, group {group_size}, {'sym' if sym else 'asym'})",
                      highlight=False)


def folder_target(out: Path, force: bool, ckpt):
    """Where a folder export goes, refused if it would replace the source or a stranger's files."""
    from .output import Protected, folder_output
    return folder_output(out, force, Protected.of([ckpt.folder]))


def source_name(src: str) -> str:
    """The source as recorded in an export's manifest: a Hub id as given, a folder by its name
    (no absolute path, so the same conversion gives the same bytes anywhere)."""
    path = Path(src)
    return path.resolve().name if path.exists() else src


def refuse_unsupported(ckpt, command: str, arch: str | None = None) -> None:
    """Refuse, by name and with the reason, what a command cannot convert exactly."""
    variant = ckpt.spec.variant
    reasons = {
        # MLA has no Llama equivalent; GGUF arch minicpm3 (llama.cpp's own) represents it exactly.
        "minicpm3": None if (command, arch) == ("to-gguf", "minicpm")
                    else "MiniCPM3's MLA attention has no Llama equivalent",
        "minicpm-s": "MiniCPM-S's FATReLU activation has no Llama or llama.cpp equivalent",
        # to-llama writes Mixtral layout and to-gguf llama.cpp's MoE tensors; INT4 has no MoE layout here.
        "minicpm-moe": "INT4 export of MiniCPM-MoE's experts is not supported" if command == "to-int4" else None,
        "llama": "this is already a Llama-format checkpoint",
    }
    if reasons.get(variant):
        raise ConvertError(f"{ckpt.folder}: {command} refuses variant '{variant}': {reasons[variant]}")
    spec = ckpt.spec
    if spec.mla and (spec.scale_emb, spec.scale_depth, spec.dim_model_base) != (12.0, 1.4, 256.0):
        # llama.cpp's minicpm3 graph hard-codes MiniCPM3-4B's muP scalars
        raise ConvertError(f"{ckpt.folder}/config.json: llama.cpp's minicpm3 architecture assumes scale_emb 12, "
                           "scale_depth 1.4 and dim_model_base 256; this model differs")
    if ckpt.spec.hidden_act != "silu":
        raise ConvertError(f"{ckpt.folder}/config.json: hidden_act '{ckpt.spec.hidden_act}' is not supported (silu only)")
    kind = ckpt.spec.rope_type
    if kind not in (None, "dynamic", "longrope"):
        raise ConvertError(f"{ckpt.folder}/config.json: rope_scaling type {kind!r} is not supported")
    if kind == "longrope" and command == "to-gguf":
        from .reference import longrope
        if longrope(ckpt.spec, 1)[1] != 1.0:
            raise ConvertError(f"{ckpt.folder}/config.json: max_position_embeddings > original_max_position_embeddings "
                               "gives LongRoPE an attention scale that llama.cpp does not apply")


def warn_lossy(ckpt, out: Path) -> None:
    """What an export keeps differently from the original, said once before the work starts."""
    sparse = ckpt.config.get("sparse_config")
    if isinstance(sparse, dict):
        dense_len = sparse.get("dense_len", "dense_len")
        err_console.print(f"note: {out} uses dense attention; MiniCPM4's sparse attention (sparse_config) is not "
                          f"carried over, and MiniCPM4 itself attends densely below {dense_len} tokens",
                          highlight=False)


def parse_tokens(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in re.split(r"[,\s]+", text.strip()) if t]
    except ValueError:
        raise ConvertError(f"--tokens: expected comma-separated integers, got {text!r}") from None


@app.command("verify")
@run_safely
def verify_cmd(
    src: str = typer.Argument(..., help=SRC_HELP),
    exports: list[Path] = typer.Argument(..., help="One or more exports of SRC: Llama-format folders or GGUF files."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text to run (encoded with SRC's tokenizer.model)."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Token ids to run instead, e.g. 1,2345,67."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the figures to this JSON file "
                                            "(a folder: verify.json inside it)."),
    force: bool = typer.Option(False, "--force", help="Overwrite the --json file if it exists."),
):
    """Run the MiniCPM reference on SRC and on each export, and compare their logits.

    Exit code 0 when every export is within its threshold, 1 when one is not, 2 on bad input.
    """
    from .sources.checkpoint import Checkpoint
    from .verify import prompt_tokens, verify

    if prompt is not None and tokens is not None:
        raise ConvertError("give --prompt or --tokens, not both")
    ckpt = Checkpoint.open(src)
    if ckpt.spec.variant not in ("minicpm", "minicpm-longrope", "minicpm-moe", "minicpm3"):
        raise ConvertError(f"{ckpt.folder}: verify does not support variant '{ckpt.spec.variant}' "
                           "(the reference forward pass has no FATReLU)")
    json_final = None
    if json_out is not None:
        from .output import Protected, file_output
        json_final = file_output(json_out, lambda: "verify.json", force, Protected.of([ckpt.folder], exports))
    ids = prompt_tokens(ckpt, prompt, parse_tokens(tokens))
    if len(ids) > ckpt.spec.max_position_embeddings:
        raise ConvertError(f"{len(ids)} tokens exceed max_position_embeddings "
                           f"({ckpt.spec.max_position_embeddings}); use a shorter prompt")
    reports = verify(ckpt, exports, ids)
    table = Table(title=f"parity against {src} ({len(ids)} tokens)")
    for col in ("export", "kind", "max abs err", "rel err", "min cosine", "top-1", "KL (nats)", "result"):
        table.add_column(col, justify="left" if col in ("export", "kind") else "right")
    for r in reports:
        table.add_row(Path(r.export).name, r.kind, f"{r.max_abs_err:.3g}", f"{r.rel_err:.3g}", f"{r.cosine:.6f}",
                      f"{r.top1:.1%}", f"{r.kl:.3g}", "[green]pass[/]" if r.passed else "[red]FAIL[/]")
    out_console.print(table)
    if json_final is not None:
        from .output import write_json_file
        payload = {"source": src, "tokens": ids, "exports": [r.as_dict() for r in reports],
                   "passed": all(r.passed for r in reports)}
        write_json_file(json_final, payload)
    if not all(r.passed for r in reports):
        raise typer.Exit(1)


@app.command("inspect")
@run_safely
def inspect_cmd(path: str = typer.Argument(..., help="A checkpoint folder, export folder, GGUF file or Hub repo id.")):
    """Show config, variant, tensors, dtypes and parameter count."""
    from .inspect import describe
    describe(path, out_console)


def entry() -> None:  # pragma: no cover - console script
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
