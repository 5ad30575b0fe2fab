"""A GGUF file's header, checked before ``gguf.GGUFReader``, transformers' GGUF loader or
the native decoder read it.

GGUF (v2, v3): magic ``GGUF``, uint32 version, uint64 tensor count, uint64 key/value count;
the key/value pairs (key: uint64 length + UTF-8 bytes; uint32 value type; the value:
a scalar, a string, or an array of one element type with a uint64 count); the tensor
infos (name string, uint32 n_dims, n_dims uint64 dims, uint32 ggml type, uint64 offset
into the data section); padding to ``general.alignment`` (default 32); the data.

:func:`check_gguf` walks all of it with bounded reads: every count and length is checked
against the bytes that remain before it is used (so nothing is allocated or looped over
that the file cannot hold), value types and ggml types must be known, tensors have 1-4
dims whose element count is whole blocks of their type, offsets are aligned, and each
tensor's bytes lie inside the file and overlap no other. Anything else is refused in one
line naming the file and the field. Both byte orders are read, as ``gguf.GGUFReader`` does.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from slimformer.errors import ModelLoadError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                  # GGML_MAX_DIMS
MAX_NAME_BYTES = 64           # GGML_MAX_NAME (llama.cpp refuses longer tensor names)
MAX_KEY_BYTES = 1 << 16
# gguf.GGUFReader builds a few numpy views per array element (~hundreds of bytes each), so
# metadata arrays are bounded in elements, not only in bytes: 4M covers a 256k-token
# vocabulary with its scores, types and merges several times over.
MAX_ARRAY_ELEMENTS = 1 << 22

# GGUF value types: id -> (name, fixed size or None for strings/arrays)
_SCALARS = {0: ("UINT8", "B"), 1: ("INT8", "b"), 2: ("UINT16", "H"), 3: ("INT16", "h"), 4: ("UINT32", "I"),
            5: ("INT32", "i"), 6: ("FLOAT32", "f"), 7: ("BOOL", "?"), 10: ("UINT64", "Q"), 11: ("INT64", "q"),
            12: ("FLOAT64", "d")}
STRING, ARRAY = 8, 9


def _ggml_types() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, block size, bytes per block), as the gguf package knows them."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(t): (t.name, block, size) for t, (block, size) in GGML_QUANT_SIZES.items()}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]      # GGUF order: dims[0] is the fastest-varying (K for a matrix)
    type_id: int
    type_name: str
    offset: int                # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFLayout:
    path: Path
    version: int
    byte_order: str            # "<" or ">"
    alignment: int
    data_offset: int
    file_size: int
    metadata: dict[str, object]            # scalars and strings; arrays as ("ARRAY", type name, count)
    tensors: list[GGUFTensorInfo]
    # (offset, size, label) of every count, length, type, dim and offset field: what a
    # fuzzer aims at
    fields: list[tuple[int, int, str]] = field(default_factory=list, repr=False)


class _Cursor:
    def __init__(self, path: Path, buf, order: str, record: bool):
        self.path, self.buf, self.pos, self.order = path, buf, 0, order
        self.size = len(buf)
        self.fields: list[tuple[int, int, str]] | None = [] if record else None

    def refuse(self, where: str, why: str):
        raise ModelLoadError(f"{self.path}: GGUF {where}: {why}")

    def need(self, n: int, where: str):
        if n > self.size - self.pos:
            self.refuse(where, f"needs {n} bytes at offset {self.pos}, but the file ends at {self.size}")

    def scalar(self, code: str, where: str, label: str | None = None):
        n = struct.calcsize(code)
        self.need(n, where)
        if self.fields is not None and label is not None:
            self.fields.append((self.pos, n, label))
        (value,) = struct.unpack_from(self.order + code, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, where: str, limit: int | None = None) -> str:
        n = self.scalar("Q", where + " length", "string length")
        if limit is not None and n > limit:
            self.refuse(where, f"{n} bytes, more than the {limit} allowed")
        self.need(n, where)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.refuse(where, "not valid UTF-8")


def check_gguf(path: str | os.PathLike, *, record_fields: bool = False) -> GGUFLayout:
    """The checked layout of the GGUF file ``path``; :class:`ModelLoadError` otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise ModelLoadError(f"{path}: GGUF header: file is {size} bytes, shorter than the 24-byte header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _walk(path, buf, record_fields)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read GGUF file ({exc.strerror or exc})") from None


