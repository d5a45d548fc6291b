"""The checkpoint's vocabulary as llama.cpp's GGUF keys (tokenizer.ggml.*).

The reference is the tokenizer the checkpoint ships, as transformers and `tokenizers` load it
(`tokenizer.json`): llama.cpp on the GGUF must give its ids. Two kinds, as llama.cpp knows them:

- SentencePiece (`tokenizer.model`: MiniCPM 1/2/3/4): `tokenizer.ggml.model = llama`, below.
- byte-level BPE (`tokenizer.json` only: MiniCPM5): `tokenizer.ggml.model = gpt2`, in `bpe.py`.

Special token ids, add_bos/add_eos and the chat template come from the HF files (gguf-py's
`SpecialVocab`, as llama.cpp's converter reads them); every id `generation_config.json` stops
at is made an end-of-generation token of llama.cpp's (`eos`, then `eot`, `eom`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGUFWriter, SpecialVocab, TokenType

from ...errors import ConvertError
from ...sources.tokenizer import load_sentencepiece

# sentencepiece_model.proto's SentencePiece.Type -> GGUF token type. USER_DEFINED (4) is NORMAL:
# tokenizer.json (OpenBMB's, built by transformers' converter) holds SentencePiece's user-defined
# pieces ("，", "\n", "<reserved_1>", ...) as ordinary vocabulary reached by merges, while
# llama.cpp splits a USER_DEFINED token out of the text first and re-adds its space prefix after
# it ("你好，世界" would gain a "▁" before "世界"). llama.cpp's converter types them NORMAL too.
_SP_TYPES = {1: TokenType.NORMAL, 2: TokenType.UNKNOWN, 3: TokenType.CONTROL, 4: TokenType.NORMAL,
             5: TokenType.UNUSED, 6: TokenType.BYTE}
PAD_SCORE = -10000.0  # llama.cpp's converter: ids beyond the tokenizer's pieces are "[PAD{i}]"
ADDED_SCORE = -1000.0  # ... and an added token scores -1000, whatever its piece scored


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str  # tokenizer.ggml.pre
    tokens: list[bytes]
    types: list[int]
    scores: list[float] | None = None  # SentencePiece only
    merges: list[str] = field(default_factory=list)  # BPE only
    add_space_prefix: bool | None = None  # SentencePiece only: the dummy "▁" before a text


@dataclass(frozen=True)
class AddedToken:
    content: str
    special: bool


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return data


def added_tokens(folder: Path) -> dict[int, AddedToken]:
    """Tokens added on top of the model's vocabulary, by id: tokenizer.json's `added_tokens`,
    then added_tokens.json, then tokenizer_config.json's `added_tokens_decoder` (which wins, as
    in llama.cpp's converter)."""
    found: dict[int, AddedToken] = {}

    def put(token_id, content, special, where: Path) -> None:
        try:
            token_id = int(token_id)
        except (TypeError, ValueError):
            raise ConvertError(f"{where}: added token id {token_id!r} is not an integer") from None
        if not isinstance(content, str) or token_id < 0:
            raise ConvertError(f"{where}: added token {token_id} has no text content")
        found[token_id] = AddedToken(content, bool(special))

    tok_json = folder / "tokenizer.json"
    if tok_json.is_file():
        for tok in read_json(tok_json).get("added_tokens") or []:
            if isinstance(tok, dict):
                put(tok.get("id"), tok.get("content"), tok.get("special"), tok_json)
    added_json = folder / "added_tokens.json"
    if added_json.is_file():
        for content, token_id in read_json(added_json).items():
            put(token_id, content, found.get(token_id, AddedToken("", False)).special, added_json)
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        decoder = read_json(cfg_path).get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise ConvertError(f"{cfg_path}: 'added_tokens_decoder' is not an object")
        for token_id, tok in decoder.items():
            if not isinstance(tok, dict):
                raise ConvertError(f"{cfg_path}: added token {token_id} is not an object")
            put(token_id, tok.get("content"), tok.get("special"), cfg_path)
    return found


