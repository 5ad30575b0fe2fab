"""GGUF tensor blocks <-> :class:`~slimformer.formats.matrix.CompressedMatrix`, both ways,
without requantising.

Blocks of 32 input columns per row: Q8_0 (``d`` fp16, 32 int8; ``w = d q``), Q4_0
(``d``, 16 nibble bytes; ``w = d (c - 8)``), Q4_1 (``d``, ``m`` fp16, 16 nibble bytes;
``w = d c + m``). GGUF's nibble order is the description's Q4 layout, so the bytes are
copied as they are. F32/F16/BF16 read as fp32.

:func:`from_gguf_tensor` is what the native decoder reads GGUF files with;
:func:`to_gguf_blocks` is its exact inverse for every description that fits a GGUF type
without rounding (a GGUF writer's building block): ``from_gguf_tensor(*to_gguf_blocks(m))``
is bit-identical to ``m``.
"""

from __future__ import annotations

import numpy as np
import torch

from slimformer.errors import ModelLoadError
from slimformer.formats.matrix import (
    F32,
    Q4,
    Q8,
    CompressedMatrix,
    UnsupportedFormat,
    from_dense,
    maybe_half,
)

GGUF_BLOCK = 32
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def from_gguf_tensor(name: str, qtype: str, data: np.ndarray, N: int, K: int) -> CompressedMatrix:
    """One GGUF tensor's blocks (``data``: ``[N, bytes per row]`` uint8, or the float
    values for F32/F16/BF16) as a description: Q8_0 -> Q8, Q4_0/Q4_1 -> Q4, floats -> F32.
    ``data`` must hold exactly ``N x K`` weights of ``qtype`` (:class:`ModelLoadError` otherwise)."""
    _check_size(name, qtype, data, N, K)
    if qtype in ("F32", "F16", "BF16"):
        arr = np.asarray(data)
        if qtype == "BF16":
            bits = np.ascontiguousarray(arr).reshape(-1).view(np.uint16)
            w = torch.from_numpy((bits.astype(np.uint32) << 16).view(np.float32)).reshape(N, K)
        else:
            w = torch.from_numpy(arr.astype(np.float32)).reshape(N, K)
        return from_dense(name, w, None)
    if K % GGUF_BLOCK:
        raise UnsupportedFormat(f"tensor {name}: {K} columns are not whole blocks of {GGUF_BLOCK}")
    G = K // GGUF_BLOCK
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(N, G, -1)
    d = torch.from_numpy(raw[..., 0:2].copy().view(np.float16)).reshape(N, G)  # kept as float16: exact
    if qtype == "Q8_0":
        q = torch.from_numpy(raw[..., 2:34].copy().view(np.int8)).reshape(N, K)
        return CompressedMatrix(name, Q8, N, K, GGUF_BLOCK, q.contiguous(), d.contiguous(), symmetric=True)
    if qtype == "Q4_0":
        qs = raw[..., 2:18]
        d, minv = maybe_half(d, -8.0 * d.float())
        symmetric = True
    elif qtype == "Q4_1":
        qs = raw[..., 4:20]
        minv = torch.from_numpy(raw[..., 2:4].copy().view(np.float16)).reshape(N, G)
        symmetric = False
    else:
        raise UnsupportedFormat(f"tensor {name}: GGUF type {qtype} has no runtime layout (Q4_0, Q4_1, Q8_0, F16, F32)")
    # GGUF's nibble order is the description's Q4 layout (byte j: element j low, j + 16 high): a copy.
    packed = torch.from_numpy(np.ascontiguousarray(qs)).reshape(N, K // 2)
    return CompressedMatrix(name, Q4, N, K, GGUF_BLOCK, packed, d.contiguous(), minv.contiguous(),
                            symmetric=symmetric)


_FLOAT_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}


