"""sha256 of every fixture export (each command and type): behaviour that a refactor must not change.

    python -m tests.export_hashes            # compare with tests/data/export_sha256.json
    python -m tests.export_hashes --write    # record the current bytes (a deliberate change only)

`tests/test_export_hashes.py` runs the comparison in the test suite. A change of bytes that is
meant (new metadata, a vocabulary fix) rewrites the file in the same commit, which says why.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HASH_FILE = ROOT / "tests" / "data" / "export_sha256.json"

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_K_M", "q5_K_M", "q6_K")
INT4 = {"gptq": ["--format", "gptq"], "gptq-asym-g64": ["--format", "gptq", "--asym", "--group-size", "64"],
        "ct": ["--format", "compressed-tensors"],
        "ct-asym-g32": ["--format", "compressed-tensors", "--asym", "--group-size", "32"],
        "awq": ["--format", "awq"]}
# Which commands each fixture supports (MoE's INT4 is compressed-tensors only).
FIXTURE_COMMANDS = {"tiny": ("llama", "gguf", "int4"), "gqa": ("llama", "gguf", "int4"),
                    "untied": ("llama", "gguf", "int4"), "odd": ("llama", "gguf"),
                    "sharded": ("llama", "gguf"), "bin": ("llama", "gguf"), "moe": ("llama", "gguf", "int4-ct")}


def exports() -> list[tuple[str, str, list[str], str]]:
    """(key, fixture, CLI arguments after SRC OUT, output name)."""
    out = []
    for fixture, commands in FIXTURE_COMMANDS.items():
        if "llama" in commands:
            for dtype in ("auto", "float32"):
                out.append((f"{fixture}/to-llama-{dtype}", fixture, ["to-llama", "--dtype", dtype], "llama"))
        if "gguf" in commands:
            for arch in ("minicpm", "llama"):
                for quant in GGUF_TYPES:
                    out.append((f"{fixture}/to-gguf-{arch}-{quant}", fixture,
                                ["to-gguf", "--quant", quant, "--arch", arch], "m.gguf"))
        for name, args in INT4.items():
            if "int4" in commands or ("int4-ct" in commands and "compressed-tensors" in args):
                out.append((f"{fixture}/to-int4-{name}", fixture, ["to-int4", *args], "int4"))
    return out


def digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    base = path if path.is_dir() else path.parent
    return {str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def run_all(keys: set[str] | None = None) -> dict[str, dict[str, str]]:
    sys.path.insert(0, str(ROOT))
    from typer.testing import CliRunner

    from fixtures.make_fixtures import build_all
    from minicpm_convert.cli import app

    fixtures = build_all(ROOT / "fixtures" / "build")
    result: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, fixture, args, name in exports():
            if keys is not None and key not in keys:
                continue
            dest = Path(tmp) / key.replace("/", "_") / name
            command, *options = args
            r = CliRunner().invoke(app, [command, str(fixtures[fixture]), str(dest), *options, "-q"],
                                   catch_exceptions=False)
            if r.exit_code != 0:
                raise SystemExit(f"{key}: exit {r.exit_code}: {r.stderr}")
            result[key] = digest(dest)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="record the current bytes")
    args = ap.parse_args(argv)
    got = run_all()
    if args.write:
        HASH_FILE.parent.mkdir(parents=True, exist_ok=True)
        HASH_FILE.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(got)} exports to {HASH_FILE}")
        return 0
    want = json.loads(HASH_FILE.read_text())
    bad = sorted(k for k in want if got.get(k) != want[k])
    for k in bad:
        print(f"differs: {k}")
    print(f"{len(want) - len(bad)} of {len(want)} exports byte-identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
