"""Every fixture export (each command and type) has exactly the bytes recorded in
tests/data/export_sha256.json: a restructuring of the code cannot change an output unnoticed."""

from __future__ import annotations

import json

import pytest

from tests.export_hashes import HASH_FILE, run_all


@pytest.mark.slow
def test_every_fixture_export_has_its_recorded_bytes(fixtures_root):
    want = json.loads(HASH_FILE.read_text())
    got = run_all()
    assert sorted(got) == sorted(want), "the set of exports changed: regenerate with python -m tests.export_hashes --write"
    differ = [key for key in want if got[key] != want[key]]
    assert not differ, f"{len(differ)} exports changed bytes, e.g. {differ[:5]}"


@pytest.mark.slow
def test_the_bytes_do_not_depend_on_the_machines_vector_math(fixtures_root):
    """MKL picks its code path by the CPU's instruction set, and on AVX-512 its vector square root
    is not correctly rounded: the same exports with MKL held to AVX2, as a machine without AVX-512
    runs it, have the recorded bytes too (on a machine without AVX-512 this is the test above)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    env = {**os.environ, "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    r = subprocess.run([sys.executable, "-m", "tests.export_hashes"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
