"""The GGUF vocabulary, held to the tokenizer users already have: the checkpoint's own
`tokenizer.json`, run by `tokenizers` (what transformers' fast tokenizers run).

On 656 real texts (tests/data/tokenizer_corpus.jsonl: lines of markdown READMEs, license prose,
Chinese sentences, code, emoji, whitespace runs, numbers), llama.cpp on our GGUF must give the
reference's ids, BOS included, on at least 99.5% of them and on no fewer than on the GGUF of
llama.cpp's own converter, in both ways programs tokenize: special tokens parsed in the text (the
reference's default; llama-cli and llama-server do it with prompts) and special tokens as plain
text (`encode_special_tokens`; llama.cpp `parse_special=false`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGUFReader

from tests.conftest import ROOT, run_cli
from tests.formats.vocabularies import SENTENCEPIECE, VOCABULARIES, vocab_checkpoint
from tests.requirements import require

llama_cpp = require("llama_cpp")

CORPUS = ROOT / "tests" / "data" / "tokenizer_corpus.jsonl"
MESSAGES = [{"role": "user", "content": "你好，请介绍一下你自己。"},
            {"role": "assistant", "content": "我是 MiniCPM，一个端侧语言模型。"},
            {"role": "user", "content": "Write a haiku about the sea, then count to 3: 1, 2, 3."}]


def corpus() -> list[str]:
    return [json.loads(line)["text"] for line in CORPUS.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    """name -> (checkpoint folder, our GGUF, llama.cpp converter's GGUF or None if it refuses)."""
    from tests.llama_cpp_source import run_converter

    made = {}

    def get(name):
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            folder = vocab_checkpoint(name, root / "ckpt")
            ours = root / "ours.gguf"
            code, _, err = run_cli("to-gguf", folder, ours, "--quant", "f32", "-q")
            assert code == 0, err
            theirs = root / "llama.cpp.gguf"
            r = run_converter(folder, theirs, "f32", vocab_only=True)
            made[name] = (folder, ours, theirs if r.returncode == 0 else None, r.stderr)
        return made[name]
    return get


class Client:
    """llama.cpp's tokenizer on one GGUF (vocabulary only)."""

    def __init__(self, path: Path):
        self.model = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)

    def tokenize(self, text: str, *, special: bool, bos: bool = True) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos=bos, special=special)

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(self.model.model), token))

    def close(self):
        self.model.close()


def reference(folder: Path, parse_special: bool):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.encode_special_tokens = not parse_special
    return lambda text: tok.encode(text).ids


def agreement(gguf: Path, folder: Path, parse_special: bool) -> list[str]:
    """The corpus texts llama.cpp tokenizes differently from the reference."""
    want, client = reference(folder, parse_special), Client(gguf)
    try:
        return [t for t in corpus() if client.tokenize(t, special=parse_special) != want(t)]
    finally:
        client.close()


def test_corpus_has_every_kind_of_real_text():
    kinds = [json.loads(line)["kind"] for line in CORPUS.read_text(encoding="utf-8").splitlines()]
    assert len(kinds) >= 500
    for kind in ("markdown", "license", "chinese", "code", "emoji", "whitespace", "numbers"):
        assert kinds.count(kind) >= 30, kind


@pytest.mark.parametrize("parse_special", [True, False], ids=["special-parsed", "special-as-text"])
@pytest.mark.parametrize("name", VOCABULARIES)
def test_llama_cpp_tokenizes_our_gguf_as_the_checkpoint_tokenizer(name, parse_special, vocab):
    folder, ours, theirs, converter_error = vocab(name)
    n = len(corpus())
    ours_differ = agreement(ours, folder, parse_special)
    assert len(ours_differ) <= 0.005 * n, (f"{n - len(ours_differ)} of {n} agree; first differences: "
                                           f"{[t[:40] for t in ours_differ[:5]]}")
    if theirs is not None:
        assert len(ours_differ) <= len(agreement(theirs, folder, parse_special))
    else:  # only the BPE vocabulary: llama.cpp's converter knows MiniCPM5's pre-tokenizer by a hash
        assert name == "minicpm5" and "BPE pre-tokenizer was not recognized" in converter_error


