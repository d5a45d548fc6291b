"""The vocabularies the GGUF tokenization tests hold us to, each as a small checkpoint (one layer,
hidden 64) around real tokenizer files:

- `openbmb`: OpenBMB's MiniCPM-1B / MiniCPM3 files as shipped (../shared/data/minicpm-1b-tokenizer),
  with the `<用户>...<AI>` chat template of the MiniCPM-1B/2B sft releases (that copy has none);
- `openbmb-chatml`: the same plus MiniCPM3/4's eight ChatML tokens from id 73440 (MiniCPM4's
  73448-id vocabulary), its ChatML template, and generation stopping at `</s>` and `<|im_end|>`;
- `fixture`, `fixture-chatml`: the committed fixture tokenizer (OpenBMB's structure), plain and
  with the same ChatML tokens;
- `minicpm5`: the committed byte-level BPE tokenizer.json of the MiniCPM5-structured fixture.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from fixtures.make_fixtures import TOKENIZERS, make_config, make_llama_config, write_checkpoint
from tests.requirements import shared_data

# MiniCPM3/4's added tokens, in their order from the end of the 73440-piece vocabulary.
CHATML_TOKENS = ["<|im_end|>", "<|im_start|>", "<|tool_call|>", "<|execute_start|>", "<|execute_end|>",
                 "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")
SFT_TEMPLATE = json.loads((TOKENIZERS["sentencepiece"][0] / "tokenizer_config.json").read_text(
    encoding="utf-8"))["chat_template"]  # MiniCPM-1B/2B sft: <用户>{user}<AI>{assistant}
VOCABULARIES = ("fixture", "fixture-chatml", "openbmb", "openbmb-chatml", "minicpm5")
SENTENCEPIECE = ("fixture", "fixture-chatml", "openbmb", "openbmb-chatml")


def _copy_files(src: Path, out: Path, names) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)


def _dump(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


def _add_chatml(folder: Path, first_id: int) -> int:
    """MiniCPM4's ChatML tokens, template and stop ids on top of a SentencePiece vocabulary; the
    new vocabulary size."""
    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    for i, text in enumerate(CHATML_TOKENS, start=first_id):
        tok["added_tokens"].append({"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                                    "normalized": False, "special": True})
        cfg["added_tokens_decoder"][str(i)] = {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                                               "single_word": False, "special": True}
    cfg.update(eos_token="<|im_end|>", chat_template=CHATML_TEMPLATE)
    _dump(tok, folder / "tokenizer.json")
    _dump(cfg, folder / "tokenizer_config.json")
    _dump({"bos_token_id": 1, "eos_token_id": [2, first_id]}, folder / "generation_config.json")
    return first_id + len(CHATML_TOKENS)


def tokenizer_folder(name: str, out: Path) -> tuple[Path, int]:
    """The tokenizer files of vocabulary `name` in `out`, and its vocabulary size."""
    if name == "minicpm5":
        folder, files = TOKENIZERS["bpe"]
        _copy_files(folder, out, files)
        return out, 1216  # the fixture's vocab_size: its 1202 ids, padded (MiniCPM5: 130074 of 130560)
    if name.startswith("openbmb"):
        _copy_files(shared_data("minicpm-1b-tokenizer"), out, ("tokenizer.model", "tokenizer.json",
                                                               "tokenizer_config.json"))
        _dump({"bos_token_id": 1, "eos_token_id": 2}, out / "generation_config.json")
        cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
        _dump({**cfg, "chat_template": SFT_TEMPLATE}, out / "tokenizer_config.json")
    else:
        folder, files = TOKENIZERS["sentencepiece"]
        _copy_files(folder, out, files)
    import sentencepiece as spm

    size = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).get_piece_size()
    if name.endswith("-chatml"):
        size = _add_chatml(out, size)
    return out, size


def vocab_checkpoint(name: str, out: Path) -> Path:
    """A one-layer checkpoint (MiniCPM, or Llama for MiniCPM5) carrying vocabulary `name`."""
    folder, size = tokenizer_folder(name, out)
    dims = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                intermediate_size=128, vocab_size=size)
    config = make_llama_config(head_dim=32, **dims) if name == "minicpm5" else make_config(dim_model_base=32, **dims)
    write_checkpoint(folder, config, torch.bfloat16, seed=7)
    return folder
