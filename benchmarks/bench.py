#!/usr/bin/env python3
"""Speed and memory of every command at MiniCPM-2B scale, side by side with llama.cpp.

    python benchmarks/bench.py [--small | --shape tiny|small|2b] [--only NAME ...] [--results FILE]

Builds once (cached under ``benchmarks/cache/<shape>/ckpt``) a synthetic checkpoint with the
shape's exact tensor shapes (2b: MiniCPM-2B's -- hidden 2304, 40 layers, 36 heads, intermediate
5760, vocab 122753, tied, bf16, three shards), then runs each command as its own process and
records its wall time, CPU time (user + system) and peak RSS (GNU time's, of that very child):

  copy           the checkpoint's files copied into an output folder by cp (the I/O floor)
  to-gguf-f16    to-gguf --quant f16                      (reference: copy)
  to-gguf-q4_K_M to-gguf --quant q4_K_M                   (reference: llama-quantize, same threads)
  to-gguf-q8_0   to-gguf --quant q8_0                     (reference: llama-quantize)
  to-llama       to-llama                                 (reference: copy)
  to-int4        to-int4, data-free                       (reference: to-gguf q4_K_M)
  llama-quantize llama.cpp's llama_model_quantize of our f16 GGUF to Q4_K_M, all cores
  verify         verify of the q4_K_M file: every tensor's weight check and 512 tokens of text
                 (reference: copy, as it reads the checkpoint and the export whole)
  imatrix        imatrix on the calibration text (IMATRIX_CHUNKS chunks of 512)  (reference: llama-imatrix)
  llama-imatrix  llama.cpp's llama-imatrix on our f16 GGUF, the same text, chunks and threads
  to-gguf-q4_K_M-calibration  to-gguf --quant q4_K_M --calibration (one step)  (reference: llama.cpp's 3 steps)
  llama.cpp-3-steps  convert_hf_to_gguf.py f16 + llama-imatrix + llama-quantize --imatrix Q4_K_M

Every run, the copy included, finds the checkpoint in the page cache: caches are dropped first
when allowed, then the checkpoint is read once (untimed) before the copy, so the reference is
the same warm-cache floor the commands get. The machine's load average is recorded before and
after (on a shared machine compare ratios within one run; the CPU column is less noisy).
Writes a markdown table to ``benchmarks/results.md`` (or ``--results``) and prints it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    # name: (hidden, layers, heads, kv heads, intermediate, vocab, shards)
    "2b": (2304, 40, 36, 36, 5760, 122753, 3),
    "small": (1024, 8, 16, 16, 2560, 32000, 3),
    "tiny": (256, 2, 4, 4, 512, 1536, 3),  # vocab >= the test tokenizer's 1499 pieces
}
SEED = 2024
VERIFY_CTX = 512  # verify scores one chunk of the bundled text (512 tokens with this vocabulary)
IMATRIX_CHUNKS = 8
CALIBRATION = ROOT / "tests" / "data" / "calibration.md"

# name -> (description, reference name or None, target text)
RUNS = {
    "copy": ("plain copy of the checkpoint files (I/O floor)", None, ""),
    "to-gguf-f16": ("to-gguf --quant f16", "copy", "<= 1.5x copy"),
    "to-gguf-q4_K_M": ("to-gguf --quant q4_K_M", "llama-quantize", "<= 0.2x llama-quantize"),
    "to-gguf-q8_0": ("to-gguf --quant q8_0", "llama-quantize", ""),
    "to-llama": ("to-llama (bf16)", "copy", "<= 1.5x copy"),
    "to-int4": ("to-int4 (data-free: rescaling + scale search)", "to-gguf-q4_K_M", "<= 1.5x to-gguf q4_K_M"),
    "llama-quantize": ("llama.cpp llama_model_quantize f16 GGUF -> Q4_K_M, all cores", None, ""),
    "verify": (f"verify q4_K_M GGUF: weight check of every tensor, {VERIFY_CTX} tokens of text", "copy",
               "< 120 s, < 2 GB"),
    "imatrix": (f"imatrix, {IMATRIX_CHUNKS} chunks of 512 tokens", "llama-imatrix", "<= 1x llama-imatrix"),
    "llama-imatrix": ("llama.cpp llama-imatrix on our f16 GGUF, same tokens, 2 threads", None, ""),
    "to-gguf-q4_K_M-calibration": ("to-gguf q4_K_M --calibration (imatrix + quantize in one step)",
                                   "llama.cpp-3-steps", ""),
    "llama.cpp-3-steps": ("llama.cpp: convert_hf_to_gguf f16 + llama-imatrix + llama-quantize --imatrix", None, ""),
}
ORDER = list(RUNS)


@dataclass
class Result:
    name: str
    seconds: float | None
    peak_rss: int | None  # bytes
    returncode: int | None
    cpu: float | None = None  # user + system seconds
    note: str = ""


# ----------------------------------------------------------------------------- the checkpoint

def checkpoint_config(shape: str) -> dict:
    from fixtures.make_fixtures import MINICPM_2B_CONFIG, make_config

    if shape == "2b":
        return dict(MINICPM_2B_CONFIG)
    hidden, layers, heads, kv, inter, vocab, _ = SHAPES[shape]
    return make_config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab)


def ensure_checkpoint(cache: Path, shape: str) -> Path:
    """The cached synthetic checkpoint, built (into a temporary, then renamed) if missing."""
    import torch
    from fixtures.make_fixtures import copy_tokenizer_files, write_checkpoint

    dest = cache / shape / "ckpt"
    stamp = dest / ".bench_stamp"
    want = f"shape={SHAPES[shape]} seed={SEED}"
    if stamp.is_file() and stamp.read_text() == want:
        return dest
    tmp = cache / shape / f".ckpt.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    print(f"building the {shape} checkpoint in {dest} (once) ...", flush=True)
    write_checkpoint(tmp, checkpoint_config(shape), torch.bfloat16, shards=SHAPES[shape][6], seed=SEED)
    copy_tokenizer_files(tmp)
    (tmp / ".bench_stamp").write_text(want)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    print(f"  built in {time.perf_counter() - t0:.0f} s", flush=True)
    return dest


# ----------------------------------------------------------------------------- measuring

TIME = Path("/usr/bin/time")


def measure(name: str, argv: list[str], log: Path) -> Result:
    """Run argv as a child; wall time and its peak RSS.

    The RSS comes from GNU time's %M (ru_maxrss of the command it execs): our own child's
    ru_maxrss would count this (torch-importing) process's pages, which a forked child holds
    until its exec. Without /usr/bin/time, os.wait4's ru_maxrss is used (an upper bound)."""
    rss_file = log.with_suffix(".rss")
    rss_file.unlink(missing_ok=True)
    wrapped = [str(TIME), "-q", "-f", "%M %U %S", "-o", str(rss_file), *argv] if TIME.exists() else argv
    os.sync()  # every command starts with no dirty pages of an earlier one being written back
    evict(log.parent.parent)  # nor with their outputs in memory (the checkpoint stays cached)
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    kib = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss // 1024
    cpu = usage.ru_utime + usage.ru_stime
    if rss_file.is_file():
        lines = [ln.split() for ln in rss_file.read_text().splitlines()]
        lines = [ln for ln in lines if len(ln) == 3 and ln[0].isdigit()]
        if lines:
            kib, cpu = int(lines[-1][0]), float(lines[-1][1]) + float(lines[-1][2])
    return Result(name, seconds, kib * 1024, code, cpu=cpu)


