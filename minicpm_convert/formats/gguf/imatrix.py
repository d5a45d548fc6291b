"""llama.cpp's importance-matrix files: the GGUF format `llama-imatrix` writes and `llama-quantize
--imatrix` reads, and the legacy `.dat` format.

GGUF (tools/imatrix/imatrix.cpp, `save_imatrix`): `general.type = "imatrix"`, `imatrix.datasets`
(array of strings), `imatrix.chunk_count` and `imatrix.chunk_size` (u32); per weight matrix, in
name order, `<name>.in_sum2` F32 with ggml shape (n_cols, n_mat), the sums of squared input
activations per column (and per expert: n_mat experts, 1 for a plain matrix), and
`<name>.counts` F32 with shape (1, n_mat), how many activation rows each sum holds.

Legacy `.dat` (`save_imatrix_legacy`): int32 n_entries; per entry int32 name length, the name,
int32 ncall, int32 n_values, float32 values already divided by the counts and multiplied by
ncall; then optionally int32 chunk count, int32 length and the dataset name.

:meth:`ImportanceMatrix.weights` is what llama-quantize hands to `ggml_quantize_chunk`
(tools/quantize/quantize.cpp, `load_imatrix`): per expert, in_sum2 / count (1 where the count is
0); legacy values / ncall.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import ConvertError

IN_SUM2, COUNTS = ".in_sum2", ".counts"
KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"


@dataclass
class Entry:
    sums: np.ndarray  # float32 [n_mat, n_cols]
    counts: np.ndarray  # int64 [n_mat] (GGUF: lround of the stored float; legacy: [ncall])

    def __post_init__(self):
        self.sums = np.ascontiguousarray(self.sums, np.float32).reshape(len(self.counts), -1)
        self.counts = np.asarray(self.counts, np.int64).reshape(-1)


@dataclass
class ImportanceMatrix:
    entries: dict[str, Entry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    path: str = ""  # the file it was read from

    def weights(self, name: str) -> np.ndarray | None:
        """float32 [n_mat * n_cols] for tensor ``name`` as llama-quantize computes them, or None."""
        e = self.entries.get(name)
        if e is None:
            return None
        if self.legacy:
            ncall = int(e.counts[0]) if e.counts.size else 0
            return (e.sums / np.float32(ncall) if ncall > 0 else e.sums.copy()).reshape(-1)
        count = e.counts.astype(np.float32)[:, None]  # (float) entry.counts[j]
        safe = np.where(count > 0, count, np.float32(1))
        return np.where(count > 0, e.sums / safe, np.float32(1)).astype(np.float32).reshape(-1)

    def check_finite(self) -> None:
        """llama-quantize refuses an importance matrix with non-finite values."""
        for name in self.entries:
            w = self.weights(name)
            if not np.isfinite(w).all():
                raise ConvertError(f"importance matrix: {name} holds non-finite values")


# ------------------------------------------------------------------------------ reading

def read(path: str | Path) -> ImportanceMatrix:
    """Read a GGUF or legacy `.dat` importance matrix (common_imatrix_load: GGUF when the file
    parses as one, else legacy)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConvertError(f"{path}: cannot read the importance matrix ({e.strerror})") from None
    im = _read_gguf(path) if data[:4] == b"GGUF" else _read_legacy(path, data)
    im.path = str(path)
    return im


def _read_gguf(path: Path) -> ImportanceMatrix:
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader

    try:
        r = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise ConvertError(f"{path}: not a readable GGUF importance matrix ({e})") from None
    fields = r.fields
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in fields]
    if missing:  # load_imatrix: "missing imatrix metadata"
        raise ConvertError(f"{path}: missing imatrix metadata ({', '.join(missing)})")
    if not r.tensors:
        raise ConvertError(f"{path}: no data in the importance matrix")
    out = ImportanceMatrix(datasets=list(fields[KEY_DATASETS].contents()),
                           chunk_count=int(fields[KEY_CHUNK_COUNT].contents()),
                           chunk_size=int(fields[KEY_CHUNK_SIZE].contents()))
    pairs: dict[str, dict[str, object]] = {}
    for t in r.tensors:
        for suffix in (IN_SUM2, COUNTS):
            if t.name.endswith(suffix) and len(t.name) > len(suffix):
                pairs.setdefault(t.name[: -len(suffix)], {})[suffix] = t
    for name in sorted(pairs):
        sums, counts = pairs[name].get(IN_SUM2), pairs[name].get(COUNTS)
        if sums is None or counts is None:
            raise ConvertError(f"{path}: mismatched sums and counts for {name}")
        if sums.tensor_type != T.F32 or counts.tensor_type != T.F32:
            raise ConvertError(f"{path}: sums and counts for {name} must be F32")
        c = np.asarray(counts.data, np.float32).reshape(-1)
        s = np.asarray(sums.data, np.float32).reshape(-1)
        if c.size == 0 or s.size % c.size:
            raise ConvertError(f"{path}: {name} has {s.size} sums for {c.size} counts")
        # std::lround: halves away from zero
        rounded = np.where(c >= 0, np.floor(c.astype(np.float64) + 0.5), np.ceil(c.astype(np.float64) - 0.5))
        out.entries[name] = Entry(s, rounded.astype(np.int64))
    return out


