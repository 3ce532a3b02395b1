"""A lean GGUF reader: metadata, tensor table, and one tensor at a time dequantised to float32.

Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), little-endian:
    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: string, value_type u32, value)           string = u64 length + utf-8 bytes
    n_tensors x (name: string, n_dims u32, dims u64[n_dims] (fastest first), ggml_type u32, offset u64)
    padding to `general.alignment` (default 32), then the tensor data (offsets relative to it).

`gguf.GGUFReader` wraps every token string of the vocabulary in numpy views (seconds for a
49k-token vocabulary); this reader skips string arrays, keeping only their length, and leaves
the type tables and dequantisation to the `gguf` package.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any

import gguf
import numpy as np

_MAGIC = b"GGUF"
_SCALARS = {  # gguf.GGUFValueType -> struct format
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS


@dataclasses.dataclass(frozen=True)
class StringArray:
    """A metadata array of strings (e.g. the vocabulary), kept as its length only."""

    length: int


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """shape: numpy order (slowest first), i.e. GGUF dims reversed; start: absolute byte offset."""

    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    start: int
    nbytes: int


class _Cursor:
    def __init__(self, buf: memoryview, path: str, keep_strings: bool = False):
        self.buf, self.pos, self.path, self.keep_strings = buf, 0, path, keep_strings

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise ValueError(
                f"{self.path}: truncated GGUF file (header needs byte {self.pos + n}, file has {len(self.buf)})"
            )
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ValueError(f"{self.path}: corrupt GGUF metadata (value type {vtype} at byte {self.pos})")
        etype, n = self.scalar("<I"), self.scalar("<Q")
        if etype == _STRING:
            if self.keep_strings:
                return [self.string() for _ in range(n)]
            for _ in range(n):  # skip; only the count is kept
                self.take(self.scalar("<Q"))
            return StringArray(n)
        if etype in _NUMPY:
            dtype = np.dtype(_NUMPY[etype])
            return np.frombuffer(self.take(n * dtype.itemsize), dtype).tolist()
        return [self.value(etype) for _ in range(n)]  # nested arrays: rare, parse generically


class GgufFile:
    """Metadata (`fields`) and tensor table (`tensors`, by name) of a GGUF file; `read` loads one.

    keep_strings: metadata keys whose string arrays are decoded (the tokenizer's vocabulary and
    merges); every other string array stays a `StringArray` count.
    """

    def __init__(self, path: str, keep_strings: tuple[str, ...] = ()):
        self.path = os.fspath(path)
        # memmap: tensor bytes are paged in only when read (an empty file cannot be mapped).
        self._data = np.memmap(self.path, mode="r") if os.path.getsize(self.path) else np.zeros(0, np.uint8)
        cur = _Cursor(memoryview(self._data), self.path)
        if bytes(cur.take(4)) != _MAGIC:
            raise ValueError(f"{self.path}: not a GGUF file (bad magic)")
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {version} not supported (2, 3; little-endian only)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            cur.keep_strings = key in keep_strings
            self.fields[key] = cur.value(cur.scalar("<I"))
        cur.keep_strings = False
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if n_dims > _MAX_DIMS:  # before reading dims: a corrupt count could be 4 billion
                raise ValueError(f"{self.path}: tensor {name} has {n_dims} dims (GGUF allows at most {_MAX_DIMS})")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
        align = self.fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
            raise ValueError(f"{self.path}: general.alignment is {align!r}; ggml needs a power of two")
        data_start = -(-cur.pos // align) * align
        self.tensors = self._tensor_table(infos, align, data_start)

    def _tensor_table(self, infos: list, align: int, data_start: int) -> dict[str, TensorInfo]:
        """TensorInfo by name, every entry checked against its type, the alignment, the file size
        and the other tensors, so that a corrupt table fails here and not half-way through a load."""
        tensors: dict[str, TensorInfo] = {}
        for name, dims, qtype, offset in infos:
            where = f"{self.path}: tensor {name}"
            if name in tensors:
                raise ValueError(f"{where} appears twice in the tensor table")
            try:
                qtype = gguf.GGMLQuantizationType(qtype)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise ValueError(f"{where} has unknown ggml type {qtype}") from None
            # dims are u64: 0 or a "negative" one (top bit set) is corruption, not a shape.
            if any(d == 0 or d >= 2**63 for d in dims):
                raise ValueError(f"{where} has dims {dims} (each must be in 1 .. 2^63-1)")
            n = 1
            for d in dims:  # Python ints: no int64 overflow
                n *= d
            row = dims[0] if dims else 1
            if row % block:  # rows are whole blocks, so the element count is too
                raise ValueError(
                    f"{where} has {row} elements per row ({n} in all), not a multiple of the "
                    f"{qtype.name} block of {block}"
                )
            if offset >= 2**63:
                raise ValueError(f"{where} has offset {offset} (negative as int64), before the data section")
            if offset % align:
                raise ValueError(f"{where} has offset {offset}, not a multiple of general.alignment={align}")
            nbytes = n // block * type_size
            info = TensorInfo(name, qtype, tuple(int(d) for d in reversed(dims)), data_start + offset, nbytes)
            if info.start + nbytes > len(self._data):
                raise ValueError(
                    f"{self.path}: truncated GGUF file: tensor {name} ends at byte {info.start + nbytes}, "
                    f"file has {len(self._data)}"
                )
            tensors[name] = info
        # Data regions must not overlap. Gaps are allowed: alignment padding sits between tensors,
        # and gguf.GGUFReader reads tensors at their offsets without asking for contiguity.
        prev = None
        for t in sorted(tensors.values(), key=lambda t: (t.start, t.nbytes)):
            if prev is not None and t.start < prev.start + prev.nbytes:
                raise ValueError(
                    f"{self.path}: tensor {t.name} at bytes [{t.start}, {t.start + t.nbytes}) overlaps "
                    f"tensor {prev.name} at [{prev.start}, {prev.start + prev.nbytes})"
                )
            prev = t
        return tensors

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` dequantised to float32, numpy order. Raises ValueError for unknown types."""
        t = self.tensors[name]
        raw = self._data[t.start:t.start + t.nbytes]
        # gguf's dequantisers take rows of bytes: [..., bytes per row].
        rows = np.asarray(raw).reshape(*t.shape[:-1], -1)
        try:
            return np.asarray(gguf.quants.dequantize(rows, t.qtype), np.float32).reshape(t.shape)
        except NotImplementedError as e:
            raise ValueError(f"{self.path}: tensor {name} has unsupported type {t.qtype.name}") from e
