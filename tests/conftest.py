"""Shared test set-up: the fixtures (built once, deterministically) and small helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fixtures.make_fixtures import FIXTURES, build_all  # noqa: E402

FIXTURE_ROOT = ROOT / "fixtures" / "build"


@pytest.fixture(scope="session")
def fixtures_root() -> Path:
    build_all(FIXTURE_ROOT)
    return FIXTURE_ROOT


@pytest.fixture(scope="session")
def fixture_path(fixtures_root):
    def get(name: str) -> Path:
        assert name in FIXTURES, name
        return fixtures_root / name
    return get


def run_cli(*args: str):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from minicpm_convert.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr
