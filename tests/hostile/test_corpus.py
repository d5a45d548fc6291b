"""Every broken or hostile input, through the real CLI in a subprocess, for every command that
reads it: exit 2, exactly one line on stderr naming what is wrong, no traceback, nothing at
the final path and no temporary left in the output folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.hostile.corpus import CASES, MARKER, Case, Ctx

TOKENS = "1,20,300,400"


@pytest.fixture(scope="session")
def good_exports(tmp_path_factory, fixture_path):
    """Valid exports of `tiny`, built on first use."""
    root = tmp_path_factory.mktemp("good")
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            src = fixture_path("tiny")
            if kind == "gguf":
                path, args = root / "tiny.gguf", ["to-gguf", src, root / "tiny.gguf", "--quant", "q8_0", "-q"]
            elif kind == "int4":
                path, args = root / "int4", ["to-int4", src, root / "int4", "--no-search", "-q"]
            elif kind == "awq":
                path, args = root / "awq", ["to-int4", src, root / "awq", "--format", "awq", "--no-search", "-q"]
            else:
                path, args = root / "llama", ["to-llama", src, root / "llama", "-q"]
            code, out, err = run_cli(*args)
            assert code == 0, out + err
            made[kind] = path
        return made[kind]
    return get


def command_line(cmd: str, target: Path, out_dir: Path, tiny: Path, good_llama) -> tuple[list[str], Path | None]:
    """(argv, final output path or None) of one command reading `target`."""
    if cmd == "to-llama":
        return ["to-llama", str(target), str(out_dir / "llama")], out_dir / "llama"
    if cmd == "to-gguf":
        return ["to-gguf", str(target), str(out_dir / "m.gguf"), "--quant", "q4_K_M"], out_dir / "m.gguf"
    if cmd == "to-int4":
        return ["to-int4", str(target), str(out_dir / "int4"), "--no-search"], out_dir / "int4"
    if cmd == "inspect":
        return ["inspect", str(target)], None
    if cmd == "verify-src":
        return ["verify", str(target), str(good_llama()), "--tokens", TOKENS], None
    if cmd == "verify-export":
        return ["verify", str(tiny), str(target), "--tokens", TOKENS], None
    raise AssertionError(cmd)


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", "minicpm_convert", *argv], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_corpus_is_large_enough():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, tmp_path, fixture_path, good_exports):
    ctx = Ctx(tmp_path / "case", fixture_path, good_exports)
    ctx.tmp.mkdir()
    target = case.build(ctx)
    good_exports("llama") if "verify-src" in case.commands else None

    jobs = []
    for cmd in case.commands:
        out_dir = tmp_path / f"out-{cmd}"
        out_dir.mkdir()
        argv, final = command_line(cmd, target, out_dir, fixture_path("tiny"), lambda: good_exports("llama"))
        jobs.append((cmd, argv, final, out_dir))
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda job: run(job[1], tmp_path), jobs))

    problems = []
    for (cmd, argv, final, out_dir), r in zip(jobs, results):
        lines = r.stderr.strip().splitlines()
        why = []
        if r.returncode != 2:
            why.append(f"exit {r.returncode}")
        if len(lines) != 1 or "Traceback" in r.stderr:
            why.append(f"{len(lines)} stderr lines")
        line = lines[0] if lines else ""
        if case.error not in line:
            why.append(f"no {case.error!r}")
        if case.names not in line:
            why.append(f"does not name {case.names!r}")
        if final is not None and final.exists():
            why.append("output exists")
        if leftovers := [p.name for p in out_dir.iterdir()]:
            why.append(f"left {leftovers}")
        if why:
            problems.append(f"{cmd}: {', '.join(why)}: {r.stderr.strip()[-600:]}")
    assert not problems, "\n".join(problems)
    if case.marker:  # the pickle's payload never ran, in any process
        assert not list(tmp_path.rglob(MARKER)) and not (Path.cwd() / MARKER).exists()


def test_symlinked_shards_are_allowed(tmp_path, fixture_path):
    """The Hugging Face cache is made of symbolic links: a snapshot of links into blobs works."""
    src = fixture_path("sharded")
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snap.mkdir()
    for i, f in enumerate(sorted(p for p in src.iterdir() if not p.name.startswith("."))):
        shutil.copyfile(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(blobs / f"blob{i}")
    code, out, err = run_cli("to-gguf", snap, tmp_path / "m.gguf", "--quant", "q8_0", "-q")
    assert code == 0, out + err
    code, out, err = run_cli("to-llama", snap, tmp_path / "llama", "-q")
    assert code == 0, out + err
    # a symlink inside the folder that points elsewhere is a symlink, not a path in the index: fine
    code, out, err = run_cli("verify", fixture_path("tiny"), tmp_path / "llama", "--tokens", TOKENS)
    assert code == 0, out + err
