"""Every correct export of every fixture and type passes verify (the same exports whose bytes
tests/data/export_sha256.json records), judged by one verify run per fixture."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from tests.export_hashes import FIXTURE_COMMANDS, exports

TOKENS = "1,20,300,400,500,600,700,800,900,1000"


@pytest.mark.slow
@pytest.mark.parametrize("fixture", list(FIXTURE_COMMANDS))
def test_every_export_of_the_fixture_passes(fixture, fixture_path, tmp_path):
    src = fixture_path(fixture)
    outs = []
    for key, name, args, out in exports():
        if name != fixture:
            continue
        dest = tmp_path / key.replace("/", "_") / out
        code, _, err = run_cli(args[0], src, dest, *args[1:], "-q")
        assert code == 0, (key, err)
        outs.append(dest)
    report = tmp_path / "verify.json"
    code, out, err = run_cli("verify", src, *outs, "--tokens", TOKENS, "--json", report)
    assert code == 0, out + err
    data = json.loads(report.read_text())
    assert len(data["exports"]) == len(outs) and all(e["passed"] for e in data["exports"])
    for e in data["exports"]:
        assert e["worst_tensor"]["worst_over_bound"] <= 1.0 and len(e["tensors"]) > 0
