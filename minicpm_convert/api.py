"""The Python API: every command as a function returning a result object (the CLI is a thin
layer over these).

    import minicpm_convert as mc
    mc.to_llama("openbmb/MiniCPM-2B-sft-bf16", "out/llama")
    mc.to_gguf("openbmb/MiniCPM-2B-sft-bf16", "out/", quant="q4_K_M")   # a folder: llama.cpp's file name
    mc.to_int4("openbmb/MiniCPM-2B-sft-bf16", "out/int4", format="compressed-tensors")
    result = mc.verify("openbmb/MiniCPM-2B-sft-bf16", ["out/llama", "out/model-Q4_K_M.gguf"])
    mc.inspect("out/llama")

Bad input raises `ConvertError` (one line naming the file, tensor or key). `notes` receives what
an export keeps differently from the original, before the work starts (default: ignored; the
result carries them too). Progress bars appear only with `quiet=False` on a terminal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import ConvertError

Notes = Callable[[str], None] | None
PathLike = str | os.PathLike


@dataclass
class Export:
    """A written export: where it is and what it holds."""

    path: Path
    kind: str  # "LlamaForCausalLM, bfloat16", "GGUF arch minicpm, q4_K_M", "INT4 gptq, group 128, sym"
    notes: list[str] = field(default_factory=list)


@dataclass
class GgufExport(Export):
    arch: str = ""
    file_type: str = ""
    tensor_types: dict[str, str] = field(default_factory=dict)  # GGUF tensor name -> GGML type name
    files: list[Path] = field(default_factory=list)  # every file written (a split set's, first first)


@dataclass
class Int4Export(Export):
    report: object = None  # formats.hf.int4_writer.ErrorReport: relative weight error per tensor


def _open(src: PathLike):
    from .sources.checkpoint import Checkpoint
    return Checkpoint.open(src)


def _checked(ckpt, command: str, out, notes: Notes) -> list[str]:
    from .families import check
    found = check(ckpt.spec, command, ckpt.folder)
    for note in found:
        if notes is not None:
            notes(f"{out}: {note}")
    return found


def _folder_target(out: PathLike, force: bool, ckpt, inputs: list[Path] = ()):
    """The export folder, refused where it would replace the source or another input of the command."""
    from .output import Protected, folder_output
    return folder_output(out, force, Protected.of([ckpt.folder], inputs))


def _write_card(tmp: Path, target, make_card, notes: Notes, found: list[str]) -> None:
    """The export's model card (README.md), unless the user put a README.md of their own in the
    earlier export this one replaces: that one is kept (output.py), and the card is not written."""
    from .card import CARD
    if target.keeps(CARD):
        note = f"{target.path / CARD}: kept yours (minicpm-convert did not write it); no model card written"
        found.append(note)
        if notes is not None:
            notes(note)
        return
    (tmp / CARD).write_text(make_card().render(), encoding="utf-8")


def _parameters(ckpt) -> int:
    from math import prod
    return sum(prod(ckpt.shape(n)) for n in ckpt.names())


def source_name(src: PathLike) -> str:
    """The source as recorded in an export: a Hub id as given, a folder by its name (no absolute
    path, so the same conversion gives the same bytes anywhere)."""
    path = Path(src)
    return path.resolve().name if path.exists() else str(src)


def parse_size(text: str | int, option: str = "--shard-size") -> int:
    """'2GB', '500MB', '1.5G' or a byte count."""
    import re
    if isinstance(text, int):
        if text < 1:
            raise ConvertError(f"{option}: must be positive, got {text}")
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise ConvertError(f"{option}: cannot read {text!r} (examples: 2GB, 500MB)")
    value = float(m.group(1)) * 1000 ** "_KMGT".index(m.group(2).upper() or "_")
    if value < 1:
        raise ConvertError(f"{option}: must be positive, got {text!r}")
    return int(value)


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def to_llama(src: PathLike, out: PathLike, *, dtype: str = "auto", shard_size: str | int = "2GB",
             force: bool = False, quiet: bool = True, notes: Notes = None) -> Export:
    """Fold the muP scale factors into the weights and write a Llama-format checkpoint folder."""
    from .families import family_of
    from .card import llama_card
    from .formats.hf.llama import write_llama
    from .output import atomic_folder, write_manifest
    from .sources.checkpoint import hub_repo_id
    from .stream import llama_stream

    if dtype != "auto" and dtype not in DTYPES:
        raise ConvertError(f"--dtype: unknown dtype {dtype!r} (auto, {', '.join(DTYPES)})")
    shard_bytes = parse_size(shard_size)
    ckpt = _open(src)
    target = _folder_target(out, force, ckpt)
    found = _checked(ckpt, "to-llama", target.path, notes)
    torch_dtype = ckpt.storage_dtype if dtype == "auto" else DTYPES[dtype]
    if torch_dtype not in DTYPES.values():
        raise ConvertError(f"{ckpt.folder}: stored as {torch_dtype}; pass --dtype bfloat16|float16|float32")
    arch = family_of(ckpt.spec).llama_architecture(ckpt.spec)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    with atomic_folder(target) as tmp:
        write_llama(ckpt, llama_stream(ckpt), tmp, torch_dtype, shard_bytes, quiet=quiet)
        _write_card(tmp, target, lambda: llama_card(ckpt, source_name(src), hub_repo_id(src, ckpt.folder), arch,
                                                     dtype_name, _parameters(ckpt), found), notes, found)
        write_manifest(tmp, command="to-llama", source=source_name(src))
    return Export(target.path, f"{arch}, {dtype_name}", found)


@dataclass
class ImatrixResult:
    path: Path
    tensors: int  # weight matrices covered
    chunks: int
    ctx: int


def imatrix(src: PathLike, text: PathLike, out: PathLike = "imatrix.gguf", *, ctx: int = 512,
            chunks: int | None = None, process_output: bool = False, output_format: str = "gguf",
            force: bool = False, quiet: bool = True) -> ImatrixResult:
    """llama.cpp's importance matrix of SRC on the text in TEXT (what llama-imatrix computes),
    written in llama.cpp's GGUF imatrix format (or its legacy .dat) for `to_gguf(imatrix=...)` or
    `llama-quantize --imatrix`."""
    from .formats.gguf import imatrix as imatrix_file
    from .importance import compute_from_text
    from .output import Protected, atomic_file, file_output

    if output_format not in ("gguf", "dat"):
        raise ConvertError(f"--output-format: {output_format!r} is not gguf or dat")
    ckpt = _open(src)
    from .families import check
    check(ckpt.spec, "verify", ckpt.folder)  # the forward pass must exist for this family
    name = "imatrix.gguf" if output_format == "gguf" else "imatrix.dat"
    final = file_output(out, lambda: name, force, Protected.of([ckpt.folder], [Path(text)]))
    matrix = compute_from_text(ckpt, Path(text), ctx=ctx, chunks=chunks, process_output=process_output,
                               quiet=quiet)
    write = imatrix_file.write if output_format == "gguf" else imatrix_file.write_legacy
    with atomic_file(final) as tmp:
        write(tmp, matrix)
    return ImatrixResult(final, len(matrix.entries), matrix.chunk_count, ctx)


def _gguf_options(quant: str, imatrix, output_tensor_type, token_embedding_type, tensor_types, pure,
                  leave_output_tensor, read: bool = True):
    """llama-quantize's options, and the importance matrix file read (when `read`) or None."""
    from .formats.gguf import imatrix as imatrix_file
    from .formats.gguf.plan import parse_options

    options = parse_options(quant, imatrix=imatrix is not None, output_tensor_type=output_tensor_type,
                            token_embedding_type=token_embedding_type, tensor_types=list(tensor_types), pure=pure,
                            leave_output_tensor=leave_output_tensor)
    return options, (imatrix_file.read(Path(imatrix)) if imatrix is not None and read else None)