def _kv(path: Path) -> dict:
    return {k: f.contents() for k, f in GGUFReader(path).fields.items() if k.startswith("tokenizer.")}


@pytest.mark.parametrize("name", SENTENCEPIECE)
def test_vocabulary_metadata_equals_llama_cpp_converter(name, vocab):
    """tokens, scores, types, special ids, add_bos/add_eos, chat template: as llama.cpp's converter
    writes them. The deliberate differences: we state add_space_prefix (llama.cpp's default for
    SentencePiece, and what tokenizer.json does), and make the ids generation_config.json stops at
    end-of-generation tokens (eot, eom) where llama.cpp's converter writes only eos."""
    folder, ours, theirs, _ = vocab(name)
    got, want = _kv(ours), _kv(theirs)
    assert got.pop("tokenizer.ggml.add_space_prefix") is True
    stops = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    stops = stops if isinstance(stops, list) else [stops]
    extra = [got.pop(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in got]
    assert sorted([got["tokenizer.ggml.eos_token_id"], *extra]) == sorted(set(stops))
    assert set(got) == set(want), set(got) ^ set(want)
    for key in want:
        assert got[key] == want[key], key


@pytest.mark.parametrize("name", VOCABULARIES)
def test_chat_rendered_and_tokenized_by_llama_cpp_equals_transformers(name, vocab):
    """transformers' apply_chat_template(tokenize=True) and llama.cpp tokenizing the rendered chat
    with special tokens parsed (as llama-server does) give the same ids; the GGUF carries the
    template; generation stops in llama.cpp at every id generation_config.json stops at."""
    from transformers import AutoTokenizer

    folder, ours, _, _ = vocab(name)
    hf = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    rendered = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    want = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert _kv(ours)["tokenizer.chat_template"] == json.loads(
        (folder / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    client = Client(ours)
    try:
        assert client.tokenize(rendered, special=True, bos=False) == want
        stops = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
        for token in stops if isinstance(stops, list) else [stops]:
            assert client.is_eog(token), token
        if "chatml" in name or name == "minicpm5":
            start = hf.convert_tokens_to_ids("<|im_start|>")
            assert "<|im_start|>" in rendered and start in want and not client.is_eog(start)
    finally:
        client.close()


def test_user_defined_pieces_are_ordinary_vocabulary(vocab):
    """OpenBMB's 1086 user-defined SentencePiece pieces ("，", "\\n", "<reserved_1>" ...) are ordinary
    vocabulary in its tokenizer.json: typed normal, so llama.cpp adds no space prefix after them
    (the first difference of the old typing, "你好，世界！": 1, 59320, 23523, 65, 2925, 67)."""
    folder, ours, _, _ = vocab("openbmb")
    client = Client(ours)
    try:
        assert client.tokenize("你好，世界！", special=True) == [1, 59320, 23523, 65, 2925, 67]
    finally:
        client.close()
    types = _kv(ours)["tokenizer.ggml.token_type"]
    assert types[65] == 1 and types[5] == 1  # "，" and "\n": NORMAL


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                       "use_regex": True}),
     "pre_tokenizer step 'ByteLevel' is not one llama.cpp can run"),
    (lambda t: t["pre_tokenizer"]["pretokenizers"].pop(0),
     "no llama.cpp pre-tokenizer splits text as this tokenizer.json does"),
    (lambda t: t["model"].update(ignore_merges=False), "ignore_merges false; known: minicpm5, llama-bpe"),
])
def test_unknown_bpe_pre_tokenizer_is_refused_by_name(edit, message, tmp_path):
    """A byte-level BPE vocabulary whose split llama.cpp cannot reproduce is refused, saying what
    tokenizer.json holds, rather than written with a pre-tokenizer that tokenizes differently."""
    folder = vocab_checkpoint("minicpm5", tmp_path / "ckpt")
    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    edit(tok)
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    code, _, err = run_cli("to-gguf", folder, tmp_path / "out.gguf", "--quant", "f32", "-q")
    assert code == 2 and message in err and "tokenizer.json" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out.gguf").exists()
