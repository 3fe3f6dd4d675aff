"""GGUF files read directly: the metadata and the tensor directory in one pass over a memory map.

`gguf.GGUFReader` builds a numpy view per element of every metadata array: 5 s for SmolLM2's
49k-token vocabulary and merges, 5-20 s for a 262k-token one. Here the same file is read in
well under a second, and tensors stay zero-copy views of the map until they are dequantized.

Layout (v2/v3, little endian): magic "GGUF", version u32, tensor count u64, metadata count u64;
then the metadata (key string, value type u32, value); then per tensor its name, n_dims u32,
dims u64 x n_dims (innermost first), type u32 and data offset u64; then the data, aligned to
`general.alignment` (32 by default).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any

import numpy as np

# GGUF value types -> (struct format, size); 8 = string, 9 = array.
_SCALARS = {
    0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
    6: ("f", 4), 7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8),
}  # fmt: skip
_STRING, _ARRAY = 8, 9
_F32, _F16, _BF16 = 0, 1, 30  # ggml tensor types read here without the gguf package


@dataclasses.dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first): the reverse of GGUF's dims
    tensor_type: int  # ggml type id (gguf.GGMLQuantizationType)
    data: np.ndarray  # uint8 [rows, row bytes], a view of the file's map

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.tensor_type).name
        except ValueError:
            return f"type {self.tensor_type}"


@dataclasses.dataclass
class GGUFFile:
    path: str
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        try:
            values = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise ValueError(f"header runs past the end of the file at byte {self.pos}") from None
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (n,) = self.unpack("<Q")
        end = self.pos + n
        if end > len(self.buf):
            raise ValueError(f"string of {n} bytes runs past the end of the file")
        text = bytes(self.buf[self.pos : end]).decode("utf-8", errors="replace")
        self.pos = end
        return text

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<IQ")
            if etype in _SCALARS:
                fmt, size = _SCALARS[etype]
                if self.pos + size * count > len(self.buf):
                    raise ValueError(f"array of {count} values runs past the end of the file")
                arr = np.frombuffer(self.buf, "<" + fmt, count=count, offset=self.pos)
                self.pos += size * count
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        fmt, _ = _SCALARS[vtype]
        return self.unpack("<" + fmt)[0]


def _check_magic(buf: memoryview, path: str) -> None:
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (bad magic {bytes(buf[:4])!r})")


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The key/value metadata only (no tensor directory): what a tokenizer needs."""
    return _read(os.fspath(path), tensors=False).metadata


def read(path: str | os.PathLike[str]) -> GGUFFile:
    """Metadata and tensors (views of the map). Raises ValueError on a malformed file."""
    return _read(os.fspath(path), tensors=True)


def _read(path: str, *, tensors: bool) -> GGUFFile:
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    buf = memoryview(mapped)
    _check_magic(buf, path)
    cur = _Cursor(buf)
    cur.pos = 4
    version, n_tensors, n_kv = cur.unpack("<IQQ")
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version}")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        (vtype,) = cur.unpack("<I")
        meta[key] = cur.value(vtype)
    if not tensors:
        return GGUFFile(path, meta, {})
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        (n_dims,) = cur.unpack("<I")
        dims = cur.unpack(f"<{n_dims}Q")
        ttype, offset = cur.unpack("<IQ")
        infos.append((name, dims, ttype, offset))
    alignment = int(meta.get("general.alignment", 32))
    start = -(-cur.pos // alignment) * alignment
    out = {}
    for name, dims, ttype, offset in infos:
        row_bytes = _row_bytes(ttype, dims[0], name)
        rows = int(np.prod(dims[1:], dtype=np.int64))
        begin = start + offset
        end = begin + rows * row_bytes
        if end > len(mapped):
            raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
        data = mapped[begin:end].reshape(rows, row_bytes)
        out[name] = GGUFTensor(name, tuple(int(d) for d in reversed(dims)), ttype, data)
    return GGUFFile(path, meta, out)


def _row_bytes(ttype: int, row_len: int, name: str) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
    except (ValueError, KeyError):
        raise ValueError(f"tensor {name} has unknown ggml type {ttype}") from None
    if row_len % block:
        raise ValueError(f"tensor {name}: row of {row_len} values is not whole blocks of {block}")
    return row_len // block * size


def dequantize(t: GGUFTensor) -> np.ndarray:
    """The tensor as float32 in its numpy shape (plain types here, block types via `gguf`)."""
    if t.tensor_type == _F32:
        arr = t.data.view(np.float32)
    elif t.tensor_type == _F16:
        arr = t.data.view(np.float16).astype(np.float32)
    elif t.tensor_type == _BF16:
        arr = (t.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize

        arr = gguf_dequantize(t.data, GGMLQuantizationType(t.tensor_type))
    return np.asarray(arr, np.float32).reshape(t.shape)