def _split(split_max_size: str | int | None, split_max_tensors: int):
    from .formats.gguf.split import Split
    if split_max_tensors < 0:
        raise ConvertError(f"--split-max-tensors: must be positive, got {split_max_tensors}")
    size = parse_size(split_max_size, "--split-max-size") if split_max_size is not None else 0
    return Split(split_max_tensors, size)


def gguf_plan(src: PathLike, *, quant: str = "q4_K_M", arch: str | None = None, imatrix: PathLike | None = None,
              output_tensor_type: str | None = None, token_embedding_type: str | None = None,
              tensor_types: Sequence[str] = (), pure: bool = False, leave_output_tensor: bool = False,
              model_name: str | None = None, metadata: PathLike | None = None,
              split_max_size: str | int | None = None, split_max_tensors: int = 0) -> dict:
    """What `to_gguf` would write (llama-quantize's --dry-run): the type of every tensor, which
    fell back and why, bits per weight and the exact file size (each file's, when split).
    Nothing is written."""
    from .formats.gguf.writer import dry_run, file_arch, source_metadata

    options, importance = _gguf_options(quant, imatrix, output_tensor_type, token_embedding_type, tensor_types,
                                        pure, leave_output_tensor)
    split = _split(split_max_size, split_max_tensors)
    ckpt = _open(src)
    from .families import check
    check(ckpt.spec, "to-gguf --arch llama" if arch == "llama" else "to-gguf", ckpt.folder)
    general = source_metadata(ckpt, file_arch(ckpt, arch), str(src), model_name=model_name,
                              override_path=Path(metadata) if metadata is not None else None)
    return dry_run(ckpt, arch, str(src), options, importance, general=general, split=split)


