"""SentencePiece tokenizer files: loading with a clear error."""

from __future__ import annotations

from pathlib import Path

from .errors import ConvertError


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
