"""`make bench` keeps working: the whole benchmark on a tiny shape, end to end (no timing checks)."""

from __future__ import annotations

import importlib.util
import re
import sys

from tests.conftest import ROOT


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_tiny_produces_every_row(tmp_path, capsys):
    bench = load_bench()
    results = tmp_path / "results.md"
    code = bench.main(["--shape", "tiny", "--cache", str(tmp_path / "cache"), "--results", str(results)])
    text = results.read_text()
    assert code == 0, text
    assert text in capsys.readouterr().out
    assert "cores" in text and "RAM" in text and "page cache" in text and "load average" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| command")]
    names = [line[2:].split(":", 1)[0] for line in rows]
    assert names == bench.ORDER
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if "skipped" in cells[-1]:
            continue
        assert re.fullmatch(r"\d+\.\d", cells[1]), line  # time
        assert re.fullmatch(r"\d+", cells[2]), line  # peak RSS
        assert re.fullmatch(r"\d+\.\d", cells[3]), line  # CPU
    q4 = next(line for line in rows if line.startswith("| to-gguf-q4_K_M"))
    assert re.search(r"\| \d+\.\d\dx \|", q4)  # a ratio to llama-quantize


def test_bench_only_and_cached_checkpoint(tmp_path):
    bench = load_bench()
    results = tmp_path / "r.md"
    args = ["--shape", "tiny", "--cache", str(tmp_path / "cache"), "--results", str(results), "--only", "copy"]
    assert bench.main(args) == 0
    stamp = tmp_path / "cache" / "tiny" / "ckpt" / ".bench_stamp"
    before = stamp.stat().st_mtime_ns
    assert bench.main(args) == 0
    assert stamp.stat().st_mtime_ns == before  # built once, then reused
    rows = [line for line in results.read_text().splitlines() if line.startswith("| copy")]
    assert len(rows) == 1
