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
