"""SentencePiece tokenizer files: loading with a clear error."""

from __future__ import annotations

from pathlib import Path

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


def check_tokenizer(folder: Path, vocab_size: int) -> None:
    """A tokenizer.model beside the weights must load and fit in vocab_size (ids index the embedding)."""
    path = Path(folder) / "tokenizer.model"
    if not path.is_file():
        return
    n = load_sentencepiece(path).get_piece_size()
    if n > vocab_size:
        raise ConvertError(f"{path}: has {n} pieces but config.json vocab_size is {vocab_size}")