def _read_legacy(path: Path, data: bytes) -> ImportanceMatrix:
    def bad(what: str):
        return ConvertError(f"{path}: not an importance matrix ({what})")

    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise bad("truncated")
        v = struct.unpack_from(fmt, data, pos)
        pos += size
        return v

    (n,) = take("<i")
    if n < 1:
        raise bad("no entries")
    out = ImportanceMatrix(legacy=True)
    for _ in range(n):
        (length,) = take("<i")
        if length < 0 or pos + length > len(data):
            raise bad("truncated name")
        name = data[pos:pos + length].split(b"\0")[0].decode("utf-8", "replace")
        pos += length
        ncall, nval = take("<ii")
        if nval < 1:
            raise bad(f"{name}: {nval} values")
        if pos + 4 * nval > len(data):
            raise bad(f"{name}: truncated values")
        values = np.frombuffer(data, "<f4", nval, pos).astype(np.float32)
        pos += 4 * nval
        out.entries[name] = Entry(values, [ncall])
    if pos + 4 <= len(data):  # optional: chunk count and dataset name
        (out.chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if length > 0 and pos + length <= len(data):
                out.datasets.append(data[pos:pos + length].decode("utf-8", "replace"))
    return out


# ------------------------------------------------------------------------------ writing

def write(path: str | Path, im: ImportanceMatrix) -> None:
    """Write ``im`` as llama-imatrix's GGUF (entries in name order, as save_imatrix sorts them)."""
    from gguf import GGUFValueType

    w = _writer(str(path))
    w.add_type("imatrix")
    # the dataset list even when empty (add_array would drop it; llama-quantize requires the key)
    w.add_key_value(KEY_DATASETS, list(im.datasets), GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    w.add_uint32(KEY_CHUNK_COUNT, int(im.chunk_count))
    w.add_uint32(KEY_CHUNK_SIZE, int(im.chunk_size))
    for name in sorted(im.entries):
        e = im.entries[name]
        w.add_tensor(name + IN_SUM2, np.ascontiguousarray(e.sums, np.float32))  # ggml shape (n_cols, n_mat)
        w.add_tensor(name + COUNTS, e.counts.astype(np.float32).reshape(-1, 1))  # (1, n_mat)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _writer(path: str):
    """gguf-py's writer, but one that can write an empty string array (llama-imatrix writes
    imatrix.datasets even when it is empty, and llama-quantize requires the key)."""
    from gguf import GGUFValueType, GGUFWriter

    class Writer(GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer(path, arch="")  # an empty arch: no general.architecture, as llama-imatrix writes


def write_legacy(path: str | Path, im: ImportanceMatrix) -> None:
    """Write ``im`` as the legacy `.dat` (save_imatrix_legacy): values sums/count * ncall, with
    ncall the largest count over chunk_size rounded up (chunk_size 0 counts rows as calls)."""
    parts = [struct.pack("<i", len(im.entries))]
    for name in sorted(im.entries):
        e = im.entries[name]
        size = im.chunk_size or 1
        ncall = int((int(e.counts.max()) + size - 1) // size)
        count = e.counts.astype(np.float32)[:, None]
        values = np.where(count == 0, np.float32(1), e.sums) / np.where(count == 0, np.float32(1), count)
        values = (values * np.float32(ncall)).astype("<f4").reshape(-1)
        raw = name.encode()
        parts += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size), values.tobytes()]
    dataset = (im.datasets[-1] if im.datasets else "").encode()
    parts += [struct.pack("<i", int(im.chunk_count)), struct.pack("<i", len(dataset)), dataset]
    Path(path).write_bytes(b"".join(parts))
