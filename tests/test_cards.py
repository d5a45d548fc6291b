"""Model cards: every folder export (to-llama, to-int4) has a README.md whose front matter the Hub
reads as it should (read back with huggingface_hub, what `huggingface-cli upload` publishes it to),
listed in the export's manifest; `to-gguf --card` writes one beside the GGUF; `verify --card`
writes the figures into it. A README of the user's own is never replaced."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from huggingface_hub import ModelCard

from minicpm_convert.output import MANIFEST
from tests.conftest import run_cli
from tests.formats.test_gguf_metadata import CARD as SOURCE_CARD  # license, language, base models, ...

REPO = "openbmb/MiniCPM-2B-sft-bf16"


@pytest.fixture
def hub_src(fixture_path, tmp_path):
    """tiny as a snapshot of the Hugging Face cache (what a repo id resolves to), with its model card."""
    snap = tmp_path / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / ("0123abcd" * 5)
    shutil.copytree(fixture_path("tiny"), snap)
    (snap / "README.md").write_text(SOURCE_CARD, encoding="utf-8")
    return snap


def front_matter(path) -> dict:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    data = yaml.safe_load(text.split("---\n")[1])
    card = ModelCard.load(path, ignore_metadata_errors=False)  # the Hub's reading of it
    assert card.data.to_dict() == data
    return data


@pytest.mark.parametrize("command,relation,tags", [
    (["to-llama"], None, {"llama", "bfloat16"}),
    (["to-int4"], "quantized", {"gptq", "4-bit", "int4"}),
    (["to-int4", "--format", "compressed-tensors", "--asym", "--no-search"], "quantized", {"compressed-tensors"}),
])
def test_folder_exports_carry_a_card_for_the_hub(command, relation, tags, hub_src, tmp_path):
    out = tmp_path / "export"
    code, _, err = run_cli(command[0], hub_src, out, *command[1:], "-q")
    assert code == 0, err
    assert "README.md" in json.loads((out / MANIFEST).read_text())["files"]
    meta = front_matter(out / "README.md")
    want = {"license": "apache-2.0", "license_name": "MiniCPM Model License",
            "license_link": "https://github.com/OpenBMB/MiniCPM/blob/main/MiniCPM%20Model%20License.md",
            "language": ["en", "zh"], "base_model": REPO, "library_name": "transformers",
            "pipeline_tag": "text-generation"}
    assert {k: meta.get(k) for k in want} == want
    assert meta.get("base_model_relation") == relation
    assert {"minicpm", "minicpm-convert"} | tags <= set(meta["tags"])
    body = (out / "README.md").read_text(encoding="utf-8")
    assert f"[{REPO}](https://huggingface.co/{REPO})" in body and "Not verified yet" in body
    if command[0] == "to-int4":
        report = json.loads((out / "quantization_report.json").read_text())
        assert "## Quantization" in body and "| q_proj |" in body and report


def test_a_local_source_has_no_base_model(fixture_path, tmp_path):
    """The Hub refuses a base_model that is not a repo: a plain folder has no id, so none is written."""
    code, _, err = run_cli("to-llama", fixture_path("tiny"), tmp_path / "llama", "-q")
    assert code == 0, err
    meta = front_matter(tmp_path / "llama" / "README.md")
    assert "base_model" not in meta and "license" not in meta and meta["library_name"] == "transformers"


def test_gguf_card_beside_the_file_and_verify_fills_in_the_figures(hub_src, tmp_path):
    out = tmp_path / "gguf"
    out.mkdir()
    code, _, err = run_cli("to-gguf", hub_src, out / "m.gguf", "--quant", "q4_K_M", "--card", "--split-max-tensors",
                           "20", "--metadata", _override(tmp_path), "-q")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
    meta = front_matter(out / "README.md")
    assert (meta["library_name"], meta["base_model"], meta["base_model_relation"]) == ("gguf", REPO, "quantized")
    assert {"gguf", "q4_k_m"} <= set(meta["tags"]) and meta["quantized_by"] == "Tester"
    body = (out / "README.md").read_text(encoding="utf-8")
    assert "llama-cli -m m-00001-of-00002.gguf" in body and "`m-00002-of-00002.gguf`" in body
    llama = tmp_path / "llama"
    assert run_cli("to-llama", hub_src, llama, "-q")[0] == 0
    code, out_text, err = run_cli("verify", hub_src, out / "m-00001-of-00002.gguf", llama, "--card",
                                  "--tokens", "1,20,300,400,500,600,700,800,900,1000")
    assert code == 0, out_text + err
    for card in (out / "README.md", llama / "README.md"):
        body = card.read_text(encoding="utf-8")
        assert "Not verified yet" not in body and "| verdict | pass |" in body and "| KL divergence | mean" in body
        assert f"wrote the figures into {card}" in err
        front_matter(card)  # still a card the Hub reads
    assert "38 tensors within the error bound" in (out / "README.md").read_text(encoding="utf-8")


def _override(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({"general.quantized_by": "Tester"}))
    return path


def test_a_user_readme_survives_force_and_ours_is_replaced(fixture_path, tmp_path):
    src, out = fixture_path("tiny"), tmp_path / "llama"
    assert run_cli("to-llama", src, out, "-q")[0] == 0
    # ours is replaced by --force (it is in the manifest)
    assert run_cli("to-llama", src, out, "--dtype", "float32", "--force", "-q")[0] == 0
    assert "(Llama format, float32)" in (out / "README.md").read_text(encoding="utf-8")
    # a user's own README (not in the manifest) is kept, and the new export brings none
    (out / "README.md").write_text("my own card")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"].remove("README.md")
    (out / MANIFEST).write_text(json.dumps(manifest))
    code, _, err = run_cli("to-llama", src, out, "--force", "-q")
    assert code == 0, err
    assert (out / "README.md").read_text() == "my own card"
    assert "README.md: kept yours (minicpm-convert did not write it); no model card written" in err
    assert "README.md" not in json.loads((out / MANIFEST).read_text())["files"]
    code, _, err = run_cli("verify", src, out, "--card", "--tokens", "1,20,300")
    assert code == 0 and "no model card minicpm-convert wrote; --card left it alone" in err, err
    assert (out / "README.md").read_text() == "my own card"


def test_gguf_card_never_replaces_a_readme_we_did_not_write(fixture_path, tmp_path):
    src = fixture_path("tiny")
    (tmp_path / "README.md").write_text("my own card")
    for force in ([], ["--force"]):
        code, _, err = run_cli("to-gguf", src, tmp_path / "m.gguf", "--quant", "q8_0", "--card", *force, "-q")
        assert code == 2 and "README.md" in err, err
    assert "was not written by minicpm-convert" in err and not (tmp_path / "m.gguf").exists()
    assert (tmp_path / "README.md").read_text() == "my own card"
    (tmp_path / "README.md").unlink()
    assert run_cli("to-gguf", src, tmp_path / "m.gguf", "--quant", "q8_0", "--card", "-q")[0] == 0
    code, _, err = run_cli("to-gguf", src, tmp_path / "m.gguf", "--quant", "q8_0", "--card", "-q")
    assert code == 2 and "already exists" in err
    assert run_cli("to-gguf", src, tmp_path / "m.gguf", "--quant", "q4_0", "--card", "--force", "-q")[0] == 0
    assert "GGUF (Q4_0)" in (tmp_path / "README.md").read_text(encoding="utf-8")
