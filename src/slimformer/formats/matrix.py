"""One description of a compressed matrix: what every quantiser produces and what the
native decoder, tensor parallelism, offloading and the exporters consume.

A :class:`CompressedMatrix` is ``y = x @ W^T + bias`` with ``W [N, K]`` held in one of
five kinds. Every weight-only kind is ``w = c * scale[n, g] + minv[n, g]`` over groups of
``gs`` input columns (``minv`` may instead be given as integer ``zero``-points,
``minv = -zero * scale``), which holds our RTN/GPTQ-style ``(code - zero) * scale`` and
GGUF's Q4_0 / Q4_1 / Q8_0 blocks alike, exactly (every product involved is exact in fp32,
so :meth:`dequantize` is bit-identical to the reference dequantisation):

- ``F32``  : ``w`` ``[N, K]`` float32.
- ``Q8``   : ``w`` ``[N, K]`` int8 (codes 5..8 bits wide, shifted by -128; GGUF Q8_0).
- ``Q4``   : ``w`` ``[N, K/2]`` uint8, codes 0..15 (2..4 bits wide) in **the** 4-bit
  layout (:func:`pack_nibbles`): every 32 codes of a row in 16 bytes, byte
  ``j = c[j] | c[j + 16] << 4``. It is GGUF's own Q4 block order (GGUF blocks are copied as
  they are, both ways), the order ``QuantLinear`` saves its 4-bit codes in (compressed
  format version 2), and the order every native reader takes as it is: the decoder
  (``kernels/decoder.cpp``) and QuantLinear's int4 kernels (``kernels/kernels.cpp``
  ``sf_w4_*``, via ``kernels.prepare_int4_q4``, sharing ``qweight``'s storage). No reader
  repacks it.
- ``Q8A8`` : ``w`` ``[N, K]`` int8 per output channel, activations quantised per token to
  int8 at run time: ``w = (q + corr[n]) * scale[n]``.
- ``Q8A8G``: ``w`` ``[N, K]`` int8 signed, a scale per group (ZeroQuant), activations per
  token to int8: ``w = q * scale[n, g]``.

Pure tensor math (torch/numpy only); GGUF blocks <-> this description live in
:mod:`slimformer.formats.gguf`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

F32, Q8, Q4, Q8A8, Q8A8G = 0, 1, 2, 3, 4
KIND_NAMES = {F32: "fp32", Q8: "int8", Q4: "int4", Q8A8: "w8a8", Q8A8G: "w8a8-group"}
_DEFAULT_BITS = {F32: 32, Q8: 8, Q4: 4, Q8A8: 8, Q8A8G: 8}
Q4_BLOCK = 32     # codes per 16-byte chunk of the Q4 layout (GGUF's block)


class UnsupportedFormat(Exception):
    """A layer format the native runtime cannot run (the caller may fall back)."""


class NotNative(UnsupportedFormat):
    """A module that has no :class:`CompressedMatrix` description, and why.

    ``dense_ok``: whether its dequantised weight computes the same function (a weight-only
    format with no native kernel: the runtime may run it dense, with a warning). False when
    the module also quantises its input or decomposes it (running the dense weight instead
    would change the results): the runtime refuses it."""

    def __init__(self, reason: str, dense_ok: bool = True):
        super().__init__(reason)
        self.reason, self.dense_ok = reason, dense_ok


# ----------------------------------------------------------------------- the Q4 layout
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes 0..15 -> ``[N, K/2]`` bytes in the Q4 layout (GGUF's block order):
    every 32 codes in 16 bytes, byte j = c[j] | c[j+16] << 4. ``K`` must be a multiple of 32."""
    N, K = codes.shape
    if K % Q4_BLOCK:
        raise ValueError(f"the Q4 layout needs K to be a multiple of {Q4_BLOCK}, got {K}")
    c = codes.to(torch.uint8).reshape(N, K // 32, 2, 16)
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(N, K // 2).contiguous()


def unpack_nibbles(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``[N, K]`` uint8 codes."""
    b = packed.reshape(N, K // 32, 16)
    return torch.cat([b & 0xF, b >> 4], dim=-1).reshape(N, K)


def maybe_half(scale: torch.Tensor, minv: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float16 copies of group scales and offsets when every value survives the round trip."""
    def exact(t):
        return t is None or torch.equal(t.half().float(), t.float())

    if exact(scale) and exact(minv) and torch.isfinite(scale.half()).all():
        return scale.half().contiguous(), None if minv is None else minv.half().contiguous()
    return scale.float().contiguous(), None if minv is None else minv.float().contiguous()


# ----------------------------------------------------------------------- the description
@dataclass
class CompressedMatrix:
    """One linear layer's weight in a runtime format: ``y = x @ W^T + bias``.

    Fields: ``name`` (module path, for messages), ``kind`` (F32/Q8/Q4/Q8A8/Q8A8G; its name
    is :attr:`format`), ``N`` (outputs), ``K`` (inputs), ``gs`` (group size: ``K`` for one
    group per row), ``w`` (codes in the layout the decoder reads, see the module doc),
    ``scale`` ``[N, K/gs]`` float32 or float16 (Q8A8: ``[N]``), ``minv`` ``[N, K/gs]`` (the
    dtype of ``scale``) or ``zero`` ``[N, K/gs]`` uint8 (``minv = -zero * scale``), ``bias``
    ``[N]`` float32, ``corr`` (Q8A8 ``[N]`` int32), ``bits`` (the code width the codes
    were quantised to; Q4 holds 2..4, Q8 5..8), ``symmetric`` (informational: whether
    the source grid was symmetric; ``None`` when unknown, e.g. GGUF), ``fallback`` (why
    this layer runs in a slower format than its module asked for, else None)."""

    name: str
    kind: int
    N: int
    K: int
    gs: int
    w: torch.Tensor
    scale: torch.Tensor | None = None
    minv: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    corr: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    bits: int | None = None
    symmetric: bool | None = None
    fallback: str | None = None
    # Q8A8G: the layout slimformer.kernels uses for many tokens (prefill), built on first use
    packed: object | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.bits is None:
            self.bits = _DEFAULT_BITS[self.kind]

    # ------------------------------------------------------------------ facts
    @property
    def format(self) -> str:
        return KIND_NAMES[self.kind]

    @property
    def groups(self) -> int:
        return self.K // self.gs

    @property
    def group_size(self) -> int:
        return self.gs

    @property
    def half(self) -> bool:
        """Scales and offsets stored as float16 (half the bytes; used only where exact)."""
        return self.scale is not None and self.scale.dtype == torch.float16

    def codes(self) -> torch.Tensor:
        """The integer weights ``[N, K]`` as stored (Q4: 0..15 uint8; Q8 kinds: int8)."""
        if self.kind == F32:
            raise ValueError(f"{self.name}: an fp32 matrix has no codes")
        return unpack_nibbles(self.w, self.N, self.K) if self.kind == Q4 else self.w

    def offset(self) -> torch.Tensor | None:
        """``minv [N, K/gs]`` as float32 (from ``zero`` when that is how it is held)."""
        if self.minv is not None:
            return self.minv.float()
        if self.zero is not None:
            return -(self.zero.float() * self.scale.float())
        return None

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight ``[N, K]`` this format encodes (the reference)."""
        if self.kind == F32:
            return self.w
        if self.kind == Q8A8:
            return (self.w.float() + self.corr.float()[:, None]) * self.scale[:, None]
        c = self.codes().float().reshape(self.N, self.groups, self.gs)
        w = c * self.scale.float()[..., None]
        if self.minv is not None:
            w = w + self.minv.float()[..., None]
        elif self.zero is not None:
            w = w + (-(self.zero.float() * self.scale.float()))[..., None]
        return w.reshape(self.N, self.K)

    def nbytes(self) -> int:
        """Bytes the decoder reads for this layer per token (weights, scales, offsets, bias)."""
        return sum(t.numel() * t.element_size() for t in (self.w, self.scale, self.minv, self.bias, self.corr, self.zero)
                   if t is not None)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Reference ``x [..., K] @ W^T + bias`` in float32: the dequantised weight, and
        for Q8A8/Q8A8G the per-token int8 rounding of ``x`` the native kernels apply."""
        x2 = x.reshape(-1, self.K).float()
        if self.kind in (Q8A8, Q8A8G):
            amax = x2.abs().amax(-1, keepdim=True)
            sx = (amax / 127).clamp_min(1e-12)
            x2 = (torch.round(x2 / sx).clamp(-128, 127)) * sx
        y = x2 @ self.dequantize().t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.N)

    def replace(self, **changes) -> "CompressedMatrix":
        return dataclasses.replace(self, packed=None, **changes)

    # ------------------------------------------------------------------ slicing
    def select_rows(self, index: torch.Tensor) -> "CompressedMatrix":
        """The output rows ``index`` in that order (undoing GGUF's Q/K row interleave,
        slicing a tile, sharding by rows, looking up embedding rows); exact."""
        pick = lambda t: None if t is None else t[index].contiguous()  # noqa: E731
        return self.replace(N=int(index.numel()), w=pick(self.w), scale=pick(self.scale), minv=pick(self.minv),
                            bias=pick(self.bias), corr=pick(self.corr), zero=pick(self.zero))

    def select_cols(self, start: int, stop: int) -> "CompressedMatrix":
        """Input columns ``start:stop`` (bias dropped: a column shard's partial sums are
        reduced before the bias is added once). Exact; the cut must fall on a group
        boundary (and, for Q4, on a 32-code block) unless the matrix has one group per row."""
        if not 0 <= start < stop <= self.K:
            raise ValueError(f"{self.name}: columns {start}:{stop} outside 0:{self.K}")
        K = stop - start
        per_row = self.gs == self.K
        if not per_row and (start % self.gs or stop % self.gs):
            raise ValueError(f"{self.name}: columns {start}:{stop} do not fall on its {self.gs}-column groups")
        gs = K if per_row else self.gs
        g0, g1 = (0, 1) if per_row else (start // self.gs, stop // self.gs)
        grouped = lambda t: None if t is None or t.dim() < 2 else t[:, g0:g1].contiguous()  # noqa: E731
        if self.kind == Q4:
            if start % Q4_BLOCK or stop % Q4_BLOCK:
                raise ValueError(f"{self.name}: Q4 columns {start}:{stop} do not fall on {Q4_BLOCK}-code blocks")
            w = self.w[:, start // 2: stop // 2].contiguous()
        else:
            w = self.w[:, start:stop].contiguous()
        scale = self.scale if self.kind == Q8A8 else grouped(self.scale)
        return self.replace(K=K, gs=gs, w=w, scale=scale, minv=grouped(self.minv), zero=grouped(self.zero), bias=None)

    def shard(self, rank: int, world: int, dim: int) -> "CompressedMatrix":
        """The ``rank``-th of ``world`` equal slices: of the output rows (``dim=0``, bias
        rows kept) or of the input columns (``dim=1``, no bias: see :meth:`select_cols`)."""
        size = self.N if dim == 0 else self.K
        if size % world:
            raise ValueError(f"{self.name}: world size {world} does not divide its {size} "
                             f"{'output rows' if dim == 0 else 'input columns'}")
        per = size // world
        if dim == 0:
            return self.select_rows(torch.arange(rank * per, (rank + 1) * per))
        return self.select_cols(rank * per, (rank + 1) * per)

    @staticmethod
    def concat(name: str, parts: list["CompressedMatrix"]) -> "CompressedMatrix":
        """Stack layers that read the same input (q|k|v, gate|up) along the rows: one
        matvec pass. Mixed kinds run as fp32 (recorded in ``fallback``)."""
        first = parts[0]
        same = all(p.kind == first.kind and p.K == first.K and p.gs == first.gs for p in parts)
        if not same:  # mixed formats (e.g. mixed precision): run the stack as fp32
            kinds = ", ".join(sorted({f"{p.format}/g{p.gs}" for p in parts}))
            return from_dense(name, torch.cat([p.dequantize() for p in parts]), _cat_bias(parts),
                              fallback=f"stack of mixed formats ({kinds}) runs as fp32")
        if len({(p.half, p.zero is not None) for p in parts}) > 1:
            # one stack, one layout: float32 scales and offsets hold every part exactly
            parts = [p.replace(scale=p.scale.float(), minv=None if p.offset() is None else p.offset().contiguous(),
                               zero=None) for p in parts]
            first = parts[0]
        cat = lambda ts: torch.cat(ts).contiguous()  # noqa: E731
        minv = None
        if any(p.minv is not None for p in parts):
            minv = cat([p.minv if p.minv is not None else torch.zeros(p.N, p.groups, dtype=first.scale.dtype)
                        for p in parts])
        scale = None if first.scale is None else cat([p.scale for p in parts])
        corr = None if first.corr is None else cat([p.corr for p in parts])
        zero = None if first.zero is None else cat([p.zero for p in parts])
        fallback = "; ".join(f"{p.name}: {p.fallback}" for p in parts if p.fallback) or None
        return CompressedMatrix(name, first.kind, sum(p.N for p in parts), first.K, first.gs,
                                cat([p.w for p in parts]), scale, minv, _cat_bias(parts), corr, zero,
                                bits=max(p.bits for p in parts),
                                symmetric=first.symmetric if all(p.symmetric == first.symmetric for p in parts)
                                else None, fallback=fallback)


def _cat_bias(parts: list[CompressedMatrix]) -> torch.Tensor | None:
    if all(p.bias is None for p in parts):
        return None
    return torch.cat([p.bias if p.bias is not None else torch.zeros(p.N) for p in parts]).contiguous()


def from_dense(name: str, weight: torch.Tensor, bias: torch.Tensor | None,
               fallback: str | None = None) -> CompressedMatrix:
    """An fp32 description of a dense ``[N, K]`` weight."""
    w = weight.detach().to(torch.float32).contiguous()
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    return CompressedMatrix(name, F32, w.shape[0], w.shape[1], w.shape[1], w, bias=b, fallback=fallback)


def concat(name: str, parts: list[CompressedMatrix]) -> CompressedMatrix:
    return CompressedMatrix.concat(name, parts)


def select_rows(lin: CompressedMatrix, index: torch.Tensor) -> CompressedMatrix:
    return lin.select_rows(index)
