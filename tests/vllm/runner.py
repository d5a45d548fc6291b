"""Runs inside the vLLM venv (tests/vllm/venv.py), never imported by the project's tests.

    python runner.py < jobs.json > results.jsonl

Stops after the first job that fails (exit code 3); the caller runs the rest in a new process.

stdin: a JSON list of jobs {"model": folder, "dtype": "auto"|"bfloat16"|"float32"|...,
"tokens": [ids], "max_tokens": n}.  stdout: one JSON line per job, in order:
  model, loaded (LLM() built: config parsed, every tensor loaded), dtype (what vLLM computes
  in), quantization (the method vLLM detected), logprobs (len(tokens) rows of the
  full-vocabulary log-softmax, row i predicting the token after tokens[:i+1]), greedy
  (max_tokens greedy ids), load_s, run_s, and error (type: message) if a step failed;
plus, for every job, int4_kernel: whether this vLLM build has its CPU INT4 (W4A16) kernel.

It does what `vllm serve` does, through vLLM's own offline API: the folder as given, the
quantization method vLLM detects from config.json, raw logprobs (before any sampling
transform).  Only this file touches vLLM, so the tests compare plain numbers.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

# One engine in this process: no engine-core subprocess per model, and the jobs run one after
# another in the same interpreter (importing vLLM alone takes ~12 s here).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

# On the CPU backend gpu_memory_utilization is the share of RAM vLLM may use (KV cache
# included); the default 0.9 would claim most of a machine that other processes share.
GPU_MEMORY_UTILIZATION = 0.3
# The KV cache is sized explicitly: vLLM's automatic size is that share minus this process's
# RSS, which grows with each model loaded here and starved the later ones ("less than
# requested memory for kv").  A fixture needs ~4 KiB per token; 64 MiB is 16k tokens.
KV_CACHE_BYTES = 64 << 20


def int4_kernel() -> bool:
    """vLLM's CPU W4A16 kernel (csrc/cpu/cpu_wna16.cpp) is compiled into its AVX-512
    extension only; on an AVX2-only CPU the op is absent and INT4 layers cannot run."""
    import torch

    import vllm._custom_ops  # noqa: F401  (loads the extension this CPU selects)
    return hasattr(torch.ops._C, "cpu_gemm_wna16")


def run(job: dict, result: dict) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    tokens = job["tokens"]
    t0 = time.perf_counter()
    # Eager: torch.compile costs 25-80 s per model here and runs the same kernels, fused.
    llm = LLM(model=job["model"], dtype=job.get("dtype", "auto"), gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
              kv_cache_memory_bytes=KV_CACHE_BYTES, max_model_len=max(256, len(tokens) + job["max_tokens"]),
              max_logprobs=-1, seed=0, enforce_eager=True, compilation_config={"mode": 0})
    config = llm.llm_engine.model_config
    result.update(loaded=True, dtype=str(config.dtype).removeprefix("torch."), quantization=config.quantization,
                  load_s=time.perf_counter() - t0)
    try:
        t1 = time.perf_counter()
        # temperature 0: greedy; -1: the whole vocabulary, raw (vLLM's default logprobs_mode).
        # No detokenizing: the ids are what we compare, and vLLM's detokenizer fails on the
        # padded rows of a vocabulary larger than the tokenizer (the untied fixture's 6).
        params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], prompt_logprobs=-1, logprobs=-1,
                                ignore_eos=True, detokenize=False)
        out = llm.generate([TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False)[0]
        # prompt_logprobs[i] is the distribution of token i given tokens[:i] (None for i=0); the
        # first sampled step's logprobs are the row after the whole prompt.
        rows = [*out.prompt_logprobs[1:], out.outputs[0].logprobs[0]]
        vocab = config.get_vocab_size()
        result.update(logprobs=[[row[t].logprob for t in range(vocab)] for row in rows],
                      greedy=list(out.outputs[0].token_ids), run_s=time.perf_counter() - t1)
    finally:
        del llm
        gc.collect()


def main() -> int:
    # vLLM logs (and C++ warnings) to stdout; keep stdout for the JSON lines alone.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    jobs = json.load(sys.stdin)
    kernel = int4_kernel()
    for job in jobs:
        result = {"model": job["model"], "loaded": False, "int4_kernel": kernel}
        try:
            run(job, result)
        except Exception as e:
            traceback.print_exc()
            result["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(result), file=out, flush=True)
        if "error" in result:
            # A failed engine can leave vLLM's process state broken ("pipeline model parallel
            # group is not initialized" for the next model): stop, the caller starts afresh.
            return 3
    return 0


if __name__ == "__main__":  # vLLM may spawn workers that re-import this module
    sys.exit(main())