def _check_size(name: str, qtype: str, data, N: int, K: int) -> None:
    """``data`` holds exactly the ``[N, K]`` matrix ``qtype`` says, before anything is reshaped."""
    if not (isinstance(N, int) and isinstance(K, int) and N > 0 and K > 0):
        raise ModelLoadError(f"GGUF tensor {name}: shape [{N}, {K}] is not a matrix")
    arr = np.asarray(data)
    if qtype in _FLOAT_ITEMSIZE:
        if qtype == "BF16":   # gguf.GGUFReader hands bfloat16 over as its bytes
            ok = arr.dtype in (np.uint8, np.uint16) and arr.nbytes == 2 * N * K
        else:
            ok = arr.dtype.kind == "f" and arr.dtype.itemsize == _FLOAT_ITEMSIZE[qtype] and arr.size == N * K
        if not ok:
            raise ModelLoadError(f"GGUF tensor {name}: {qtype} data is {arr.size} x {arr.dtype}, expected {N} x {K} "
                                 f"{qtype} values")
        return
    if qtype in BLOCK_BYTES and K % GGUF_BLOCK == 0:
        expected = N * (K // GGUF_BLOCK) * BLOCK_BYTES[qtype]
        if arr.dtype != np.uint8 or arr.size != expected:
            raise ModelLoadError(f"GGUF tensor {name}: {qtype} data is {arr.nbytes} bytes ({arr.dtype}), "
                                 f"expected {expected} for [{N}, {K}]")


def _fp16_exact(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.half()).all()) and torch.equal(t.half().float(), t.float())


def to_gguf_blocks(m: CompressedMatrix) -> tuple[str, np.ndarray]:
    """``(GGUF type name, data)`` holding exactly ``m``: F32 -> ``F32`` (``[N, K]`` float32);
    Q8 in groups of 32 with fp16 scales and no offset -> ``Q8_0``; Q4 in groups of 32 with
    fp16 scales and an offset of exactly ``-8 * scale`` -> ``Q4_0``, or any fp16 offset ->
    ``Q4_1`` (``data``: ``[N, bytes per row]`` uint8). A bias is not part of a GGUF weight.
    Raises :class:`UnsupportedFormat` for what no GGUF type holds exactly (other group
    sizes, float32-only scales, W8A8 kinds)."""
    def refuse(why: str):
        raise UnsupportedFormat(f"{m.name}: {m.format} g{m.gs} has no exact GGUF block type: {why}")

    if m.kind == F32:
        return "F32", m.w.detach().float().contiguous().numpy()
    if m.kind not in (Q8, Q4):
        refuse("GGUF blocks hold weights only (no activation format)")
    if m.gs != GGUF_BLOCK:
        refuse(f"GGUF blocks are {GGUF_BLOCK} columns")
    if not _fp16_exact(m.scale):
        refuse("scales are not float16 values")
    N, G = m.N, m.groups
    d = m.scale.half().reshape(N, G, 1).contiguous().numpy().view(np.uint8)     # [N, G, 2]
    offset = m.offset()
    if m.kind == Q8:
        if offset is not None and bool(offset.any()):
            refuse("Q8_0 has no offset")
        q = m.w.reshape(N, G, GGUF_BLOCK).contiguous().numpy().view(np.uint8)
        return "Q8_0", np.concatenate([d, q], axis=-1).reshape(N, -1)
    qs = m.w.reshape(N, G, 16).contiguous().numpy()          # the Q4 layout is GGUF's own
    if offset is not None and torch.equal(offset, -8.0 * m.scale.float()):
        return "Q4_0", np.concatenate([d, qs], axis=-1).reshape(N, -1)
    if offset is None:
        offset = torch.zeros(N, G)
    if not _fp16_exact(offset):
        refuse("offsets are not float16 values")
    mm = offset.half().reshape(N, G, 1).contiguous().numpy().view(np.uint8)
    return "Q4_1", np.concatenate([d, mm, qs], axis=-1).reshape(N, -1)