def _walk(path: Path, buf, record: bool) -> GGUFLayout:
    if buf[:4] != MAGIC:
        raise ModelLoadError(f"{path}: GGUF magic: not a GGUF file (first bytes {bytes(buf[:4])!r})")
    (version_le,) = struct.unpack_from("<I", buf, 4)
    order = ">" if version_le & 0xFFFF == 0 else "<"     # as GGUFReader decides
    c = _Cursor(path, buf, order, record)
    c.pos = 4
    version = c.scalar("I", "version", "version")
    if version not in VERSIONS:
        c.refuse("version", f"{version} is not one of {', '.join(map(str, VERSIONS))}")
    n_tensors = c.scalar("Q", "tensor count", "tensor count")
    n_kv = c.scalar("Q", "key/value count", "kv count")
    # Smallest possible entries: a key/value is 8 + 4 + 1 bytes, a tensor info 8 + 4 + 8 + 4 + 8.
    if n_kv * 13 > c.size - c.pos:
        c.refuse("key/value count", f"{n_kv} pairs cannot fit in the {c.size - c.pos} bytes left")
    if n_tensors * 32 > c.size - c.pos:
        c.refuse("tensor count", f"{n_tensors} tensor infos cannot fit in the {c.size - c.pos} bytes left")

    metadata: dict[str, object] = {}
    value_types: dict[str, int] = {}
    elements = 0
    for i in range(n_kv):
        key = c.string(f"key {i}", MAX_KEY_BYTES)
        where = f"key {key[:80]!r}"
        if key in metadata:
            c.refuse(where, "appears twice")
        vtype = value_types[key] = c.scalar("I", f"{where} type", "value type")
        if vtype in _SCALARS:
            metadata[key] = c.scalar(_SCALARS[vtype][1], f"{where} value")
        elif vtype == STRING:
            metadata[key] = c.string(f"{where} value")
        elif vtype == ARRAY:
            etype = c.scalar("I", f"{where} array type", "array type")
            count = c.scalar("Q", f"{where} array length", "array length")
            elements += count
            if elements > MAX_ARRAY_ELEMENTS:
                c.refuse(f"{where} array length", f"{count} elements: metadata arrays may hold {MAX_ARRAY_ELEMENTS} in all")
            if etype in _SCALARS:
                width = struct.calcsize(_SCALARS[etype][1])
                c.need(count * width, f"{where} array of {count} {_SCALARS[etype][0]}")
                c.pos += count * width
                metadata[key] = ("ARRAY", _SCALARS[etype][0], count)
            elif etype == STRING:
                c.need(count * 8, f"{where} array of {count} strings")
                for j in range(count):
                    c.string(f"{where} element {j}")
                metadata[key] = ("ARRAY", "STRING", count)
            else:
                c.refuse(f"{where} array type", f"{etype} is not a scalar or string type (nested arrays are not read)")
        else:
            c.refuse(f"{where} type", f"{vtype} is not a GGUF value type")

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        if value_types["general.alignment"] != 4:
            c.refuse("general.alignment", "must be a UINT32")
        if alignment <= 0 or alignment & (alignment - 1):
            c.refuse("general.alignment", f"{alignment} is not a power of two")

    ggml = _ggml_types()
    infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = c.string(f"tensor {i} name", MAX_NAME_BYTES - 1)
        where = f"tensor {name!r}"
        if name in names:
            c.refuse(where, "appears twice")
        names.add(name)
        n_dims = c.scalar("I", f"{where} n_dims", "n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            c.refuse(f"{where} n_dims", f"{n_dims}, expected 1 to {MAX_DIMS}")
        dims = tuple(c.scalar("Q", f"{where} dim {d}", f"dim {d}") for d in range(n_dims))
        type_id = c.scalar("I", f"{where} type", "ggml type")
        if type_id not in ggml:
            c.refuse(f"{where} type", f"{type_id} is not a ggml type the gguf package knows")
        offset = c.scalar("Q", f"{where} offset", "tensor offset")
        type_name, block, block_bytes = ggml[type_id]
        if dims[0] % block:
            c.refuse(f"{where} dim 0", f"{dims[0]} is not a whole number of {type_name} blocks of {block}")
        count = 1
        for d in dims:
            count *= d
        nbytes = count // block * block_bytes
        if nbytes > c.size:
            c.refuse(f"{where} dims", f"{list(dims)} of {type_name} is {nbytes} bytes, more than the whole file ({c.size})")
        if offset % alignment:
            c.refuse(f"{where} offset", f"{offset} is not a multiple of the alignment {alignment}")
        infos.append((name, dims, type_id, type_name, offset, nbytes))

    data_offset = -(-c.pos // alignment) * alignment
    tensors = []
    for name, dims, type_id, type_name, offset, nbytes in infos:
        start = data_offset + offset
        if start + nbytes > c.size:
            c.refuse(f"tensor {name!r} offset", f"data [{start}, {start + nbytes}) runs past the end of the file ({c.size})")
        tensors.append(GGUFTensorInfo(name, dims, type_id, type_name, start, nbytes))
    end = data_offset
    for t in sorted(tensors, key=lambda t: (t.offset, t.nbytes)):
        if t.offset < end:
            c.refuse(f"tensor {t.name!r} offset", "its data overlaps another tensor's")
        end = t.offset + t.nbytes
    return GGUFLayout(path, version, order, alignment, data_offset, c.size, metadata, tensors, c.fields or [])