def _gguf_target(ckpt, out: PathLike, general, options, arch: str, split, card: bool, force: bool, protected):
    """(OUT's GGUF path, the files to-gguf writes): the GGUF or its split set (llama.cpp's names),
    and the card beside it, checked against what they would replace (output.py): a split file or
    a card only when minicpm-convert wrote it; an earlier split set of ours goes with them."""
    from .card import CARD, written_by_us as our_card
    from .formats.gguf.metadata import default_file_name
    from .formats.gguf.split import other_sets, split_names, written_by_us
    from .formats.gguf.writer import file_count
    from .output import file_set, output_path

    base = output_path(out, lambda: default_file_name(general, options.file_type))
    count = file_count(ckpt, arch, options, split) if split else 1
    files = [(p, written_by_us if count > 1 else None) for p in split_names(base, count)]
    if card:
        files.append((base.parent / CARD, our_card))
    stale = [p for p in other_sets(base, count) if written_by_us(p)] if count > 1 else []
    return base, file_set(files, force, protected, stale=stale, name=base)


def to_gguf(src: PathLike, out: PathLike, *, quant: str = "q4_K_M", arch: str | None = None, force: bool = False,
            quiet: bool = True, notes: Notes = None, imatrix: PathLike | None = None,
            calibration: PathLike | None = None, ctx: int = 512, chunks: int | None = None,
            output_tensor_type: str | None = None, token_embedding_type: str | None = None,
            tensor_types: Sequence[str] = (), pure: bool = False, leave_output_tensor: bool = False,
            model_name: str | None = None, metadata: PathLike | None = None,
            split_max_size: str | int | None = None, split_max_tensors: int = 0, card: bool = False) -> GgufExport:
    """Write a GGUF file (OUT, or a file named as llama.cpp's converter would inside the folder OUT).

    `arch`: 'minicpm' (scales as metadata), 'llama' (folded) or None for the family's own.
    `quant`: any llama-quantize file type; `imatrix`: an importance matrix file (llama-imatrix's GGUF
    or legacy .dat); `calibration`: a text to compute one from first, in one step (`ctx`, `chunks`
    as `imatrix`); the per-tensor options are llama-quantize's.
    `model_name`, `metadata` (a JSON file of general.* keys), `split_max_size` ('2G'),
    `split_max_tensors`: as llama.cpp's converter's --model-name, --metadata, --split-max-size and
    --split-max-tensors. A split set's path is its first file. `card`: also write a model card
    (README.md) for the file beside it."""
    from .formats.gguf.writer import file_arch, source_metadata, write_gguf
    from .output import Protected, atomic_files

    if arch not in (None, "minicpm", "llama"):
        raise ConvertError(f"--arch: unknown architecture {arch!r} (minicpm, llama)")
    if imatrix is not None and calibration is not None:
        raise ConvertError("give --imatrix or --calibration, not both")
    options, importance = _gguf_options(quant, imatrix or calibration, output_tensor_type, token_embedding_type,
                                        tensor_types, pure, leave_output_tensor, read=imatrix is not None)
    split = _split(split_max_size, split_max_tensors)
    ft = options.file_type
    ckpt = _open(src)
    written_arch = file_arch(ckpt, arch)
    override = Path(metadata) if metadata is not None else None
    general = source_metadata(ckpt, written_arch, str(src), model_name=model_name, override_path=override)
    inputs = [Path(p) for p in (imatrix, calibration, metadata) if p is not None]
    base, target = _gguf_target(ckpt, out, general, options, written_arch, split, card, force,
                                Protected.of([ckpt.folder], inputs))
    final = target.files[0]
    found = _checked(ckpt, "to-gguf --arch llama" if arch == "llama" else "to-gguf", final, notes)
    if calibration is not None:  # one step: the importance matrix stays in memory
        from .importance import compute_from_text
        importance = compute_from_text(ckpt, Path(calibration), ctx=ctx, chunks=chunks, quiet=quiet)
        importance.path = Path(calibration).name
    with atomic_files(target) as tmp:
        plan = write_gguf(ckpt, tmp / base.name, ft, arch, str(src), quiet=quiet, options=options,
                          imatrix=importance, general=general, split=split)
        if card:
            from .card import CARD, gguf_card
            from .sources.checkpoint import hub_repo_id
            written = [tmp / p.name for p in target.files if p.name != CARD]
            imatrix_name = Path(str(importance.path)).name if importance is not None else None
            (tmp / CARD).write_text(gguf_card(ckpt, source_name(src), hub_repo_id(src, ckpt.folder), written_arch,
                                              ft.name, written, _parameters(ckpt), imatrix_name,
                                              general.meta.quantized_by, found).render(), encoding="utf-8")
    count = len(target.files) - (1 if card else 0)
    kind = f"GGUF arch {written_arch}, {ft.name}" + (f", {count} files" if count > 1 else "")
    return GgufExport(final, kind, found, arch=written_arch, file_type=ft.name,
                      tensor_types={name: t.name for name, t in plan.items()}, files=list(target.files))


