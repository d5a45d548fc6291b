"""The project's side of the vLLM tests: run jobs in the vLLM venv, turn its logprobs into
verify's figures.  vLLM never runs in this interpreter (it pins its own packages)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

from minicpm_convert.verify import compare

RUNNER = Path(__file__).with_name("runner.py")
# Per runner process: vLLM's import (~15 s) plus ~5-15 s per model on 2 shared cores.
TIMEOUT_S = 1800


def run_jobs(python: Path, jobs: list[dict]) -> list[dict]:
    """One result per job, in order.  The runner stops at a failed job (a failed engine can break
    vLLM's process state), so the remaining jobs go to a fresh process."""
    results: list[dict] = []
    while len(results) < len(jobs):
        rest = jobs[len(results):]
        proc = subprocess.run([str(python), str(RUNNER)], input=json.dumps(rest), capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        got = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        if not got:
            raise RuntimeError(f"vLLM runner exited {proc.returncode} without a result; its stderr ends:\n"
                               + proc.stderr[-4000:])
        results += got
    return results


def figures(reference_logits: torch.Tensor, logprobs: list[list[float]]) -> dict[str, float]:
    """verify's figures (max abs err, rel err, cosine, top-1, KL) of vLLM's logprobs against the
    reference's logits.  vLLM gives log-softmax rows, so each is shifted by the reference row's
    logsumexp: the difference is then exactly the difference of the two log-softmaxes (at most
    twice the logit difference), compared on the logits' scale as verify does."""
    ref = reference_logits.double()
    got = torch.tensor(logprobs, dtype=torch.float64)
    got = torch.log_softmax(got, -1)  # renormalise: vLLM's rows are float32 sums
    return compare(ref, got + torch.logsumexp(ref, -1, keepdim=True))


def greedy_prefix(want: list[int], got: list[int]) -> int:
    """How many leading greedy tokens agree."""
    n = 0
    for a, b in zip(want, got):
        if a != b:
            break
        n += 1
    return n
