"""Split GGUF files as llama.cpp writes them: `NAME-00001-of-00003.gguf` ... (its converter's
`--split-max-size` / `--split-max-tensors`, and `llama-gguf-split --split`).

Every file of a set is a GGUF of its own holding `split.no` (0-based), `split.count` and
`split.tensors.count` (the tensors of the whole set); the first file holds every other key too,
the others only these three. Tensors go into files in order; a new file starts when the current
one holds `max_tensors` tensors or when the next tensor would take its tensor data past
`max_bytes` (the converter's rule, which gguf-py's writer applies; every file holds at least one
tensor). A model that fits in one file is written as one file under the plain name, without
`split.*` keys, as the converter does. llama.cpp loads a set from its first file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ...errors import ConvertError

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"
# llama.cpp's llama_split_path: "%s-%05d-of-%05d.gguf" (prefix, number from 1, count)
_MEMBER = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
OUR_KEY = "minicpm_convert.version"  # in the first file of everything to-gguf writes


@dataclass(frozen=True)
class Split:
    """--split-max-tensors / --split-max-size (0: no limit)."""

    max_tensors: int = 0
    max_bytes: int = 0

    def __bool__(self) -> bool:
        return bool(self.max_tensors or self.max_bytes)


def member_name(prefix: str, no: int, count: int) -> str:
    """File `no` (from 1) of `count`, named as llama.cpp names it."""
    return f"{prefix}-{no:05d}-of-{count:05d}.gguf"


def split_names(base: Path, count: int) -> list[Path]:
    """The files of a set of `count` written for OUT `base` (one file: `base` itself)."""
    if count == 1:
        return [base]
    return [base.with_name(member_name(base.stem, i, count)) for i in range(1, count + 1)]


def set_paths(first: Path, count: int) -> list[Path]:
    """Every file of the set whose first file is `first` (llama.cpp's llama_split_prefix rule)."""
    m = _MEMBER.match(first.name)
    if not m or int(m["no"]) != 1 or int(m["count"]) != count:
        raise ConvertError(f"{first}: the first file of a split GGUF of {count} files must be named "
                           f"{member_name('NAME', 1, count)}, as llama.cpp finds the others by it")
    return [first.with_name(member_name(m["prefix"], i, count)) for i in range(1, count + 1)]


def _fields(path: Path) -> dict:
    from gguf import GGUFReader
    reader = GGUFReader(path)
    return {k: reader.fields[k].contents() for k in (SPLIT_NO, SPLIT_COUNT, OUR_KEY) if k in reader.fields}


def written_by_us(path: Path) -> bool:
    """Whether `path` is a file of a split set minicpm-convert wrote: named as a member, holding
    its number and count, and the set's first file carries our key."""
    m = _MEMBER.match(path.name)
    if not m or not path.is_file():
        return False
    no, count = int(m["no"]), int(m["count"])
    first = path.with_name(member_name(m["prefix"], 1, count))
    try:
        mine, head = _fields(path), _fields(first)
    except Exception:  # noqa: BLE001 - not a readable GGUF: not ours
        return False
    return (mine.get(SPLIT_NO) == no - 1 and mine.get(SPLIT_COUNT) == count and OUR_KEY in head
            and head.get(SPLIT_COUNT) == count)


def other_sets(base: Path, count: int) -> list[Path]:
    """Files beside `base` named as members of a set of another size under the same name."""
    if not base.parent.is_dir():
        return []
    out = []
    for p in sorted(base.parent.iterdir()):
        m = _MEMBER.match(p.name)
        if m and m["prefix"] == base.stem and int(m["count"]) != count:
            out.append(p)
    return out