def to_int4(src: PathLike, out: PathLike, *, format: str = "gptq", group_size: int = 128, sym: bool | None = None,
            search: bool = True, rescale: bool = True, calibration: PathLike | None = None, samples: int = 128,
            seq_len: int = 512, act_order: bool | None = None, method: str | None = None, force: bool = False,
            quiet: bool = True, notes: Notes = None) -> Int4Export:
    """Write a 4-bit group-quantized Llama-format checkpoint folder (GPTQ v1, compressed-tensors or
    AutoAWQ GEMM). `sym`: None takes the format's default (symmetric for gptq and
    compressed-tensors; asymmetric for awq, which has no symmetric layout).

    Data-free by default (column rescaling + scale search); `calibration`: a text whose first
    `samples` x `seq_len` tokens calibrate GPTQ (`act_order`: columns by decreasing activation
    energy, static groups; None: on with calibration). `method` (with `calibration`): "gptq" (None),
    "awq" (AWQ's activation-aware scales, then rounding) or "awq-gptq" (AWQ's scales, then GPTQ)."""
    from .calibrated import METHODS, Calibration, calibration_samples
    from .formats.hf.int4 import FORMATS, GROUP_SIZES, Int4Scheme
    from .formats.hf.int4_writer import write_int4
    from .card import int4_card
    from .output import atomic_folder, write_manifest
    from .sources.checkpoint import hub_repo_id
    from .stream import llama_stream

    if format not in FORMATS:
        raise ConvertError(f"--format: unknown INT4 format {format!r} ({', '.join(FORMATS)})")
    if group_size not in GROUP_SIZES:
        raise ConvertError(f"--group-size: {group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")
    if sym is None:
        sym = format != "awq"
    elif sym and format == "awq":
        raise ConvertError("--sym: the AWQ format is asymmetric only (AutoAWQ packs GEMM weights with a zero "
                           "point; its zero_point=false variant loaders decode differently: vLLM assumes zero 8, "
                           "gptqmodel reads the stored zeros); use --asym (the default for awq), or --format gptq "
                           "or compressed-tensors for symmetric")
    if calibration is None and act_order:
        raise ConvertError("--act-order: needs --calibration (it orders columns by their activations)")
    if method is not None and method not in METHODS:
        raise ConvertError(f"--method: unknown calibration method {method!r} ({', '.join(METHODS)})")
    if calibration is None and method is not None:
        raise ConvertError(f"--method {method}: needs --calibration (it is computed from the text's activations)")
    method = method or "gptq"
    if method == "awq" and act_order:
        raise ConvertError("--act-order: is GPTQ's column order; --method awq runs no GPTQ (use awq-gptq)")
    act_order = calibration is not None and method != "awq" and act_order is not False
    ckpt = _open(src)
    from .families import family_of
    why = family_of(ckpt.spec).int4_refusal(ckpt.spec, format, method if calibration is not None else None)
    if why is not None:
        raise ConvertError(f"{ckpt.folder}: {why}")
    inputs = [Path(calibration)] if calibration is not None else []
    target = _folder_target(out, force, ckpt, inputs)
    found = _checked(ckpt, "to-int4", target.path, notes)
    scheme = Int4Scheme(format, group_size, sym)
    calib = None
    if calibration is not None:
        from .verify import text_tokens
        path = Path(calibration)
        if seq_len > ckpt.spec.max_position_embeddings:
            raise ConvertError(f"--seq-len {seq_len} exceeds max_position_embeddings "
                               f"({ckpt.spec.max_position_embeddings})")
        tokens = text_tokens(ckpt, read_text(path))
        calib = Calibration(calibration_samples(tokens, samples, seq_len, ckpt.spec.bos_token_id, str(path)),
                            path.name, act_order, method)
    with atomic_folder(target) as tmp:
        report = write_int4(ckpt, llama_stream(ckpt), tmp, scheme, search=search, rescale=rescale,
                            calibration=calib, quiet=quiet)
        _write_card(tmp, target, lambda: int4_card(ckpt, source_name(src), hub_repo_id(src, ckpt.folder), scheme,
                                                    search, report, _parameters(ckpt), found, rescale=rescale,
                                                    calibration=calib), notes, found)
        write_manifest(tmp, command="to-int4", source=source_name(src))
    how = {"gptq": "GPTQ", "awq": "AWQ", "awq-gptq": "AWQ + GPTQ"}[method] if calib is not None else "data-free"
    return Int4Export(target.path, f"INT4 {format}, group {group_size}, {'sym' if sym else 'asym'}, {how}", found,
                      report=report)


