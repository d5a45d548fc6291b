"""The tensor stream's one-pass reads: `TensorJob.read_as` gives exactly the float32 path's values
(read, fold, permute, cast) with the compiled kernel and without it, checks NaN/Inf on the way, and
`ordered_map(scratch=True)` never hands a buffer to a call while the consumer may still use it."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch

from minicpm_convert.errors import ConvertError
from minicpm_convert.formats.gguf.layout import permute_rows
from minicpm_convert.formats.gguf.writer import gguf_jobs
from minicpm_convert.quants import registry
from minicpm_convert.sources.checkpoint import Checkpoint
from minicpm_convert.stream import Scratch, llama_stream, ordered_map, source_stream


@pytest.fixture(params=["compiled", "torch"])
def backend(request, monkeypatch):
    if request.param == "compiled" and registry.compiled_module() is None:
        pytest.skip("the C extension is not built")
    if request.param == "torch":
        monkeypatch.setattr(registry, "use_compiled", False)
    return request.param


def oracle(job, start, stop, dtype, heads):
    rows = job.read(start, stop)
    return (permute_rows(rows, heads) if heads else rows).to(dtype)


@pytest.mark.parametrize("name", ["tiny", "gqa", "untied", "odd", "bin", "moe"])
def test_read_as_equals_the_float32_path(name, fixture_path, backend):
    ckpt = Checkpoint(fixture_path(name))
    jobs = [(j, None) for j in source_stream(ckpt) + llama_stream(ckpt)]
    jobs += [(j, j.rope_heads) for _, j in gguf_jobs(ckpt, "minicpm") if j.rope_heads]
    scratch = Scratch()
    for job, heads in jobs:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            chunks = [(0, job.rows)] if heads else [(0, 3), (3, job.rows)]
            for start, stop in chunks:
                want = oracle(job, start, stop, dtype, heads)
                for out in (None, scratch):
                    got = job.read_as(start, stop, dtype, heads, out)
                    assert got.dtype == dtype and got.shape == want.shape
                    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (name, job.name, dtype)


def test_read_as_names_a_tensor_holding_nan(tmp_path, fixture_path, backend):
    from safetensors.torch import load_file, save_file
    import shutil

    src = tmp_path / "ckpt"
    shutil.copytree(fixture_path("tiny"), src)
    weights = src / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.1.mlp.down_proj.weight"][5, 7] = float("inf")
    save_file(tensors, weights, metadata={"format": "pt"})
    ckpt = Checkpoint(src)
    job = next(j for j in llama_stream(ckpt) if j.name == "model.layers.1.mlp.down_proj.weight")
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(ConvertError, match=r"down_proj.weight' contains Inf"):
            job.read_as(0, job.rows, dtype, None, Scratch())
        job.read_as(0, 5, dtype)  # the rows before it are fine


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_ordered_map_scratch_is_not_shared_while_in_use(threads):
    """Every call writes its item into its buffer and returns a view; the consumer still finds
    its value there after other calls ran, up to the moment it asks for the next result."""
    rng = random.Random(threads)

    def fill(i, buf: Scratch):
        view = buf.get(4096 + 8 * (i % 5)).view(np.int64)
        time.sleep(rng.random() * 0.002)
        view[:] = i
        return i, view

    for i, view in ordered_map(fill, range(120), threads, scratch=True):
        time.sleep(rng.random() * 0.002)  # workers keep filling other buffers meanwhile
        assert (view == i).all(), i
