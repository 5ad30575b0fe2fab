"""A safetensors header, checked before anything is mapped or allocated.

Layout: 8 bytes little-endian header length ``n``, ``n`` bytes of a JSON object
(``{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}``),
then the data section; offsets are relative to it. :func:`check_safetensors` reads only
the header (bounded by the file size and :data:`MAX_HEADER_BYTES`), and refuses in one line
naming the file and the field: a length past the file, a header that is not one JSON
object, a duplicate name, an unknown dtype, a shape whose element count times the dtype's
size differs from its byte span, and offsets outside the data section, overlapping, or
leaving gaps (the safetensors library requires the spans to tile the data exactly).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from slimformer.errors import ModelLoadError

MAX_HEADER_BYTES = 100 << 20      # the safetensors library's own limit
MAX_DIMS = 8

# dtype name -> bytes per element (the ones torch reads)
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int          # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def _refuse(path, field: str, why: str):
    raise ModelLoadError(f"{path}: safetensors {field}: {why}")


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_safetensors(path: str | os.PathLike) -> SafetensorsHeader:
    """The checked header of ``path``; :class:`ModelLoadError` naming the field otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                _refuse(path, "header length", f"file is {size} bytes, shorter than the 8-byte length field")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                _refuse(path, "header length", f"{n} bytes, but the file has {size - 8} after the length field")
            if n > MAX_HEADER_BYTES:
                _refuse(path, "header length", f"{n} bytes, more than the {MAX_HEADER_BYTES} allowed")
            raw = f.read(n)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read safetensors file ({exc.strerror or exc})") from None
    if len(raw) != n:
        _refuse(path, "header", "file changed while being read")
    if not raw.startswith(b"{"):
        _refuse(path, "header", "does not start with '{'")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        _refuse(path, "header", f"not a JSON object ({str(exc).splitlines()[0][:120]})")
    if not isinstance(header, dict):
        _refuse(path, "header", f"expected a JSON object, found {type(header).__name__}")
    data_start = 8 + n
    data_size = size - data_start
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        _refuse(path, "__metadata__", "must map strings to strings")
    tensors: dict[str, TensorEntry] = {}
    for name, info in header.items():
        where = f"tensor {name[:200]!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            _refuse(path, where, "expected exactly the keys dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            _refuse(path, f"{where} dtype", f"{str(dtype)[:40]!r} is not one of {', '.join(DTYPE_BYTES)}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_int(d) and d >= 0 for d in shape):
            _refuse(path, f"{where} shape", f"expected at most {MAX_DIMS} non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            _refuse(path, f"{where} data_offsets", f"expected [begin, end] with 0 <= begin <= end <= {data_size}")
        count = 1
        for d in shape:
            count *= d
        if count * DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
            _refuse(path, f"{where} shape", f"{shape} of {dtype} is {count * DTYPE_BYTES[dtype]} bytes, "
                                            f"but data_offsets span {offsets[1] - offsets[0]}")
        tensors[name] = TensorEntry(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
    # The spans must tile the data section: sorted by offset, each starts where the previous ended.
    position = data_start
    for name, entry in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if entry.begin != position:
            why = "overlaps the previous tensor" if entry.begin < position else "leaves a gap before it"
            _refuse(path, f"tensor {name[:200]!r} data_offsets", why)
        position = entry.end
    if position != size:
        _refuse(path, "data section", f"tensors end at byte {position}, but the file has {size}")
    return SafetensorsHeader(path, tensors, metadata, data_start, size)
