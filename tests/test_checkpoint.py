"""Loading: local folders in every storage layout, the Hub path (offline), and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from minicpm_convert.sources.checkpoint import Checkpoint
from minicpm_convert.errors import ConvertError


@pytest.mark.parametrize("name,dtype", [("tiny", torch.bfloat16), ("gqa", torch.float16),
                                        ("untied", torch.float32), ("sharded", torch.bfloat16),
                                        ("bin", torch.bfloat16), ("odd", torch.bfloat16)])
def test_layouts_load_lazily_with_their_dtype(name, dtype, fixture_path):
    ckpt = Checkpoint(fixture_path(name))
    assert ckpt.storage_dtype == dtype
    assert ckpt.names()[0] == "model.embed_tokens.weight"
    t = ckpt.read("model.layers.0.mlp.up_proj.weight", 2, 5)
    assert t.dtype == torch.float32 and t.shape == (3, ckpt.spec.hidden_size)


def test_sharded_equals_single_file(fixture_path):
    a, b = Checkpoint(fixture_path("tiny")), Checkpoint(fixture_path("sharded"))
    assert a.names() == b.names()
    for n in a.names():
        assert torch.equal(a.get(n), b.get(n)), n


def test_variant_and_spec(fixture_path):
    spec = Checkpoint(fixture_path("gqa")).spec
    assert spec.variant == "minicpm" and spec.num_key_value_heads == 2 and spec.tie_word_embeddings
    assert Checkpoint(fixture_path("untied")).spec.tie_word_embeddings is False


def _hub_cache(tmp_path, fixture, repo="openbmb/MiniCPM-2B-sft-bf16"):
    """A Hugging Face cache laid out as huggingface_hub writes it, holding one snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    shutil.copytree(fixture, snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return tmp_path / "hub", snap


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants as c
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return monkeypatch


def test_hub_repo_id_resolves_from_cache_offline(tmp_path, fixture_path, offline):
    import huggingface_hub.constants as c
    cache, snap = _hub_cache(tmp_path, fixture_path("tiny"))
    offline.setattr(c, "HF_HUB_CACHE", str(cache))
    ckpt = Checkpoint.open("openbmb/MiniCPM-2B-sft-bf16")
    assert ckpt.folder.resolve() == snap.resolve()
    assert ckpt.spec.hidden_size == 256


def test_hub_repo_not_cached_offline_is_a_clear_error(tmp_path, offline):
    import huggingface_hub.constants as c
    offline.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ConvertError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        Checkpoint.open("openbmb/MiniCPM-2B-sft-bf16")


def test_not_a_folder_nor_repo_id(tmp_path):
    with pytest.raises(ConvertError, match="no such folder"):
        Checkpoint.open(str(tmp_path / "nope" / "deeper"))


# -- bad input: one line naming the problem ---------------------------------------------------

def _copy(fixture_path, tmp_path, name="tiny"):
    dest = tmp_path / name
    shutil.copytree(fixture_path(name), dest)
    return dest


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,message", [
    ({"hidden_size": None}, "missing key 'hidden_size'"),
    ({"hidden_size": "256"}, "key 'hidden_size' must be an integer"),
    ({"num_hidden_layers": 0}, "key 'num_hidden_layers' must be positive"),
    ({"model_type": "gpt2"}, "unknown model_type 'gpt2'"),
    ({"num_attention_heads": 3}, "not divisible by num_attention_heads 3"),
    ({"num_hidden_layers": 5}, "missing tensor 'model.layers.4.input_layernorm.weight'"),
    ({"num_hidden_layers": 3}, "unexpected tensor 'model.layers.3."),
    ({"intermediate_size": 1024}, "has shape [512, 256], config.json implies [1024, 256]"),
    ({"vocab_size": 1500}, "'model.embed_tokens.weight' has shape"),
])
def test_config_problems(changes, message, fixture_path, tmp_path):
    folder = _copy(fixture_path, tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(ConvertError) as err:
        Checkpoint(folder)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_config_not_json(fixture_path, tmp_path):
    folder = _copy(fixture_path, tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConvertError, match="config.json: not valid JSON"):
        Checkpoint(folder)


def test_truncated_safetensors(fixture_path, tmp_path):
    folder = _copy(fixture_path, tmp_path)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ConvertError, match="model.safetensors: tensor '.*': data runs past the end"):
        Checkpoint(folder)


def test_nan_names_the_tensor(fixture_path, tmp_path):
    from safetensors.torch import load_file, save_file
    folder = _copy(fixture_path, tmp_path, "untied")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 7] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    ckpt = Checkpoint(folder)
    with pytest.raises(ConvertError, match="tensor 'model.layers.1.mlp.up_proj.weight' contains NaN"):
        ckpt.read("model.layers.1.mlp.up_proj.weight")
