"""The SentencePiece vocabulary as llama.cpp's GGUF keys (tokenizer.ggml.*)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFWriter, SpecialVocab, TokenType

from ...errors import ConvertError
from ...sources.tokenizer import load_sentencepiece

# sentencepiece_model.proto's SentencePiece.Type -> GGUF token type
_SP_TYPES = {1: TokenType.NORMAL, 2: TokenType.UNKNOWN, 3: TokenType.CONTROL, 4: TokenType.USER_DEFINED,
             5: TokenType.UNUSED, 6: TokenType.BYTE}


@dataclass
class Vocab:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]


def sentencepiece_vocab(folder: Path, vocab_size: int) -> Vocab:
    """Every piece with its score and type, padded with [PAD{i}] (unused) up to vocab_size."""
    path = folder / "tokenizer.model"
    if not path.is_file():
        if (folder / "tokenizer.json").is_file():
            raise ConvertError(f"{folder}: no tokenizer.model; converting tokenizer.json to a SentencePiece "
                               "vocabulary is not supported (it cannot be done faithfully for this family)")
        raise ConvertError(f"{folder}: no tokenizer.model (needed for the GGUF vocabulary)")
    load_sentencepiece(path)  # a clear error for a corrupt file before the proto parse
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    n = len(proto.pieces)
    if n > vocab_size:
        raise ConvertError(f"{path}: has {n} pieces but config.json vocab_size is {vocab_size}")
    vocab = Vocab([], [], [])
    for piece in proto.pieces:
        vocab.tokens.append(piece.piece.encode("utf-8"))
        vocab.scores.append(piece.score)
        vocab.types.append(int(_SP_TYPES.get(piece.type, TokenType.NORMAL)))
    _apply_added_tokens(folder, vocab, vocab_size)
    for i in range(len(vocab.tokens), vocab_size):
        vocab.tokens.append(f"[PAD{i}]".encode())
        vocab.scores.append(-1000.0)
        vocab.types.append(int(TokenType.UNUSED))
    return vocab


def _apply_added_tokens(folder: Path, vocab: Vocab, vocab_size: int) -> None:
    """Tokens added beyond the SentencePiece model (tokenizer_config.json added_tokens_decoder)."""
    cfg_path = folder / "tokenizer_config.json"
    if not cfg_path.is_file():
        return
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{cfg_path}: not valid JSON ({exc})") from None
    added = cfg.get("added_tokens_decoder") or {}
    extra = sorted((int(i), tok) for i, tok in added.items() if int(i) >= len(vocab.tokens))
    for token_id, tok in extra:
        if token_id >= vocab_size:
            raise ConvertError(f"{cfg_path}: added token {token_id} is outside vocab_size {vocab_size}")
        while len(vocab.tokens) < token_id:
            i = len(vocab.tokens)
            vocab.tokens.append(f"[PAD{i}]".encode())
            vocab.scores.append(-1000.0)
            vocab.types.append(int(TokenType.UNUSED))
        vocab.tokens.append(str(tok["content"]).encode("utf-8"))
        vocab.scores.append(-1000.0)
        vocab.types.append(int(TokenType.CONTROL if tok.get("special") else TokenType.USER_DEFINED))


def add_vocab(writer: GGUFWriter, folder: Path, vocab_size: int) -> None:
    vocab = sentencepiece_vocab(folder, vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    # gguf-py reads special ids, add_bos/add_eos and the chat template from the HF files.
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    SpecialVocab(folder, load_merges=False, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
