"""The metadata of our GGUF files against llama.cpp's own converter (`convert_hf_to_gguf.py`, as the
pinned llama-cpp-python vendors it) on the same checkpoint: the same keys with the same values,
but for the differences the README lists (OURS_ONLY below). The `tokenizer.*` keys are compared
by the vocabulary's own tests.

The fixtures have no model card and no sampling values, so a copy of `tiny` gets both (license,
tags, languages, base models, datasets; temperature, top_p, top_k, repetition_penalty, min_p)
and an override file as the converter's --metadata takes, to exercise every general.* source.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from gguf import GGUFReader

from fixtures.make_fixtures import FIXTURES
from tests.conftest import run_cli
from tests.llama_cpp_source import convert, vendor_dir


def keys(path) -> dict:
    return {k: f.contents() for k, f in GGUFReader(path).fields.items()
            if not k.startswith(("GGUF.", "tokenizer.ggml."))}


def ours_only(arch: str) -> set[str]:
    """Keys we write that llama.cpp's converter does not (the README's list)."""
    extra = {"minicpm_convert.version", "minicpm_convert.arch"}
    if arch == "minicpm":  # the converter writes these two for arch llama only
        extra |= {"minicpm.vocab_size", "minicpm.rope.dimension_count"}
    return extra


def assert_like_the_converter(ours: dict, theirs: dict, skip: set[str] = frozenset()) -> None:
    arch = ours["general.architecture"]
    assert set(ours) - set(theirs) - skip == ours_only(arch)
    assert set(theirs) - set(ours) - skip == set()
    differ = {k: (ours[k], theirs[k]) for k in theirs if k not in skip and ours[k] != theirs[k]}
    assert not differ, differ
    general = [k for k in theirs if k.startswith("general.") and k not in skip]
    assert [k for k in ours if k in general] == general, "general.* keys in another order"


def convert_as_minicpm5(src, out, outtype):
    """The converter on the minicpm5 fixture, told its byte-level BPE pre-tokenizer is MiniCPM5's:
    it recognises MiniCPM5's by the hash of the real vocabulary's tokenization of a test text, which
    the fixture's smaller vocabulary (MiniCPM5's structure) cannot give, and refuses it ("BPE
    pre-tokenizer was not recognized"). The keys compared here do not depend on it."""
    tree = vendor_dir()
    wrapper = out.parent / "convert_as_minicpm5.py"
    wrapper.write_text(f"""import runpy, sys
sys.path.insert(0, {str(tree)!r})
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "minicpm5"
runpy.run_path({str(tree / "convert_hf_to_gguf.py")!r}, run_name="__main__")
""")
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py"), "NO_LOCAL_GGUF": ""}
    r = subprocess.run([sys.executable, str(wrapper), str(src), "--outfile", str(out), "--outtype", outtype],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.parametrize("name", [n for n in FIXTURES if n != "moe"])
def test_keys_and_values_are_llama_cpps(name, fixture_path, tmp_path):
    src = fixture_path(name)
    theirs = keys((convert_as_minicpm5 if name == "minicpm5" else convert)(src, tmp_path / "theirs.gguf", "f32"))
    code, _, err = run_cli("to-gguf", src, tmp_path / "ours.gguf", "--quant", "f32", "-q")
    assert code == 0, err
    ours = keys(tmp_path / "ours.gguf")
    assert_like_the_converter(ours, theirs)
    assert ours["general.name"] and ours["general.size_label"]  # derived, not empty


def test_moe_keys_are_those_of_the_converters_vocab_only_file(fixture_path, tmp_path):
    """llama.cpp's converter cannot map MiniCPM-MoE's expert tensors ("Can not map tensor
    'model.layers.0.mlp.experts.0.w1.weight'"); its --vocab-only file writes every key all the same,
    but those it derives from the tensors: the parameter count (general.size_label, and finetune,
    which the size in the model's name becomes when it is far from the count)."""
    src = fixture_path("moe")
    theirs = keys(convert(src, tmp_path / "theirs.gguf", "f32", vocab_only=True))
    code, _, err = run_cli("to-gguf", src, tmp_path / "ours.gguf", "--quant", "f32", "-q")
    assert code == 0, err
    ours = keys(tmp_path / "ours.gguf")
    assert_like_the_converter(ours, theirs, skip={"general.size_label", "general.finetune"})
    assert ours["minicpm.expert_count"] == 8 and ours["minicpm.expert_used_count"] == 2


CARD = """---
license: apache-2.0
license_name: MiniCPM Model License
license_link: https://github.com/OpenBMB/MiniCPM/blob/main/MiniCPM%20Model%20License.md
language:
- en
- zh
tags:
- MiniCPM
- ModelBest
pipeline_tag: text-generation
base_model:
- openbmb/MiniCPM-2B-sft-bf16
- https://huggingface.co/openbmb/MiniCPM-2B-dpo-bf16
datasets:
- HuggingFaceFW/fineweb
---

# A model card
"""
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 40, "repetition_penalty": 1.02,
            "min_p": 0.05}


@pytest.fixture
def carded(fixture_path, tmp_path):
    """tiny with a model card and sampling values, in a folder named as Hub models are (the name
    heuristics see it: _name_or_path removed from config.json)."""
    src = tmp_path / "MiniCPM-2B-sft-v1.5"
    shutil.copytree(fixture_path("tiny"), src)
    (src / "README.md").write_text(CARD, encoding="utf-8")
    config = json.loads((src / "config.json").read_text())
    config.pop("_name_or_path", None)
    (src / "config.json").write_text(json.dumps(config, indent=2))
    gen = json.loads((src / "generation_config.json").read_text())
    (src / "generation_config.json").write_text(json.dumps({**gen, **SAMPLING}, indent=2))
    return src


def test_model_card_sampling_and_override_give_llama_cpps_keys(carded, tmp_path):
    override = tmp_path / "override.json"
    override.write_text(json.dumps({"general.quantized_by": "Tester", "general.author": "OpenBMB",
                                    "general.sampling.top_k": 20, "general.tags": ["minicpm", "chat"]}))
    theirs = keys(convert(carded, tmp_path / "theirs.gguf", "f32", "--metadata", str(override)))
    code, _, err = run_cli("to-gguf", carded, tmp_path / "ours.gguf", "--quant", "f32", "--metadata", override, "-q")
    assert code == 0, err
    ours = keys(tmp_path / "ours.gguf")
    assert_like_the_converter(ours, theirs)
    # the values were exercised, not only compared: every source shows up
    assert ours["general.quantized_by"] == "Tester" and ours["general.author"] == "OpenBMB"
    assert ours["general.license"] == "apache-2.0" and ours["general.license.name"] == "MiniCPM Model License"
    assert ours["general.languages"] == ["en", "zh"] and ours["general.tags"] == ["minicpm", "chat"]
    assert ours["general.base_model.count"] == 2
    assert ours["general.base_model.1.repo_url"] == "https://huggingface.co/openbmb/MiniCPM-2B-dpo-bf16"
    assert ours["general.dataset.0.repo_url"] == "https://huggingface.co/HuggingFaceFW/fineweb"
    name = (ours["general.basename"], ours["general.finetune"], ours["general.version"])
    assert name == ("MiniCPM", "2b-sft", "v1.5")
    assert ours["general.sampling.top_k"] == 20  # the override file wins over generation_config.json
    assert ours["general.sampling.temp"] == pytest.approx(0.7)
    assert ours["general.sampling.penalty_repeat"] == pytest.approx(1.02)  # from repetition_penalty
    assert ours["general.sampling.min_p"] == pytest.approx(0.05)


def test_model_name_and_the_default_file_name_are_the_converters(carded, tmp_path):
    """Written into a folder, the file gets the converter's name for it (which --model-name does not change)."""
    mine, theirs = tmp_path / "ours", tmp_path / "theirs"
    mine.mkdir()
    theirs.mkdir()
    convert(carded, theirs, "q8_0", "--model-name", "My MiniCPM")
    code, _, err = run_cli("to-gguf", carded, mine, "--quant", "q8_0", "--model-name", "My MiniCPM", "-q")
    assert code == 0, err
    [written], [want] = list(mine.iterdir()), list(theirs.iterdir())
    assert written.name == want.name == "MiniCPM-3.0M-2b-sft-v1.5-Q8_0.gguf"
    assert keys(written)["general.name"] == keys(want)["general.name"] == "My MiniCPM"


def test_a_hub_source_is_named_by_its_repo_id(fixture_path, tmp_path):
    """A folder in the Hugging Face cache (what a repo id resolves to) is named as the converter's
    --remote names a repo: by its id, not by the snapshot's commit hash."""
    snap = tmp_path / "hub" / "models--openbmb--MiniCPM-2B-sft-bf16" / "snapshots" / ("0123abcd" * 5)
    shutil.copytree(fixture_path("tiny"), snap)
    code, _, err = run_cli("to-gguf", snap, tmp_path / "m.gguf", "--quant", "q8_0", "-q")
    assert code == 0, err
    found = keys(tmp_path / "m.gguf")
    assert found["general.name"] == "openbmb/MiniCPM-2B-sft-bf16"
    assert found["general.source.repo_url"] == "https://huggingface.co/openbmb/MiniCPM-2B-sft-bf16"


@pytest.mark.parametrize("case,needle", [
    ("missing override", "override.json: cannot read the metadata file"),
    ("override not JSON", "override.json: the metadata file is not valid JSON"),
    ("override a list", "override.json: the metadata file must be a JSON object"),
    ("override name a number", "override.json: 'general.name' must be text, got 7"),
    ("card version a number", "README.md: 'version' must be text, got 2"),
    ("card tags not text", "README.md: 'tags' must be a list of text"),
    ("card not YAML", "README.md: cannot read the model card's front matter"),
    ("top_k not an integer", "generation_config.json: 'top_k' must be a 32-bit integer, got 40.5"),
    ("temperature text", "generation_config.json: 'temperature' must be a number, got 'hot'"),
])
def test_bad_metadata_is_one_line_naming_the_file(case, needle, carded, tmp_path):
    override = tmp_path / "override.json"
    card, gen = carded / "README.md", carded / "generation_config.json"
    if case == "override not JSON":
        override.write_text("{not json")
    elif case == "override a list":
        override.write_text("[1, 2]")
    elif case == "override name a number":
        override.write_text('{"general.name": 7}')
    elif case == "card version a number":
        card.write_text(CARD.replace("license: apache-2.0", "version: 2"))
    elif case == "card tags not text":
        card.write_text(CARD.replace("- ModelBest", "- 3"))
    elif case == "card not YAML":
        card.write_text(CARD.replace("- en", "- [en"))
    elif case == "top_k not an integer":
        gen.write_text(json.dumps({"top_k": 40.5}))
    elif case == "temperature text":
        gen.write_text(json.dumps({"temperature": "hot"}))
    extra = ["--metadata", override] if "override" in case else []
    code, _, err = run_cli("to-gguf", carded, tmp_path / "m.gguf", "--quant", "q8_0", *extra, "-q")
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.gguf").exists()
