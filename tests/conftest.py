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


def transformers_parity(src_folder: Path, export_folder: Path) -> dict[str, float]:
    """transformers' float32 logits on an export against the MiniCPM reference on its source."""
    import torch
    from transformers import AutoModelForCausalLM

    from minicpm_convert import reference
    from minicpm_convert.sources.checkpoint import Checkpoint
    from minicpm_convert.verify import compare, prompt_tokens

    src = Checkpoint(src_folder)
    tokens = prompt_tokens(src, None, None)
    model = AutoModelForCausalLM.from_pretrained(export_folder, dtype=torch.float32, trust_remote_code=False)
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0]
    return compare(reference.forward(src, tokens), got)
