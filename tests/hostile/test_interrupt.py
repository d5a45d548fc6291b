"""Interrupted and failing writes: Ctrl-C, SIGKILL and a write error leave nothing at the final path.

Each run is the real CLI in a subprocess on a checkpoint big enough (~27M parameters) that a
q4_K_M conversion lasts a few seconds, so the signal lands while the temporary is being written.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_cli

PARTIAL = ".partial-"


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> Path:
    from fixtures.make_fixtures import FIXTURES, copy_tokenizer_files, tokenizer_size, write_checkpoint

    src = tmp_path_factory.mktemp("big") / "src"
    cfg = FIXTURES["tiny"].config(tokenizer_size())
    cfg.update(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
               intermediate_size=1536)
    write_checkpoint(src, cfg, torch.bfloat16, seed=99)
    copy_tokenizer_files(src)
    return src


def start(*args, preexec_fn=None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "minicpm_convert", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=preexec_fn)


def wait_for_partial(proc: subprocess.Popen, folder: Path, name: str, timeout: float = 120) -> Path:
    """The temporary `.NAME.partial-PID` of this process, once it holds some bytes; the process is
    then stopped (SIGSTOP), so that a signal sent next lands while the output is being written
    however fast the conversion is (resume it with `interrupt`, or kill it)."""
    tmp = folder / f".{name}{PARTIAL}{proc.pid}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tmp.exists() and (tmp.is_dir() and any(tmp.iterdir()) or tmp.is_file() and tmp.stat().st_size > 0):
            proc.send_signal(signal.SIGSTOP)
            return tmp
        assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()}"
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no temporary output appeared")


@pytest.mark.parametrize("command,name", [(["to-gguf", "--quant", "q4_K_M"], "m.gguf"),
                                          (["to-llama", "--shard-size", "5MB"], "llama")])
def test_ctrl_c_removes_the_temporary(command, name, big_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # As in a terminal: SIGINT at its default action. A shell starting a job in the background (as
    # CI may run the tests) ignores SIGINT for it, children inherit that, and Python then installs
    # no KeyboardInterrupt handler: the signal would be ignored, as it should be for such a job.
    proc = start(command[0], big_checkpoint, out / name, *command[1:],
                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_partial(proc, out, name)
    proc.send_signal(signal.SIGINT)  # pending until the process runs again
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["interrupted; no output was written"], err
    assert list(out.iterdir()) == []


def test_sigkill_leaves_a_recognisable_partial_that_the_next_run_removes(big_checkpoint, fixture_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = start("to-gguf", big_checkpoint, out / "m.gguf", "--quant", "q4_K_M")
    tmp = wait_for_partial(proc, out, "m.gguf")
    proc.kill()
    proc.wait(timeout=60)
    assert not (out / "m.gguf").exists()
    assert [p.name for p in out.iterdir()] == [f".m.gguf{PARTIAL}{proc.pid}"] and tmp.exists()
    # another run for another output leaves it alone; the next run for this output removes it
    assert run_cli("to-gguf", fixture_path("tiny"), out / "other.gguf", "--quant", "q8_0", "-q")[0] == 0
    assert tmp.exists()
    assert run_cli("to-gguf", fixture_path("tiny"), out / "m.gguf", "--quant", "q8_0", "-q")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["m.gguf", "other.gguf"]


def _file_size_limit(limit: int):
    def apply():
        # A process over RLIMIT_FSIZE gets SIGXFSZ (which kills it) unless ignored; ignored, the
        # write fails with EFBIG, the same OSError path a full disk takes.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("command,name", [(["to-gguf", "--quant", "q8_0"], "m.gguf"), (["to-llama"], "llama"),
                                          (["to-int4", "--no-search"], "int4")])
def test_write_error_is_one_line_and_leaves_nothing(command, name, fixture_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = start(command[0], fixture_path("tiny"), out / name, *command[1:], preexec_fn=_file_size_limit(200_000))
    _, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "cannot write (File too large); nothing was written" in lines[0] and name in lines[0], err
    assert list(out.iterdir()) == []


def test_output_folder_under_a_file_is_one_line(fixture_path, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    proc = start("to-gguf", fixture_path("tiny"), tmp_path / "file" / "m.gguf", "--quant", "q8_0")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot create output folder" in err