@dataclass
class VerifyResult:
    source: str
    tokens: list[int]
    reports: list  # verify.Report, one per export
    json_path: Path | None = None
    cards: list[Path] = field(default_factory=list)  # model cards given the figures (--card)
    uncarded: list[str] = field(default_factory=list)  # exports with no card of ours (--card)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.reports)

    def as_dict(self) -> dict:
        return {"source": self.source, "tokens": self.tokens, "exports": [r.as_dict() for r in self.reports],
                "passed": self.passed}


def verify(src: PathLike, exports: Sequence[PathLike], *, text: PathLike | None = None, prompt: str | None = None,
           tokens: Sequence[int] | None = None, ctx: int = 512, max_kl: float | None = None,
           json_path: PathLike | None = None, force: bool = False, card: bool = False) -> VerifyResult:
    """Prove each export of SRC (see `verify.py`): weights within their storage type's bounds,
    metadata equal to the source's, logits on real text compared. `text` is a file; `prompt` a
    text; `tokens` ids; none of them: the bundled text. `card`: write each export's figures into
    its model card (one minicpm-convert wrote; others are listed in `uncarded`)."""
    from .families import check
    from .output import Protected, file_output, write_json_file
    from .verify import text_tokens, verify as run_verify

    if sum(x is not None for x in (text, prompt, tokens)) > 1:
        raise ConvertError("give one of --text, --prompt or --tokens")
    if ctx < 2:
        raise ConvertError(f"--ctx: must be at least 2, got {ctx}")
    if max_kl is not None and not max_kl >= 0:
        raise ConvertError(f"--max-kl: must be a non-negative number, got {max_kl}")
    ckpt = _open(src)
    check(ckpt.spec, "verify", ckpt.folder)
    export_paths = [Path(e) for e in exports]
    inputs = export_paths + ([Path(text)] if text is not None else [])
    json_final = None
    if json_path is not None:
        json_final = file_output(json_path, lambda: "verify.json", force, Protected.of([ckpt.folder], inputs))
    if text is not None:
        prompt = read_text(Path(text))
    ids = text_tokens(ckpt, prompt, list(tokens) if tokens is not None else None)
    if len(ids) < 2:
        raise ConvertError("the text gives fewer than 2 tokens; nothing to score")
    if min(ctx, len(ids)) > ckpt.spec.max_position_embeddings:
        raise ConvertError(f"--ctx {ctx} exceeds max_position_embeddings ({ckpt.spec.max_position_embeddings})")
    result = VerifyResult(str(src), ids, run_verify(ckpt, export_paths, ids, ctx=ctx, max_kl=max_kl), json_final)
    if json_final is not None:
        write_json_file(json_final, result.as_dict())
    if card:
        from .card import card_of, update_verification, verification_text
        from .sources.checkpoint import hub_repo_id
        label = (f"`{Path(text).name}`" if text is not None else "given token ids" if tokens is not None
                 else "a prompt" if prompt is not None else "the bundled English and Chinese text")
        name = hub_repo_id(src, ckpt.folder) or source_name(src)
        for report in result.reports:
            path = card_of(Path(report.export))
            if path is None:
                result.uncarded.append(report.export)
            else:
                update_verification(path, verification_text(report, name, label))
                result.cards.append(path)
    return result


def read_text(path: Path) -> str:
    """A calibration or evaluation text: UTF-8, not empty (one clear line otherwise)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConvertError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if b"\x00" in data:
        raise ConvertError(f"{path}: not a text file (it holds NUL bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConvertError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise ConvertError(f"{path}: is empty")
    return text


def inspect(path: PathLike):
    """What a checkpoint, export folder, GGUF file or Hub repo holds (an `inspect.Inspection`)."""
    from .inspect import inspect as run_inspect
    return run_inspect(str(path))
