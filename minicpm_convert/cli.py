"""The `minicpm-convert` command line: options parsed here, the work done by `api.py`."""

from __future__ import annotations

import gc
import os
import re
import sys
import traceback
from enum import Enum
from functools import wraps
from pathlib import Path
from typing import Optional

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
DEBUG = {"on": False}


def say(text: str) -> None:
    err_console.print(text, highlight=False, markup=False, soft_wrap=True)


def run_safely(fn):
    """Bad input: one line on stderr and exit 2. Ctrl-C: exit 130 (temporaries already removed).
    Anything else is a bug in minicpm-convert: one line naming it (the traceback with --debug)."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConvertError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            say("interrupted; no output was written")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            if DEBUG["on"]:
                traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            say(f"error: internal error in minicpm-convert {__version__} (a bug, please report it): "
                f"{type(exc).__name__}: {first}" + ("" if DEBUG["on"] else " (run with --debug for the traceback)"))
            raise typer.Exit(2) from None
    return wrapper


def version_callback(value: bool):
    if value:
        out_console.print(f"minicpm-convert {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                      help="Print the version and exit."),
         debug: bool = typer.Option(False, "--debug", help="Show the traceback of an internal error.")):
    DEBUG["on"] = debug


class DType(str, Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


def parse_size(text: str) -> int:
    from .api import parse_size as parse
    return parse(text)


SRC_HELP = "MiniCPM checkpoint: a local folder or a Hugging Face repo id (e.g. openbmb/MiniCPM-2B-sft-bf16)."
FORCE_FOLDER_HELP = ("Replace OUT if it is an earlier export of minicpm-convert (never the source or a folder of "
                     "other files; files you added to it are kept).")
FORCE_FILE_HELP = "Overwrite OUT if it is a file (never one of the inputs or a file inside the source)."
FORCE_GGUF_HELP = ("Overwrite OUT if it is a file (never one of the inputs or a file inside the source); split files "
                   "and a model card only when minicpm-convert wrote them, and an earlier split set of ours under the "
                   "same name goes.")
QUIET_HELP = "No progress bar and no report table."


def note(text: str) -> None:
    """A family's note on an export ('OUT: ...'), said before the work starts."""
    where, _, body = text.partition(": ")
    say(f"warning: {where}: {body.removeprefix('warning: ')}" if body.startswith("warning: ") else f"note: {text}")


