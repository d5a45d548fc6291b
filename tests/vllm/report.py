"""Print the vLLM agreement table (the README's figures): every case of test_vllm.py.

    PYTHONPATH=. python tests/vllm/report.py [OUT_DIR] [--only SUBSTRING]   # e.g. --only awq

Same exports (the real CLI), same runner and figures as the tests; nothing is asserted."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fixtures.make_fixtures import build_all  # noqa: E402
from minicpm_convert import reference  # noqa: E402
from minicpm_convert.sources.checkpoint import Checkpoint  # noqa: E402
from minicpm_convert.sources import open_export  # noqa: E402
from minicpm_convert.verify import prompt_tokens  # noqa: E402
from tests.venvs import find  # noqa: E402
from tests.vllm.client import figures, greedy_prefix, run_jobs  # noqa: E402
from tests.vllm.test_vllm import ALL, GREEDY_TOKENS, position_kl, reference_greedy  # noqa: E402


def main() -> int:
    python = find("vllm")
    if python is None:
        print("no vLLM venv: python tests/venvs.py vllm", file=sys.stderr)
        return 2
    fixtures = build_all(ROOT / "fixtures" / "build")
    args, only = sys.argv[1:], ""
    if "--only" in args:
        i = args.index("--only")
        only, args = args[i + 1], args[:i] + args[i + 2:]
    out = Path(args[0]) if args else Path(tempfile.mkdtemp(prefix="vllm-report-"))
    cases, jobs = [c for c in ALL.values() if only in c.id], []
    for case in cases:
        dest = out / case.export_name
        if not dest.exists():
            subprocess.run([sys.executable, "-m", "minicpm_convert", case.command[0], str(fixtures[case.fixture]),
                            str(dest), *case.command[1:], "-q"], check=True, capture_output=True)
        jobs.append({"model": str(dest), "dtype": case.dtype, "max_tokens": GREEDY_TOKENS,
                     "tokens": prompt_tokens(Checkpoint(fixtures[case.fixture]), None, None)})
    print("| case | vLLM dtype | vs reference on the export: rel err / top-1 / KL | vs MiniCPM original: rel err / "
          "top-1 / KL (median KL) | greedy = reference | load s | run s |")
    print("|---|---|---|---|---|---|---|")
    for case, job, result in zip(cases, jobs, run_jobs(python, jobs)):
        if "error" in result:
            print(f"| {case.id} | {result.get('dtype', '-')} | {result['error'].splitlines()[0][:90]} | | | | |")
            continue
        source, _ = open_export(Path(job["model"]))
        mine = figures(reference.forward(source, job["tokens"]), result["logprobs"])
        original = reference.forward(Checkpoint(fixtures[case.fixture]), job["tokens"])
        orig = figures(original, result["logprobs"])
        median = position_kl(original, result["logprobs"]).median().item()
        greedy = greedy_prefix(reference_greedy(source, job["tokens"], GREEDY_TOKENS), result["greedy"])
        f = lambda m: f"{m['rel_err']:.2g} / {m['top1']:.1%} / {m['kl']:.2g}"  # noqa: E731
        print(f"| {case.id} | {result['dtype']} | {f(mine)} | {f(orig)} ({median:.2g}) | {greedy}/{GREEDY_TOKENS} | "
              f"{result['load_s']:.1f} | {result['run_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