def looks_special(text: str) -> bool:
    """Added tokens llama.cpp's converter makes CONTROL even when not marked special (<|im_end|>)."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>")) or (text.startswith("<unused") and text.endswith(">")))


def sentencepiece_vocab(folder: Path, vocab_size: int) -> Vocab:
    """Every piece with its score and type, then the added tokens, padded with [PAD{i}] (unused)
    up to vocab_size: the tokens, scores and types llama.cpp's converter writes."""
    path = folder / "tokenizer.model"
    load_sentencepiece(path)  # a clear error for a corrupt file before the proto parse
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    if len(proto.pieces) > vocab_size:
        raise ConvertError(f"{path}: has {len(proto.pieces)} pieces but config.json vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [PAD_SCORE] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for i, piece in enumerate(proto.pieces):
        tokens[i] = piece.piece.encode("utf-8")
        scores[i] = piece.score
        types[i] = int(_SP_TYPES.get(piece.type, TokenType.NORMAL))
    for token_id, tok in sorted(added_tokens(folder).items()):
        if token_id >= vocab_size:
            raise ConvertError(f"{folder}: added token {token_id} ({tok.content!r}) is outside vocab_size {vocab_size}")
        control = tok.special or looks_special(tok.content)
        # A user-defined added token is matched in raw text, where spaces are still spaces.
        text = tok.content if control else tok.content.replace("\u2581", " ")
        tokens[token_id] = text.encode("utf-8")
        scores[token_id] = ADDED_SCORE
        types[token_id] = int(TokenType.CONTROL if control else TokenType.USER_DEFINED)
    return Vocab("llama", "default", tokens, types, scores, add_space_prefix=space_prefix(folder, proto))


def space_prefix(folder: Path, proto) -> bool:
    """Whether the reference tokenizer puts a "▁" before a text (llama.cpp's add_space_prefix, which
    it also applies after every special token, as tokenizer.json does to each text segment).

    tokenizer.json decides when the checkpoint ships one: OpenBMB's prepend "▁" in its normalizer
    (`Prepend`) although their tokenizer.model says add_dummy_prefix false; a Metaspace
    pre-tokenizer says it with its prepend_scheme. Without tokenizer.json, the SentencePiece model."""
    tok_json = folder / "tokenizer.json"
    if not tok_json.is_file():
        return bool(proto.normalizer_spec.add_dummy_prefix)
    data = read_json(tok_json)

    def steps(node, key):  # a Sequence's steps, or the one step
        if not isinstance(node, dict):
            return []
        if node.get("type") == "Sequence":
            return [s for s in node.get(key) or [] if isinstance(s, dict)]
        return [node]

    normalizers = steps(data.get("normalizer"), "normalizers")
    pre = steps(data.get("pre_tokenizer"), "pretokenizers")
    if any(n.get("type") == "Prepend" and n.get("prepend") == "\u2581" for n in normalizers):
        return True
    return any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
               and p.get("add_prefix_space", True) for p in pre)


def read_vocab(folder: Path, vocab_size: int) -> Vocab:
    """The vocabulary of the checkpoint in `folder` (tokenizer.model, else tokenizer.json)."""
    if (folder / "tokenizer.model").is_file():
        return sentencepiece_vocab(folder, vocab_size)
    if (folder / "tokenizer.json").is_file():
        from .bpe import bpe_vocab
        return bpe_vocab(folder, vocab_size)
    raise ConvertError(f"{folder}: no tokenizer.model or tokenizer.json (needed for the GGUF vocabulary)")


def generation_eos_ids(folder: Path) -> list[int]:
    """The ids generation stops at (generation_config.json's eos_token_id, an int or a list)."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return []
    eos = read_json(path).get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    return [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]


def add_vocab(writer: GGUFWriter, folder: Path, vocab_size: int) -> None:
    vocab = read_vocab(folder, vocab_size)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    # gguf-py reads special ids, add_bos/add_eos and the chat template from the HF files.
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    special = SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    # llama.cpp stops at eos, eot and eom (and at tokens it recognises by text, <|im_end|> ...):
    # the other ids generation_config.json stops at go into the slots that are free.
    stops = [i for i in generation_eos_ids(folder) if 0 <= i < vocab_size]
    eos = special.special_token_ids.get("eos")
    extra = [i for i in dict.fromkeys(stops) if i != eos]
    if eos is None and extra:
        writer.add_eos_token_id(extra.pop(0))
    if len(extra) > 2:
        raise ConvertError(f"{folder / 'generation_config.json'}: eos_token_id lists {len(stops)} ids; a GGUF "
                           "can name at most three (eos, eot, eom)")
    for add, token_id in zip((writer.add_eot_token_id, writer.add_eom_token_id), extra):
        add(token_id)