@app.command("to-llama")
@run_safely
def to_llama(
    src: str = typer.Argument(..., help=SRC_HELP),
    out: Path = typer.Argument(..., help="Output folder (LlamaForCausalLM checkpoint)."),
    dtype: DType = typer.Option(DType.auto, "--dtype", help="Weight dtype; auto keeps the source's."),
    shard_size: str = typer.Option("2GB", "--shard-size", help="Largest safetensors shard."),
    force: bool = typer.Option(False, "--force", help=FORCE_FOLDER_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Fold the muP scale factors into the weights and write a Llama-format checkpoint.

    The result loads in transformers (LlamaForCausalLM), vLLM and any Llama tooling without
    remote code, and gives the same logits as the MiniCPM original. Its README.md is a model
    card for the Hugging Face Hub.
    """
    from . import api
    done = api.to_llama(src, out, dtype=dtype.value, shard_size=shard_size, force=force, quiet=quiet, notes=note)
    say(f"wrote {done.path} ({done.kind})")


class Arch(str, Enum):
    minicpm = "minicpm"
    llama = "llama"


@app.command("to-gguf")
@run_safely
def to_gguf(
    src: str = typer.Argument(..., help=SRC_HELP),
    out: Path = typer.Argument(..., help="Output .gguf file, or a folder to write it in (named as llama.cpp's "
                                         "converter names it)."),
    quant: str = typer.Option("q4_K_M", "--quant", help="File type, any llama-quantize spelling (case-insensitive): "
                              "f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_K q2_K_S q3_K_S q3_K_M q3_K_L q4_K_S q4_K_M "
                              "q5_K_S q5_K_M q6_K iq4_nl iq4_xs iq3_xxs iq3_xs iq3_s iq3_m iq2_xxs iq2_xs iq2_s iq2_m "
                              "tq1_0 tq2_0 (aliases Q4_K, q4km, ...)."),
    arch: Optional[Arch] = typer.Option(None, "--arch", help="minicpm: scales as metadata, as llama.cpp's converter "
                                        "writes MiniCPM (the default for MiniCPM 1/2/4 and MoE); llama: scales folded "
                                        "in, runs on any Llama runtime (the default for Llama-architecture models). "
                                        "MiniCPM3 is always arch minicpm3."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix (llama-imatrix's GGUF or legacy "
                                           ".dat, or minicpm-convert imatrix's), as llama-quantize --imatrix."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="A text to compute the importance matrix "
                                               "from first, in one step (no intermediate file)."),
    ctx: int = typer.Option(512, "--ctx", help="With --calibration: tokens per chunk."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="With --calibration: at most this many chunks."),
    output_tensor_type: Optional[str] = typer.Option(None, "--output-tensor-type", help="ggml type of output.weight."),
    token_embedding_type: Optional[str] = typer.Option(None, "--token-embedding-type",
                                                       help="ggml type of token_embd.weight."),
    tensor_type: list[str] = typer.Option([], "--tensor-type", help="REGEX=TYPE: tensors whose name matches get TYPE "
                                          "(repeatable; the first match wins), e.g. attn_v=q8_0."),
    pure: bool = typer.Option(False, "--pure", help="Every quantized tensor in the file type's default type."),
    leave_output_tensor: bool = typer.Option(False, "--leave-output-tensor", help="Leave output.weight unquantized (F32)."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="general.name (default: as llama.cpp's "
                                             "converter derives it from the model card, config and folder name)."),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help="A JSON file of general.* keys overriding "
                                            "what the model card gives, as llama.cpp's converter's --metadata, e.g. "
                                            '{"general.quantized_by": "you"}.'),
    split_max_size: Optional[str] = typer.Option(None, "--split-max-size", help="Split the GGUF into files of at most "
                                                 "this much tensor data (e.g. 2G, 500M), named "
                                                 "NAME-00001-of-0000N.gguf as llama.cpp's converter and gguf-split "
                                                 "name them."),
    split_max_tensors: int = typer.Option(0, "--split-max-tensors", help="Split the GGUF into files of at most this "
                                          "many tensors (0: no limit)."),
    card: bool = typer.Option(False, "--card", help="Also write a model card (README.md with Hugging Face front "
                              "matter) beside the GGUF, for huggingface-cli upload."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the type plan (per tensor, fallbacks, bits per "
                                 "weight, file size) and write nothing."),
    force: bool = typer.Option(False, "--force", help=FORCE_GGUF_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Write a GGUF file for llama.cpp (and ollama, LM Studio, llama-cpp-python).

    Quantized tensors are byte-identical to llama.cpp's llama-quantize on the same weights,
    with llama-quantize's choice of type per tensor, quantized from the exact source values.
    """
    from . import api

    plan = dict(imatrix=imatrix, output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type,
                tensor_types=tensor_type, pure=pure, leave_output_tensor=leave_output_tensor, model_name=model_name,
                metadata=metadata, split_max_size=split_max_size, split_max_tensors=split_max_tensors)
    if dry_run:
        from .formats.gguf.plan import format_report
        report = api.gguf_plan(src, quant=quant, arch=arch.value if arch else None, **plan)
        out_console.print(format_report(report), highlight=False, markup=False, soft_wrap=True)
        return
    done = api.to_gguf(src, out, quant=quant, arch=arch.value if arch else None, force=force, quiet=quiet,
                       notes=note, calibration=calibration, ctx=ctx, chunks=chunks, card=card, **plan)
    say(f"wrote {done.path} ({done.kind})")


class Int4Format(str, Enum):
    gptq = "gptq"
    compressed_tensors = "compressed-tensors"
    awq = "awq"


class Int4Method(str, Enum):
    gptq = "gptq"
    awq = "awq"
    awq_gptq = "awq-gptq"


@app.command("to-int4")
@run_safely
def to_int4(
    src: str = typer.Argument(..., help=SRC_HELP),
    out: Path = typer.Argument(..., help="Output folder (LlamaForCausalLM, MixtralForCausalLM for MiniCPM-MoE, with 4-bit Linear layers)."),
    fmt: Int4Format = typer.Option(Int4Format.gptq, "--format", help="gptq: GPTQ v1 (transformers+gptqmodel, vLLM, "
                                   "SGLang); compressed-tensors: pack-quantized (transformers, vLLM); awq: AutoAWQ "
                                   "GEMM, asymmetric (transformers+gptqmodel, vLLM). MiniCPM-MoE: compressed-tensors only."),
    group_size: int = typer.Option(128, "--group-size", help="Weights per scale along the input: 32, 64 or 128."),
    sym: Optional[bool] = typer.Option(None, "--sym/--asym", help="Symmetric (zero 8) or asymmetric (a zero per "
                                       "group). Default: --sym, but --asym for awq (asymmetric only)."),
    search: bool = typer.Option(True, "--search/--no-search", help="Search each group's scale (and zero) for the "
                                "least weighted error; --no-search takes min/max scales (plain rounding without "
                                "--calibration)."),
    rescale: bool = typer.Option(True, "--rescale/--no-rescale", help="Balance o_proj/down_proj input columns "
                                 "against v_proj/up_proj rows before quantizing (function unchanged; scales saved "
                                 "as rescaling.safetensors for verify)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="A text (UTF-8) to calibrate GPTQ (or "
                                               "AWQ, --method) on: Hessians of each layer's inputs from our forward "
                                               "pass, layer by layer "
                                               "(verify holds such an export to the error-compensated INT4 bound, "
                                               "int4-g*/gptq: GPTQ moves weights by design; see README)."),
    samples: int = typer.Option(128, "--samples", help="With --calibration: sequences taken from the text."),
    seq_len: int = typer.Option(512, "--seq-len", help="With --calibration: tokens per sequence (BOS first)."),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order", help="With --calibration: GPTQ "
                                             "visits columns by decreasing activation energy, with static groups "
                                             "(g_idx stays trivial); on by default, as llm-compressor's "
                                             "actorder=static."),
    method: Optional[Int4Method] = typer.Option(None, "--method", help="With --calibration: gptq (the default); "
                                                "awq: AWQ's activation-aware scales folded into the norms, then "
                                                "rounding with the scale search; awq-gptq: AWQ's scales, then GPTQ."),
    force: bool = typer.Option(False, "--force", help=FORCE_FOLDER_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Write a 4-bit group-quantized Llama-format checkpoint: data-free, or GPTQ (or AWQ) with --calibration.

    The seven projections of every block (MiniCPM-MoE: attention and every expert's w1/w3/w2, its router float16) are quantized; embeddings, norms and lm_head stay
    float16. Prints the relative weight error per layer type and writes quantization_report.json;
    its README.md is a model card for the Hugging Face Hub.
    """
    from . import api
    from .formats.hf.int4_writer import REPORT_FILE

    done = api.to_int4(src, out, format=fmt.value, group_size=group_size, sym=sym, search=search, rescale=rescale,
                       calibration=calibration, samples=samples, seq_len=seq_len, act_order=act_order,
                       method=method.value if method is not None else None, force=force,
                       quiet=quiet, notes=note)
    if not quiet:
        table = Table(title=f"relative weight error ||W-Ŵ||/||W|| (mean over layers; {REPORT_FILE})")
        for col in ("layer", "round-to-nearest", "this export", "change"):
            table.add_column(col, justify="left" if col == "layer" else "right")
        for kind, err in done.report.by_layer_type().items():
            found = err["search"]
            table.add_row(kind, f"{err['rtn']:.4f}", "-" if found is None else f"{found:.4f}",
                          "-" if found is None else f"{(found - err['rtn']) / err['rtn']:+.1%}")
        out_console.print(table)
    say(f"wrote {done.path} ({done.kind})")


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
    exports: list[Path] = typer.Argument(..., help="One or more exports of SRC: Llama-format or INT4 folders, "
                                                   "GGUF files (ours or llama.cpp's)."),
    text: Optional[Path] = typer.Option(None, "--text", help="A UTF-8 text file to score (default: a bundled English "
                                        "and Chinese text of a few hundred tokens)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Score this text instead."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Score these token ids instead, e.g. 1,2345,67."),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per chunk; the second half of each chunk is scored, as "
                            "llama-perplexity does."),
    max_kl: Optional[float] = typer.Option(None, "--max-kl", help="Also fail an export whose mean KL divergence on "
                                           "the text exceeds this (a quality gate; quantization loss alone never "
                                           "fails)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write every figure to this JSON file "
                                            "(a folder: verify.json inside it)."),
    force: bool = typer.Option(False, "--force", help="Overwrite the --json file if it exists."),
    card: bool = typer.Option(False, "--card", help="Write each export's figures into its model card (the README.md "
                              "minicpm-convert wrote into an export folder or beside a GGUF with --card)."),
):
    """Prove each export of SRC: every tensor within its storage type's error bound, the metadata
    equal to the source config, and the logits on real text compared (perplexity, KL divergence).

    Exit code 0 when every export passes, 1 when one does not, 2 on bad input.
    """
    from . import api

    result = api.verify(src, exports, text=text, prompt=prompt, tokens=parse_tokens(tokens), ctx=ctx, max_kl=max_kl,
                        json_path=json_out, force=force, card=card)
    table = Table(title=f"verify against {src} ({len(result.tokens)} tokens of text, ctx {ctx})")
    for col in ("export", "kind", "weights", "metadata", "PPL ratio", "KL mean", "KL p99", "KL max", "same top-1",
                "RMS Δp", "result"):
        # Figures and the verdict keep their full width; a long export name or kind folds instead.
        if col in ("export", "kind"):
            table.add_column(col, justify="left", overflow="fold")
        else:
            table.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    for r in result.reports:
        w, t = r.worst, r.text
        text_cells = ["-"] * 6 if t is None else [f"{t.ppl_ratio:.4f}", f"{t.kl_mean:.3g}", f"{t.kl_p99:.3g}",
                                                  f"{t.kl_max:.3g}", f"{t.top1:.1%}", f"{t.rms_dp:.3g}"]
        table.add_row(Path(r.export).name, r.kind, f"{w.worst:.3g} of bound" if w else "-",
                      "ok" if not r.metadata else f"{len(r.metadata)} wrong", *text_cells,
                      "[green]pass[/]" if r.passed else "[red]FAIL[/]")
    out_console.print(table)
    for r in result.reports:
        if r.worst is not None and r.passed:
            out_console.print(f"{Path(r.export).name}: {len(r.tensors)} tensors within their bounds; closest: "
                              f"'{r.worst.name}' ({r.worst.storage}) at {r.worst.worst:.3g} of its bound",
                              highlight=False, markup=False, soft_wrap=True)
        for reason in r.failures:
            out_console.print(f"FAIL {Path(r.export).name}: {reason}", highlight=False, markup=False, soft_wrap=True)
    for path in result.cards:
        say(f"wrote the figures into {path}")
    for export in result.uncarded:
        say(f"note: {export}: no model card minicpm-convert wrote; --card left it alone")
    if not result.passed:
        raise typer.Exit(1)


@app.command("imatrix")
@run_safely
def imatrix_cmd(
    src: str = typer.Argument(..., help=SRC_HELP),
    text: Path = typer.Option(..., "--text", "-f", help="The calibration text (UTF-8), as llama-imatrix -f."),
    out: Path = typer.Option(Path("imatrix.gguf"), "--output", "-o", help="Output file, or a folder to write "
                             "imatrix.gguf in."),
    ctx: int = typer.Option(512, "--ctx", "-c", help="Tokens per chunk (the text needs at least two chunks)."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="At most this many chunks."),
    process_output: bool = typer.Option(False, "--process-output", help="Also collect output.weight's activations."),
    output_format: str = typer.Option("gguf", "--output-format", help="gguf (llama.cpp's current format) or dat "
                                      "(the legacy one)."),
    force: bool = typer.Option(False, "--force", help=FORCE_FILE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Compute llama.cpp's importance matrix with the reference forward pass (what llama-imatrix
    computes), for `to-gguf --imatrix` or `llama-quantize --imatrix`."""
    from . import api
    done = api.imatrix(src, text, out, ctx=ctx, chunks=chunks, process_output=process_output,
                       output_format=output_format, force=force, quiet=quiet)
    say(f"wrote {done.path} ({done.tensors} matrices, {done.chunks} chunks of {done.ctx} tokens)")


@app.command("inspect")
@run_safely
def inspect_cmd(path: str = typer.Argument(..., help="A checkpoint folder, export folder, GGUF file or Hub repo id.")):
    """Show config, variant, tensors, dtypes and parameter count."""
    from . import api
    from .inspect import render
    render(api.inspect(path), out_console)


def entry() -> None:  # pragma: no cover - the console script and python -m minicpm_convert
    """The command line as a process of its own: what a library must not do is done here, where
    the process is ours. Torch's import allocates some 10^6 objects that live as long as the
    process, so the collector runs every 50 000 allocations instead of 700 (0.2 s less per
    command); and once the command has returned (outputs closed and renamed, stdout and stderr
    flushed) the process ends with os._exit, skipping the interpreter's teardown: torch's library
    finalizers and a last collection of every module, 0.5-1.5 s per command in the profile of a
    2B f16 conversion."""
    gc.set_threshold(50_000, 20, 20)
    try:
        app(prog_name="minicpm-convert")
        code = 0
    except SystemExit as exc:  # typer/click end every command this way, with its exit code
        code = exc.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    entry()
