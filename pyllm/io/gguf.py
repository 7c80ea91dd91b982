"""A GGUF reader: the header, every metadata key and the tensor table, each read checked against
the file's size, so a truncated or corrupt file is a clear ValueError, never an out-of-bounds read;
and each tensor's bytes, located and checked against the file.

Not a writer, and not what the tensors mean (gguf_model.py maps them to a model, tokenizer_files.py
reads the vocabulary); see https://github.com/ggml-org/ggml/blob/master/docs/gguf.md.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pyllm.kernels import GGML_TYPES

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

# value type -> (struct format, size) for the fixed-size scalars
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]   # GGUF order: fastest-varying dimension first (ggml's ne[])
    type: int                # ggml type id (0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0, ...)
    offset: int              # byte offset from the start of the data section


class GGUFFile:
    """An opened GGUF file: `metadata` (key -> value) and `tensors` (name -> TensorInfo).

    Arrays of numbers come back as Python lists; strings are decoded as UTF-8 (with
    surrogateescape, so a malformed token string still round-trips to its bytes).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise ValueError(f"{self.path}: not a GGUF file ({size} bytes is too short for a header)")
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = size
        self._pos = 0
        if self._bytes(4, "magic") != MAGIC:
            raise ValueError(f"{self.path}: not a GGUF file (bad magic)")
        self.version = self._scalar(4, "version")
        if self.version not in SUPPORTED_VERSIONS:
            raise ValueError(f"{self.path}: GGUF version {self.version} is not supported "
                             f"(supported: {SUPPORTED_VERSIONS})")
        n_tensors = self._scalar(10, "tensor count")
        n_kv = self._scalar(10, "metadata count")
        if n_kv > size or n_tensors > size:
            raise ValueError(f"{self.path}: corrupt header (counts {n_kv}, {n_tensors} exceed the file)")
        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = self._string(f"metadata key {i}")
            if key in self.metadata:
                raise ValueError(f"{self.path}: metadata key {key!r} appears twice")
            self.metadata[key] = self._value(self._scalar(4, f"type of {key}"), key)
        self.tensors: dict[str, TensorInfo] = {}
        for i in range(n_tensors):
            name = self._string(f"tensor name {i}")
            n_dims = self._scalar(4, f"dimensions of {name}")
            if n_dims > 8:
                raise ValueError(f"{self.path}: tensor {name!r} claims {n_dims} dimensions")
            shape = tuple(self._scalar(10, f"shape of {name}") for _ in range(n_dims))
            ttype = self._scalar(4, f"type of {name}")
            offset = self._scalar(10, f"offset of {name}")
            if name in self.tensors:
                raise ValueError(f"{self.path}: tensor {name!r} appears twice")
            self.tensors[name] = TensorInfo(name, shape, ttype, offset)
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or \
                alignment & (alignment - 1):
            raise ValueError(f"{self.path}: general.alignment {alignment!r} is not a power of two")
        self.data_offset = (self._pos + alignment - 1) // alignment * alignment
        self._check_ranges()

    def _check_ranges(self) -> None:
        """Every tensor of a type pyllm reads lies inside the file, and no two share a byte (as
        ggml's reader requires of them); tensors of other types are refused when read."""
        spans = []
        for info in self.tensors.values():
            if info.type not in GGML_TYPES:
                continue
            start = self.data_offset + info.offset
            end = start + self.nbytes(info)
            if end > len(self._buf):
                raise ValueError(f"{self.path}: tensor {info.name} spans bytes {start}..{end}, past the end of the "
                                 f"file ({len(self._buf)} bytes): truncated or corrupt")
            spans.append((start, end, info.name))
        spans.sort()
        for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
            if start < end:
                raise ValueError(f"{self.path}: tensors {name} and {other} overlap (bytes from {start} to {end})")

    def close(self) -> None:
        self._buf.close()

    def maps(self, array: np.ndarray) -> bool:
        """Whether array may be a view of this file's mapping (it must stay open while one is used)."""
        if self._buf.closed:
            return False
        return np.may_share_memory(array, np.frombuffer(self._buf, np.uint8))

    def nbytes(self, info: TensorInfo) -> int:
        """Bytes of a tensor of a type pyllm reads (whole blocks), else a ValueError naming it."""
        t = GGML_TYPES.get(info.type)
        if t is None:
            raise ValueError(f"{self.path}: tensor {info.name} has ggml type {info.type}, which pyllm does not "
                             f"read (it reads {', '.join(t.name for t in GGML_TYPES.values())})")
        if not info.shape or info.shape[0] % t.block_values:
            raise ValueError(f"{self.path}: tensor {info.name}: rows of {info.shape[:1]} values are not whole "
                             f"{t.name} blocks of {t.block_values}")
        return math.prod(info.shape) // t.block_values * t.block_bytes   # Python ints: no overflow

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes: a uint8 view of the mapped file, after checking they lie inside it."""
        start = self.data_offset + info.offset
        end = start + self.nbytes(info)
        if info.offset < 0 or end > len(self._buf):
            raise ValueError(f"{self.path}: tensor {info.name} spans bytes {start}..{end}, past the end of the "
                             f"file ({len(self._buf)} bytes): truncated or corrupt")
        return np.frombuffer(self._buf, np.uint8, end - start, start)

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------- checked reads

    def _bytes(self, n: int, what: str) -> bytes:
        end = self._pos + n
        if n < 0 or end > len(self._buf):
            raise ValueError(f"{self.path}: truncated or corrupt file: reading {what} needs bytes "
                             f"{self._pos}..{end}, the file has {len(self._buf)}")
        out = self._buf[self._pos:end]
        self._pos = end
        return out

    def _scalar(self, vtype: int, what: str):
        fmt, n = _SCALARS[vtype]
        return struct.unpack(fmt, self._bytes(n, what))[0]

    def _string(self, what: str) -> str:
        n = self._scalar(10, f"length of {what}")
        return self._bytes(n, what).decode("utf-8", errors="surrogateescape")

    def _value(self, vtype: int, key: str):
        if vtype in _SCALARS:
            return self._scalar(vtype, key)
        if vtype == _STRING:
            return self._string(key)
        if vtype == _ARRAY:
            item_type = self._scalar(4, f"item type of {key}")
            count = self._scalar(10, f"length of {key}")
            if count > len(self._buf):
                raise ValueError(f"{self.path}: corrupt array {key!r} (claims {count} items)")
            if item_type in _SCALARS:  # one unpack for the whole array
                fmt, n = _SCALARS[item_type]
                raw = self._bytes(n * count, key)
                return list(struct.unpack(f"<{count}{fmt[1]}", raw))
            return [self._value(item_type, key) for _ in range(count)]
        raise ValueError(f"{self.path}: metadata {key!r} has unknown value type {vtype}")
