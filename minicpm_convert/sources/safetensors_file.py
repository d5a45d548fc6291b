"""A strict, lazy safetensors reader and a streaming writer.

We parse the format ourselves (it is 8 bytes of header length, a JSON header and raw data) so
that every defect of a stranger's file becomes one clear error, and so that tensors are views
of a memory map: reading a 5 GB checkpoint never holds more than the tensor in use.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import numpy as np
import torch

from ..errors import ConvertError

# safetensors dtype name -> (torch dtype, numpy dtype of the raw bytes, item size)
DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "F64": (torch.float64, np.dtype("<f8")),
    "F32": (torch.float32, np.dtype("<f4")),
    "F16": (torch.float16, np.dtype("<f2")),
    "BF16": (torch.bfloat16, np.dtype("<u2")),
    "I64": (torch.int64, np.dtype("<i8")),
    "I32": (torch.int32, np.dtype("<i4")),
    "I16": (torch.int16, np.dtype("<i2")),
    "I8": (torch.int8, np.dtype("i1")),
    "U8": (torch.uint8, np.dtype("u1")),
    "BOOL": (torch.bool, np.dtype("?")),
}
TORCH_TO_ST = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit


class SafetensorsFile:
    """One .safetensors file: validated header, tensors as memory-mapped views."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise ConvertError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
                n = int.from_bytes(prefix, "little")
                if n > size - 8:
                    raise ConvertError(
                        f"{self.path}: header length {n} runs past the end of the file ({size} bytes)")
                if n > MAX_HEADER_BYTES:
                    raise ConvertError(f"{self.path}: header length {n} is larger than the 100 MB limit")
                raw = f.read(n)
        except OSError as exc:
            raise ConvertError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ConvertError(f"{self.path}: safetensors header is not valid JSON") from None
        if not isinstance(header, dict):
            raise ConvertError(f"{self.path}: safetensors header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_size = size - self._data_start
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        spans = []
        for name, entry in header.items():
            dtype, shape, begin, end = self._check_entry(name, entry, data_size)
            self._entries[name] = (dtype, shape, begin, end)
            if end > begin:
                spans.append((begin, end, name))
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise ConvertError(f"{self.path}: tensors '{n0}' and '{n1}' overlap in the data section")
        self._mmap: np.memmap | None = None
        self._fd: int | None = None
        self._fd_lock = threading.Lock()

    def _check_entry(self, name: str, entry, data_size: int):
        where = f"{self.path}: tensor '{name}'"
        if not isinstance(entry, dict):
            raise ConvertError(f"{where}: header entry is not an object")
        dtype = entry.get("dtype")
        if dtype not in DTYPES:
            raise ConvertError(f"{where}: unknown dtype {dtype!r}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise ConvertError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        offsets = entry.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise ConvertError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
        begin, end = offsets
        nbytes = math.prod(shape) * DTYPES[dtype][1].itemsize  # Python ints: a huge shape cannot wrap
        if begin < 0 or end < begin:
            raise ConvertError(f"{where}: data_offsets {offsets} are out of order")
        if end - begin != nbytes:
            raise ConvertError(f"{where}: data_offsets span {end - begin} bytes but shape {shape} "
                               f"of {dtype} needs {nbytes}")
        if end > data_size:
            raise ConvertError(f"{where}: data runs past the end of the file "
                               f"(needs {end} bytes of data, file has {data_size}; truncated?)")
        return dtype, tuple(shape), begin, end

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entries[name][0]][0]

    def get(self, name: str) -> torch.Tensor:
        """A tensor viewing the mapped file (copy-on-write, so the file is never modified)."""
        dtype, shape, begin, end = self._entries[name]
        torch_dtype, np_dtype = DTYPES[dtype]
        if end == begin:
            return torch.zeros(shape, dtype=torch_dtype)
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="c")
        start = self._data_start + begin
        raw = self._mmap[start:self._data_start + end]
        if start % np_dtype.itemsize:  # misaligned data cannot be viewed in place
            raw = raw.copy()
        tensor = torch.from_numpy(raw.view(np_dtype).reshape(shape))
        return tensor.view(torch.bfloat16) if torch_dtype is torch.bfloat16 else tensor

    def read_rows(self, name: str, start: int | None = None, stop: int | None = None,
                  memory: Callable[[int], np.ndarray] | None = None) -> torch.Tensor:
        """Rows [start, stop) (slice semantics on the first axis) read into fresh memory, or into
        `memory(nbytes)` (a uint8 array) when given.

        Unlike the mapped view of `get`, this leaves no file pages in the process (a memory map
        counts every page it touched in the resident set), and pread is safe from any thread."""
        dtype, shape, begin, end = self._entries[name]
        torch_dtype, np_dtype = DTYPES[dtype]
        if not shape or end == begin:
            return self.get(name)[start:stop]
        lo, hi, _ = slice(start, stop).indices(shape[0])
        hi = max(lo, hi)
        row_bytes = (end - begin) // shape[0]
        if memory is None:
            out = np.empty((hi - lo, *shape[1:]), dtype=np_dtype)
        else:
            out = memory((hi - lo) * row_bytes).view(np_dtype).reshape(hi - lo, *shape[1:])
        view = memoryview(out).cast("B")
        offset = self._data_start + begin + lo * row_bytes
        fd = self._file()
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise ConvertError(f"{self.path}: file ended while reading tensor '{name}' (truncated?)")
            done += n
        tensor = torch.from_numpy(out)
        return tensor.view(torch.bfloat16) if torch_dtype is torch.bfloat16 else tensor

    def _file(self) -> int:
        with self._fd_lock:
            if self._fd is None:
                try:
                    self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                except OSError as exc:
                    raise ConvertError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
            return self._fd

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The little-endian bytes of a contiguous tensor, without a copy where possible."""
    t = tensor.contiguous()
    if t.dtype is torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def safetensors_header(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                       metadata: dict[str, str] | None = None) -> bytes:
    """Header bytes (length prefix included) for tensors written in the given order."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer does
    return len(blob).to_bytes(8, "little") + blob


def write_tensor(f: BinaryIO, tensor: torch.Tensor) -> None:
    f.write(tensor_bytes(tensor))
