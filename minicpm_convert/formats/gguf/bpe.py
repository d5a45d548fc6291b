"""A byte-level BPE `tokenizer.json` (MiniCPM5 ships no tokenizer.model) as llama.cpp's `gpt2`
vocabulary: tokens, merges, types, and the pre-tokenizer llama.cpp must run (`tokenizer.ggml.pre`).

The pre-tokenizer is recognised from its definition in tokenizer.json (the split regexes, in
order, and `ignore_merges`), not from a hash of one vocabulary's output as llama.cpp's converter
does, so any vocabulary that splits text the same way gets the right one. A definition llama.cpp
has no pre-tokenizer for is refused, naming what was found.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gguf import TokenType

from ...errors import ConvertError
from .vocab import Vocab, added_tokens, looks_special, read_json


@dataclass(frozen=True)
class PreTokenizer:
    name: str  # tokenizer.ggml.pre, as src/llama-vocab.cpp knows it
    splits: tuple[str, ...]  # the Split regexes of tokenizer.json, in order
    ignore_merges: bool  # llama.cpp sets it for these names; tokenizer.json must agree


_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
KNOWN = (
    # MiniCPM5 (llama.cpp release b9354): digits in runs of up to 3 first, then Llama 3's split
    # with whole numbers, and a word already in the vocabulary taken whole (ignore_merges).
    PreTokenizer("minicpm5", (r"\p{N}{1,3}", _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}+")), True),
    PreTokenizer("llama-bpe", (_LLAMA3,), True),
)


def _split_patterns(pre: object, where: Path) -> tuple[tuple[str, ...], bool]:
    """The Split regexes of a pre-tokenizer and whether it ends in a byte-level step."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    patterns, byte_level = [], False
    for step in steps:
        kind = step.get("type") if isinstance(step, dict) else None
        if kind == "Split":
            pattern = step.get("pattern") or {}
            regex = pattern.get("Regex", pattern.get("String"))
            if step.get("behavior") != "Isolated" or step.get("invert") or not isinstance(regex, str):
                raise ConvertError(f"{where}: pre_tokenizer Split {step!r} is not one llama.cpp can run")
            patterns.append(regex)
        elif kind == "ByteLevel" and not step.get("use_regex", True) and not step.get("add_prefix_space"):
            byte_level = True
        else:
            raise ConvertError(f"{where}: pre_tokenizer step {kind or step!r} is not one llama.cpp can run "
                               "(Split regexes then ByteLevel without its own regex)")
    return tuple(patterns), byte_level


def recognise(tokenizer: dict, where: Path) -> PreTokenizer:
    """The llama.cpp pre-tokenizer whose definition tokenizer.json spells out."""
    patterns, byte_level = _split_patterns(tokenizer.get("pre_tokenizer"), where)
    ignore_merges = bool((tokenizer.get("model") or {}).get("ignore_merges"))
    for known in KNOWN:
        if byte_level and patterns == known.splits and ignore_merges == known.ignore_merges:
            return known
    shown = " then ".join(repr(p) for p in patterns) or "no Split"
    raise ConvertError(f"{where}: no llama.cpp pre-tokenizer splits text as this tokenizer.json does "
                       f"({shown}, ignore_merges {str(ignore_merges).lower()}; known: "
                       f"{', '.join(k.name for k in KNOWN)})")


def _merge_text(merge, where: Path) -> str:
    """A merge as llama.cpp reads it: "a b" (a space inside a part encoded as gguf-py does)."""
    if isinstance(merge, str):
        return merge
    if isinstance(merge, list) and len(merge) == 2 and all(isinstance(p, str) for p in merge):
        return " ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in merge)
    raise ConvertError(f"{where}: model.merges holds {merge!r}, not a pair")


def bpe_vocab(folder: Path, vocab_size: int) -> Vocab:
    """Tokens by id (added tokens as their text, [PAD{i}] where no token has the id), types and merges."""
    where = folder / "tokenizer.json"
    tokenizer = read_json(where)
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConvertError(f"{where}: model type {model.get('type')!r} is not a BPE vocabulary; the GGUF "
                           "vocabulary needs tokenizer.model (SentencePiece) or a byte-level BPE tokenizer.json")
    pre = recognise(tokenizer, where)
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    types = [int(TokenType.UNUSED)] * vocab_size
    for text, token_id in model["vocab"].items():
        if not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise ConvertError(f"{where}: token {text!r} has id {token_id!r}, outside vocab_size {vocab_size}")
        tokens[token_id], types[token_id] = text.encode("utf-8"), int(TokenType.NORMAL)
    for token_id, tok in sorted(added_tokens(folder).items()):
        if token_id >= vocab_size:
            raise ConvertError(f"{folder}: added token {token_id} ({tok.content!r}) is outside vocab_size {vocab_size}")
        # llama.cpp matches added tokens in the raw text, so they are stored as text, not bytes.
        tokens[token_id] = tok.content.encode("utf-8")
        types[token_id] = int(TokenType.CONTROL if tok.special or looks_special(tok.content) else TokenType.USER_DEFINED)
    merges = [_merge_text(m, where) for m in model.get("merges") or []]
    return Vocab("gpt2", pre.name, tokens, types, merges=merges)
