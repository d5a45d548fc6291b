"""The data-free column rescaling of INT4 exports: it leaves the model's function unchanged,
balances the columns it scales, and verify holds an export to the scales written beside it (a
tampered or damaged scale file fails, by name)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from minicpm_convert import reference
from minicpm_convert.families import family_of
from minicpm_convert.formats.hf import int4_rescale
from minicpm_convert.sources.checkpoint import Checkpoint
from minicpm_convert.stream import llama_stream
from minicpm_convert.verify import compare, prompt_tokens
from tests.conftest import run_cli


class Jobs:
    """Llama-format jobs as a WeightSource."""

    def __init__(self, jobs, spec):
        self.jobs, self.spec = {j.name: j for j in jobs}, spec

    def has(self, name):
        return name in self.jobs

    def shape(self, name):
        return self.jobs[name].shape

    def read(self, name, start=0, stop=None):
        job = self.jobs[name]
        return job.read(start, job.rows if stop is None else stop)


@pytest.mark.parametrize("name", ["tiny", "gqa", "minicpm5"])
def test_rescaling_preserves_the_function(name, fixture_path):
    ckpt = Checkpoint(fixture_path(name))
    spec = family_of(ckpt.spec).export_spec(ckpt.spec, "llama")
    jobs = llama_stream(ckpt)
    scales = int4_rescale.compute({j.name: j for j in jobs}, spec)
    assert len(scales) == 2 * spec.num_hidden_layers
    assert any((c - 1).abs().max() > 0.05 for c in scales.values()), "nothing was rescaled"
    tokens = prompt_tokens(ckpt, None, None)
    before = reference.forward(Jobs(jobs, spec), tokens)
    after = reference.forward(Jobs(int4_rescale.apply(jobs, spec, scales), spec), tokens)
    assert compare(before, after)["rel_err"] < 1e-5


def test_balance_evens_out_outlier_columns():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    w[:, 3] *= 10  # an outlier input channel
    c = int4_rescale.balance(w)
    spread = lambda m: float(m.std(0).max() / m.std(0).min())  # noqa: E731
    assert spread(w / c) < 0.5 * spread(w)
    assert abs(float(c.square().mean()) - 1) < 1e-5


@pytest.fixture(scope="module")
def rescaled_export(tmp_path_factory, fixture_path):
    out = tmp_path_factory.mktemp("rescaled") / "ct"
    code, _, err = run_cli("to-int4", fixture_path("gqa"), out, "--format", "compressed-tensors", "--group-size", "64",
                           "-q")
    assert code == 0, err
    assert (out / int4_rescale.FILE).is_file()
    return out


def test_tampered_scales_fail_verify(rescaled_export, fixture_path, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(rescaled_export, bad)
    scales = load_file(str(bad / int4_rescale.FILE))
    key = "model.layers.1.mlp.down_proj"
    scales[key] = scales[key].clone()
    scales[key][7] *= 3
    save_file(scales, str(bad / int4_rescale.FILE))
    code, out, err = run_cli("verify", fixture_path("gqa"), bad)
    assert code == 1, out + err
    assert "model.layers.1.mlp.up_proj.weight" in out or "model.layers.1.mlp.down_proj.weight" in out


def test_damaged_scale_file_is_one_line_exit_2(rescaled_export, fixture_path, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(rescaled_export, bad)
    scales = load_file(str(bad / int4_rescale.FILE))
    scales["model.layers.0.self_attn.o_proj"] = -scales["model.layers.0.self_attn.o_proj"]
    save_file(scales, str(bad / int4_rescale.FILE))
    code, _, err = run_cli("verify", fixture_path("gqa"), bad)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "rescaling 'model.layers.0.self_attn.o_proj'" in err


def test_no_rescale_writes_no_scales(fixture_path, tmp_path):
    code, _, err = run_cli("to-int4", fixture_path("tiny"), tmp_path / "x", "--no-rescale", "-q")
    assert code == 0, err
    assert not (tmp_path / "x" / int4_rescale.FILE).exists()
    code, out, err = run_cli("verify", fixture_path("tiny"), tmp_path / "x")
    assert code == 0, out + err
