"""The checkpoint's own tokenizer: loading with a clear error, and encoding text as the model does.

`tokenizer.json` is what transformers loads and what OpenBMB's checkpoints ship (MiniCPM5 ships
nothing else), so text is encoded with it (through `tokenizers`) when present: BOS and special
tokens as its post-processor and added tokens say. A checkpoint with only `tokenizer.model` is
encoded with SentencePiece, BOS first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..errors import ConvertError


def load_sentencepiece(path: Path):
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        data = Path(path).read_bytes()
        sp.LoadFromSerializedProto(data)
    except OSError as exc:
        raise ConvertError(f"{path}: cannot read ({exc.strerror})") from None
    except (RuntimeError, TypeError, ValueError):
        raise ConvertError(f"{path}: not a valid SentencePiece model (corrupt or truncated)") from None
    if sp.vocab_size() <= 0:
        raise ConvertError(f"{path}: SentencePiece model has an empty vocabulary")
    return sp


def load_tokenizer_json(path: Path):
    """tokenizer.json through the `tokenizers` library (what transformers' fast tokenizers run)."""
    from tokenizers import Tokenizer

    try:
        text = Path(path).read_text(encoding="utf-8")
        json.loads(text)
    except OSError as exc:
        raise ConvertError(f"{path}: cannot read ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path}: not valid JSON ({exc})") from None
    try:
        return Tokenizer.from_str(text)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception on a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ConvertError(f"{path}: not a tokenizer.json the tokenizers library can load ({first})") from None


def tokenizer_size(folder: Path) -> int | None:
    """The number of ids the checkpoint's tokenizer can produce (None: no tokenizer files)."""
    folder = Path(folder)
    if (folder / "tokenizer.model").is_file():
        return load_sentencepiece(folder / "tokenizer.model").get_piece_size()
    if (folder / "tokenizer.json").is_file():
        tok = load_tokenizer_json(folder / "tokenizer.json")
        return max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    return None


def check_tokenizer(folder: Path, vocab_size: int) -> None:
    """A tokenizer beside the weights must load and fit in vocab_size (ids index the embedding)."""
    folder = Path(folder)
    n = tokenizer_size(folder)
    if n is not None and n > vocab_size:
        name = "tokenizer.model" if (folder / "tokenizer.model").is_file() else "tokenizer.json"
        what = "pieces" if name == "tokenizer.model" else "token ids"
        raise ConvertError(f"{folder / name}: has {n} {what} but config.json vocab_size is {vocab_size}")


def text_encoder(folder: Path, bos_id: int | None) -> Callable[[str], list[int]]:
    """A function giving the ids the model sees for a text, BOS included as the model adds it."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        tok = load_tokenizer_json(folder / "tokenizer.json")
        return lambda text: tok.encode(text).ids
    if (folder / "tokenizer.model").is_file():
        sp = load_sentencepiece(folder / "tokenizer.model")
        bos = bos_id if bos_id is not None else sp.bos_id()
        return lambda text: [bos, *sp.encode(text)]
    raise ConvertError(f"{folder}: no tokenizer.json or tokenizer.model to encode the text; pass --tokens")