def evict(folder: Path) -> None:
    """Drop the (written back) page cache of the files under folder: the outputs of earlier runs
    must not leave the next one short of memory (a 2B run writes 1-6 GB)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_through(files: list[Path]) -> None:
    """Read files once (into the page cache), untimed."""
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 24):
                pass


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def has_command(cmd: str) -> bool:
    r = subprocess.run([sys.executable, "-m", "minicpm_convert", cmd, "--help"], cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return r.returncode == 0


QUANTIZE_SNIPPET = """
import ctypes, os, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
params.nthread = os.cpu_count()
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
sys.exit(0 if rc == 0 else 1)
"""


def llama_tools() -> Path | None:
    """llama-imatrix and llama-quantize, built by scripts/build_llama_cpp_tools.sh (cached)."""
    r = subprocess.run(["bash", str(ROOT / "scripts" / "build_llama_cpp_tools.sh")], cwd=ROOT, capture_output=True,
                       text=True)
    return Path(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else None


def timed_steps(name: str, steps: list[list[str]], log: Path) -> Result:
    """Several commands in a row: the sum of their times, the largest peak RSS."""
    total, peak, cpu = 0.0, 0, 0.0
    for k, argv in enumerate(steps):
        r = measure(name, argv, log.with_name(f"{log.stem}-{k}.log"))
        if r.returncode != 0:
            return Result(name, None, None, r.returncode, f"step {k + 1} failed, see {log.stem}-{k}.log")
        total += r.seconds
        peak = max(peak, r.peak_rss or 0)
        cpu += r.cpu or 0.0
    return Result(name, total, peak, 0, cpu=cpu)


def run_all(ckpt: Path, work: Path, names: list[str]) -> list[Result]:
    from gguf import LlamaFileType

    cli = [sys.executable, "-m", "minicpm_convert"]
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    f16, q4 = work / "f16.gguf", work / "q4_K_M.gguf"

    def ensure(path: Path, quant: str) -> bool:  # an input another run needs, made untimed
        if not path.is_file():
            subprocess.run([*cli, "to-gguf", str(ckpt), str(path), "--quant", quant, "--quiet", "--force"],
                           cwd=ROOT, stdout=subprocess.DEVNULL)
        return path.is_file()

    for name in names:
        log = logs / f"{name}.log"
        print(f"running {name} ...", flush=True)
        if name == "copy":
            dst = work / "copy"
            shutil.rmtree(dst, ignore_errors=True)
            dst.mkdir()
            files = sorted(p for p in ckpt.iterdir() if p.is_file())
            read_through(files)  # the same warm cache the commands after it find
            r = measure(name, ["cp", *map(str, files), str(dst)], log)
            shutil.rmtree(dst, ignore_errors=True)
        elif name.startswith("to-gguf-") and not name.endswith("-calibration"):
            quant = name.removeprefix("to-gguf-")
            out = work / f"{quant}.gguf"
            r = measure(name, [*cli, "to-gguf", str(ckpt), str(out), "--quant", quant, "--quiet", "--force"], log)
        elif name == "to-llama":
            out = work / "llama"
            r = measure(name, [*cli, "to-llama", str(ckpt), str(out), "--quiet", "--force"], log)
            shutil.rmtree(out, ignore_errors=True)
        elif name == "to-int4":
            if not has_command("to-int4"):
                r = Result(name, None, None, None, "skipped: no to-int4 command yet")
            else:
                out = work / "int4"
                r = measure(name, [*cli, "to-int4", str(ckpt), str(out), "--quiet", "--force"], log)
                shutil.rmtree(out, ignore_errors=True)
        elif name == "llama-quantize":
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                results.append(Result(name, None, None, None, "skipped: llama-cpp-python not installed"))
                continue
            if not ensure(f16, "f16"):
                results.append(Result(name, None, None, 1, "failed: could not make the f16 GGUF input"))
                continue
            out = work / "llama-quantize-q4_K_M.gguf"
            r = measure(name, [sys.executable, "-c", QUANTIZE_SNIPPET, str(f16), str(out),
                               str(int(LlamaFileType.MOSTLY_Q4_K_M))], log)
            out.unlink(missing_ok=True)
        elif name == "verify":
            if not ensure(q4, "q4_K_M"):
                results.append(Result(name, None, None, 1, "failed: could not make the q4_K_M GGUF input"))
                continue
            r = measure(name, [*cli, "verify", str(ckpt), str(q4), "--ctx", str(VERIFY_CTX)], log)
            if r.returncode == 1:
                r.note = "ran; the export failed verify"
        elif name == "imatrix":
            r = measure(name, [*cli, "imatrix", str(ckpt), "--text", str(CALIBRATION), "--ctx", "512", "--chunks",
                               str(IMATRIX_CHUNKS), "-o", str(work / "imatrix.gguf"), "--force", "--quiet"], log)
        elif name == "llama-imatrix":
            tools = llama_tools()
            if tools is None or not ensure(f16, "f16"):
                results.append(Result(name, None, None, None, "skipped: llama-imatrix not built"))
                continue
            r = measure(name, [str(tools / "llama-imatrix"), "-m", str(f16), "-f", str(CALIBRATION), "-c", "512",
                               "--chunks", str(IMATRIX_CHUNKS), "-t", "2", "--no-ppl", "-o",
                               str(work / "llama-imatrix.gguf")], log)
        elif name == "to-gguf-q4_K_M-calibration":
            out = work / "q4_K_M-calibration.gguf"
            r = measure(name, [*cli, "to-gguf", str(ckpt), str(out), "--quant", "q4_K_M", "--calibration",
                               str(CALIBRATION), "--ctx", "512", "--chunks", str(IMATRIX_CHUNKS), "--quiet",
                               "--force"], log)
        elif name == "llama.cpp-3-steps":
            tools = llama_tools()
            if tools is None:
                results.append(Result(name, None, None, None, "skipped: llama.cpp tools not built"))
                continue
            from tests.llama_cpp_source import vendor_dir
            tree = vendor_dir()
            conv, imx, out = work / "llama.cpp-f16.gguf", work / "llama.cpp-imatrix.gguf", work / "llama.cpp-q4.gguf"
            env_py = ["env", f"PYTHONPATH={tree / 'gguf-py'}", sys.executable]
            r = timed_steps(name, [
                [*env_py, str(tree / "convert_hf_to_gguf.py"), str(ckpt), "--outfile", str(conv), "--outtype", "f16"],
                [str(tools / "llama-imatrix"), "-m", str(conv), "-f", str(CALIBRATION), "-c", "512", "--chunks",
                 str(IMATRIX_CHUNKS), "-t", "2", "--no-ppl", "-o", str(imx)],
                [str(tools / "llama-quantize"), "--imatrix", str(imx), str(conv), str(out), "Q4_K_M", "2"]], log)
        else:
            raise ValueError(name)
        if r.returncode not in (0, None) and not r.note:
            r.note = f"exit {r.returncode}, see {log}"
        results.append(r)
    return results


# ----------------------------------------------------------------------------- the table

def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {ram / 2**30:.1f} GiB RAM, {cpu}, Python {platform.python_version()}"


def threads_note() -> str:
    from minicpm_convert.stream import worker_threads
    return (f"minicpm-convert {worker_threads()} worker threads, llama-quantize {os.cpu_count()}, "
            "llama-imatrix 2")


def table(results: list[Result], shape: str, ckpt: Path, cache_note: str, load: str = "") -> str:
    by = {r.name: r for r in results}
    size = sum(p.stat().st_size for p in ckpt.iterdir() if p.is_file())
    hidden, layers, heads, kv, inter, vocab, shards = SHAPES[shape]
    lines = [
        f"# minicpm-convert benchmark ({shape})",
        "",
        f"- machine: {machine()}",
        f"- checkpoint: synthetic MiniCPM, hidden {hidden}, {layers} layers, {heads} heads ({kv} kv), "
        f"intermediate {inter}, vocab {vocab}, tied, bf16, {shards} shards, "
        f"{size / 1e9:.2f} GB",
        f"- page cache: {cache_note}",
        f"- load average (1, 5, 15 min): {load or load_average()}",
        f"- threads: {threads_note()}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        "| command | time (s) | peak RSS (MB) | CPU (s) | reference | ratio to reference | target | note |",
        "|---|---:|---:|---:|---|---:|---|---|",
    ]
    for name in ORDER:
        if name not in by:
            continue
        r = by[name]
        desc, ref, target = RUNS[name]
        t = f"{r.seconds:.1f}" if r.seconds is not None else "-"
        rss = f"{r.peak_rss / 2**20:.0f}" if r.peak_rss is not None else "-"
        cpu = f"{r.cpu:.1f}" if r.cpu is not None else "-"
        ratio = "-"
        if ref and ref in by and r.seconds is not None and by[ref].seconds:
            ratio = f"{r.seconds / by[ref].seconds:.2f}x"
        lines.append(f"| {name}: {desc} | {t} | {rss} | {cpu} | {ref or '-'} | {ratio} | {target} | {r.note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="a small shape for quick runs (--shape small)")
    ap.add_argument("--shape", choices=list(SHAPES), default=None, help="checkpoint shape (default 2b)")
    ap.add_argument("--only", nargs="+", choices=ORDER, metavar="NAME",
                    help=f"run only these ({', '.join(ORDER)})")
    ap.add_argument("--cache", type=Path, default=HERE / "cache", help="where checkpoints and outputs go")
    ap.add_argument("--results", type=Path, default=HERE / "results.md", help="markdown table written here")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF outputs")
    args = ap.parse_args(argv)
    shape = args.shape or ("small" if args.small else "2b")
    names = [n for n in ORDER if not args.only or n in args.only]

    ckpt = ensure_checkpoint(args.cache, shape)
    work = args.cache / shape / "out"
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob("*.gguf"):  # outputs of earlier code must not be reused as inputs
        stale.unlink()
    cache_note = ("dropped, then the checkpoint read once before the copy: every run finds it cached"
                  if drop_caches() else "the checkpoint read once before the copy: every run finds it cached")
    load_before = load_average()
    results = run_all(ckpt, work, names)
    load = f"{load_before} before, {load_average()} after"
    if not args.keep:
        for p in work.glob("*.gguf"):
            p.unlink()
    text = table(results, shape, ckpt, cache_note, load)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)
    print(text)
    failed = [r.name for r in results if r.returncode not in (0, None) and not r.note.startswith("ran;")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
