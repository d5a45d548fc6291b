"""Output never depends on the thread count: a multi-threaded export equals a single-threaded
one byte for byte (GGUF every file type and both archs; Llama-format safetensors)."""

from __future__ import annotations

import pytest
import torch

from minicpm_convert import stream
from minicpm_convert.sources.checkpoint import Checkpoint
from minicpm_convert.formats.gguf.plan import FILE_TYPES
from minicpm_convert.formats.gguf.writer import write_gguf
from minicpm_convert.formats.hf.llama import write_safetensors_shards
from minicpm_convert.stream import llama_stream, ordered_map


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunks of a few rows, so even the tiny fixtures are split across many work items."""
    monkeypatch.setattr(stream, "PARALLEL_CHUNK_VALUES", 3000)
    import minicpm_convert.formats.gguf.writer as gguf_sink
    import minicpm_convert.formats.hf.llama as llama_sink
    monkeypatch.setattr(gguf_sink, "PARALLEL_CHUNK_VALUES", 3000)
    monkeypatch.setattr(llama_sink, "PARALLEL_CHUNK_VALUES", 3000)


@pytest.mark.parametrize("arch", ["minicpm", "llama"])
@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_K_M", "q5_K_M", "q6_K", "bf16"])
@pytest.mark.parametrize("name", ["tiny", "untied", "odd"])
def test_gguf_multi_threaded_equals_single_threaded(name, quant, arch, fixture_path, tmp_path, tiny_chunks):
    ckpt = Checkpoint(fixture_path(name))
    one, many = tmp_path / "one.gguf", tmp_path / "many.gguf"
    write_gguf(ckpt, one, FILE_TYPES[quant], arch, str(fixture_path(name)), quiet=True, threads=1)
    write_gguf(ckpt, many, FILE_TYPES[quant], arch, str(fixture_path(name)), quiet=True, threads=4)
    assert one.read_bytes() == many.read_bytes()


@pytest.mark.parametrize("quant", ["f16", "q4_K_M"])
@pytest.mark.parametrize("name", ["tiny", "gqa"])
def test_gguf_chunk_size_does_not_change_bytes(name, quant, fixture_path, tmp_path, monkeypatch):
    """Chunks of a few rows (q/k split into whole heads, permuted chunk by chunk) give the file
    that whole-tensor chunks give."""
    import minicpm_convert.formats.gguf.writer as gguf_sink

    ckpt = Checkpoint(fixture_path(name))
    files = []
    for values in (1 << 30, 3000):
        monkeypatch.setattr(gguf_sink, "PARALLEL_CHUNK_VALUES", values)
        files.append(tmp_path / f"{values}.gguf")
        write_gguf(ckpt, files[-1], FILE_TYPES[quant], None, str(fixture_path(name)), quiet=True, threads=2)
    assert files[0].read_bytes() == files[1].read_bytes()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_llama_multi_threaded_equals_single_threaded(dtype, fixture_path, tmp_path, tiny_chunks):
    ckpt = Checkpoint(fixture_path("sharded"))
    (tmp_path / "one").mkdir()
    (tmp_path / "many").mkdir()
    write_safetensors_shards(tmp_path / "one", llama_stream(ckpt), dtype, 100_000, quiet=True, threads=1)
    write_safetensors_shards(tmp_path / "many", llama_stream(ckpt), dtype, 100_000, quiet=True, threads=3)
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "many").iterdir()) and len(files) > 2
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "many" / f).read_bytes(), f


def test_ordered_map_keeps_order_and_propagates_errors():
    import time

    def slow(i):
        time.sleep(0.001 * (7 - i % 7))
        if i == 50:
            raise ValueError("boom")
        return i * i

    assert list(ordered_map(slow, range(40), threads=4)) == [i * i for i in range(40)]
    with pytest.raises(ValueError, match="boom"):
        list(ordered_map(slow, range(60), threads=3))
