"""Runtime weight formats: what the native decoder multiplies with.

Every format is ``w = code * scale[n, g] + minv[n, g]`` over groups of ``gs`` input
columns (see ``_decoder.cpp``), which holds our RTN/GPTQ-style ``(code - zero) * scale``
and GGUF's Q4_0 / Q4_1 / Q8_0 blocks alike, exactly (every product involved is exact in
fp32, so the dequantised values are bit-identical to the reference dequantisation).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimformer.formats.spec import ActSpec
from slimformer.nn.quant_linear import QuantLinear

F32, Q8, Q4, Q8A8, Q8A8G = 0, 1, 2, 3, 4
KIND_NAMES = {F32: "fp32", Q8: "int8", Q4: "int4", Q8A8: "w8a8", Q8A8G: "w8a8-group"}


class UnsupportedFormat(Exception):
    """A layer format the native runtime cannot run (the caller may fall back)."""


@dataclass
class RtLinear:
    """One linear layer in a runtime format: ``y = x @ W^T + bias``."""

    name: str
    kind: int
    N: int
    K: int
    gs: int
    w: torch.Tensor  # F32 [N,K] float32 | Q8/Q8A8/Q8A8G [N,K] int8 | Q4 [N,K/2] uint8
    scale: torch.Tensor | None = None  # [N, K/gs] float32 or float16 (Q8A8: [N] float32)
    minv: torch.Tensor | None = None  # [N, K/gs], the dtype of scale
    bias: torch.Tensor | None = None  # [N] float32
    corr: torch.Tensor | None = None  # Q8A8 [N] int32: w = (q + corr) * scale
    zero: torch.Tensor | None = None  # [N, K/gs] uint8 zero-points: offset = -zero * scale (instead of minv)
    # Q8A8G (ZeroQuant: group-wise weights, dynamic per-token int8 activations): the
    # layout slimformer.kernels uses for many tokens (prefill), built on first use
    packed: object | None = field(default=None, repr=False, compare=False)

    @property
    def groups(self) -> int:
        return self.K // self.gs

    @property
    def half(self) -> bool:
        """Scales and offsets stored as float16 (half the bytes; used only where exact)."""
        return self.scale is not None and self.scale.dtype == torch.float16

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight ``[N, K]`` this format encodes (the reference)."""
        if self.kind == F32:
            return self.w
        if self.kind == Q8A8:
            return (self.w.float() + self.corr.float()[:, None]) * self.scale[:, None]
        codes = unpack_nibbles(self.w, self.N, self.K) if self.kind == Q4 else self.w
        c = codes.float().reshape(self.N, self.groups, self.gs)
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


def _maybe_half(scale: torch.Tensor, minv: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float16 copies of group scales and offsets when every value survives the round trip."""
    def exact(t):
        return t is None or torch.equal(t.half().float(), t.float())

    if exact(scale) and exact(minv) and torch.isfinite(scale.half()).all():
        return scale.half().contiguous(), None if minv is None else minv.half().contiguous()
    return scale.float().contiguous(), None if minv is None else minv.float().contiguous()


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes 0..15 -> ``[N, K/2]`` bytes in GGUF's Q4 block order: every 32
    codes in 16 bytes, byte j = c[j] | c[j+16] << 4 (so GGUF blocks are copied as they are)."""
    N, K = codes.shape
    c = codes.to(torch.uint8).reshape(N, K // 32, 2, 16)
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(N, K // 2).contiguous()


def unpack_nibbles(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    b = packed.reshape(N, K // 32, 16)
    return torch.cat([b & 0xF, b >> 4], dim=-1).reshape(N, K)


def _fallback(name: str, weight: torch.Tensor, bias, why: str) -> RtLinear:
    warnings.warn(f"slimformer.runtime: layer {name} runs as dequantised fp32 (slower): {why}",
                  RuntimeWarning, stacklevel=3)
    return from_dense(name, weight, bias)


def from_dense(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> RtLinear:
    w = weight.detach().to(torch.float32).contiguous()
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    return RtLinear(name, F32, w.shape[0], w.shape[1], w.shape[1], w, bias=b)


def from_module(name: str, module: nn.Module) -> RtLinear:
    """Convert an ``nn.Linear`` or a :class:`QuantLinear` (raises :class:`UnsupportedFormat`
    for activation formats the decoder has no kernel for)."""
    if isinstance(module, QuantLinear):
        return from_quant_linear(name, module)
    if isinstance(module, nn.Linear):
        return from_dense(name, module.weight, module.bias)
    raise UnsupportedFormat(f"layer {name} is a {type(module).__name__}, not a Linear or QuantLinear")


_TOKEN_A8 = ActSpec(8, True, "token", True)


def from_quant_linear(name: str, module: QuantLinear) -> RtLinear:
    spec, act = module.weight_spec, module.act_spec
    N, K = module.out_features, module.in_features
    gs = spec.group_size if spec.granularity == "group" else K
    G = K // gs
    bias = None if module.bias is None else module.bias.detach().float().contiguous()
    codes = module.codes()
    scale = module.scale.float().reshape(-1, G).expand(N, G).contiguous()
    offset = 2 ** (spec.bits - 1) if spec.symmetric else 0
    zero = module.zero.float().reshape(-1, G).expand(N, G) if module.zero.numel() else torch.zeros(N, G)
    zo = zero + offset  # w = (code - zo) * scale
    if act is not None and G > 1 and spec.symmetric and act == _TOKEN_A8:
        # ZeroQuant: signed integer weights (exact in int8 for symmetric codes), group scales
        q = (codes.to(torch.int16) - offset).to(torch.int8).contiguous()
        return RtLinear(name, Q8A8G, N, K, gs, q, _maybe_half(scale, None)[0], bias=bias)
    if act is not None:
        if not (act.dynamic and act.bits == 8 and act.symmetric and act.granularity == "token" and G == 1):
            raise UnsupportedFormat(f"layer {name}: no decode kernel for activations {act} with {spec.describe()} weights")
        q = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        corr = (128 - zo[:, 0]).round().to(torch.int32).contiguous()
        return RtLinear(name, Q8A8, N, K, K, q, scale[:, 0].contiguous(), bias=bias, corr=corr)
    if spec.bits <= 4:
        if K % 32 or gs % 32:
            return _fallback(name, module.dequantized_weight(), bias,
                             f"4-bit layout needs K={K} and group size {gs} to be multiples of 32")
        scale_h, minv_h = _maybe_half(scale, -zo * scale)
        if scale_h.dtype != torch.float16 and torch.equal(scale.half().float(), scale):
            # fp16 scales with integer zero-points (our asymmetric RTN/GPTQ): 3 bytes per group, not 8
            return RtLinear(name, Q4, N, K, gs, pack_nibbles(codes), scale.half().contiguous(), None, bias,
                            zero=zo.to(torch.uint8).contiguous())
        return RtLinear(name, Q4, N, K, gs, pack_nibbles(codes), scale_h, minv_h, bias)
    if K % 16 or gs % 16:
        return _fallback(name, module.dequantized_weight(), bias, f"K={K} and group size {gs} must be multiples of 16")
    q = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
    minv = (128 - zo) * scale
    return RtLinear(name, Q8, N, K, gs, q, *_maybe_half(scale, minv if minv.any() else None), bias)


def quantize_rtn(name: str, weight: torch.Tensor, bias: torch.Tensor | None, bits: int = 8) -> RtLinear:
    """Round an fp32 weight to ``bits`` per output row (symmetric RTN, the same rounding
    and fp16 scales as ``slimformer.quant``) and return it in the runtime layout."""
    from slimformer.formats.spec import WeightSpec

    module = QuantLinear.from_float(weight.detach().float(), bias, WeightSpec(bits=bits))
    return from_quant_linear(name, module)


def concat(name: str, parts: list[RtLinear]) -> RtLinear:
    """Stack layers that read the same input (q|k|v, gate|up) into one: one matvec pass."""
    first = parts[0]
    same = all(p.kind == first.kind and p.K == first.K and p.gs == first.gs for p in parts)
    if not same:  # mixed formats (e.g. mixed precision): run the stack as fp32
        return from_dense(name, torch.cat([p.dequantize() for p in parts]), _cat_bias(parts))
    if len({(p.half, p.zero is not None) for p in parts}) > 1:
        # one stack, one layout: float32 scales and offsets hold every part exactly
        parts = [RtLinear(p.name, p.kind, p.N, p.K, p.gs, p.w, p.scale.float(),
                          (-(p.zero.float() * p.scale.float())).contiguous() if p.zero is not None
                          else None if p.minv is None else p.minv.float(), p.bias, p.corr) for p in parts]
        first = parts[0]
    cat = lambda ts: torch.cat(ts).contiguous()  # noqa: E731
    minv = None
    if any(p.minv is not None for p in parts):
        minv = cat([p.minv if p.minv is not None else torch.zeros(p.N, p.groups, dtype=first.scale.dtype)
                    for p in parts])
    scale = None if first.scale is None else cat([p.scale for p in parts])
    corr = None if first.corr is None else cat([p.corr for p in parts])
    zero = None if first.zero is None else cat([p.zero for p in parts])
    return RtLinear(name, first.kind, sum(p.N for p in parts), first.K, first.gs, cat([p.w for p in parts]),
                    scale, minv, _cat_bias(parts), corr, zero)


def _cat_bias(parts: list[RtLinear]) -> torch.Tensor | None:
    if all(p.bias is None for p in parts):
        return None
    return torch.cat([p.bias if p.bias is not None else torch.zeros(p.N) for p in parts]).contiguous()


# --------------------------------------------------------------------- GGUF blocks
GGUF_BLOCK = 32


def from_gguf_tensor(name: str, qtype: str, data: np.ndarray, N: int, K: int) -> RtLinear:
    """Repack one GGUF tensor's blocks (``data``: ``[N, bytes per row]`` uint8) without
    requantising: Q8_0 (d, 32 int8), Q4_0 (d, 16 nibble bytes; w = d(c - 8)),
    Q4_1 (d, m, 16 nibble bytes; w = d c + m). F32/F16 load as fp32."""
    if qtype in ("F32", "F16", "BF16"):
        arr = np.asarray(data)
        w = torch.from_numpy(arr.astype(np.float32) if qtype != "BF16" else
                             (arr.view(np.uint16).astype(np.uint32) << 16).view(np.float32)).reshape(N, K)
        return from_dense(name, w, None)
    if K % GGUF_BLOCK:
        raise UnsupportedFormat(f"tensor {name}: {K} columns are not whole blocks of {GGUF_BLOCK}")
    G = K // GGUF_BLOCK
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(N, G, -1)
    d = torch.from_numpy(raw[..., 0:2].copy().view(np.float16)).reshape(N, G)  # kept as float16: exact
    if qtype == "Q8_0":
        q = torch.from_numpy(raw[..., 2:34].copy().view(np.int8)).reshape(N, K)
        return RtLinear(name, Q8, N, K, GGUF_BLOCK, q.contiguous(), d.contiguous())
    if qtype == "Q4_0":
        qs = raw[..., 2:18]
        d, minv = _maybe_half(d, -8.0 * d.float())
    elif qtype == "Q4_1":
        qs = raw[..., 4:20]
        minv = torch.from_numpy(raw[..., 2:4].copy().view(np.float16)).reshape(N, G)
    else:
        raise UnsupportedFormat(f"tensor {name}: GGUF type {qtype} has no runtime layout (Q4_0, Q4_1, Q8_0, F16, F32)")
    # GGUF's nibble order is the runtime's (byte j: element j low, element j + 16 high): a copy.
    packed = torch.from_numpy(np.ascontiguousarray(qs)).reshape(N, K // 2)
    return RtLinear(name, Q4, N, K, GGUF_BLOCK, packed, d.contiguous(), minv.contiguous())


def select_rows(lin: RtLinear, index: torch.Tensor) -> RtLinear:
    """The output rows ``index`` of ``lin``, in that order (undoing GGUF's Q/K row
    interleave, slicing a tile, looking up embedding rows); exact."""
    pick = lambda t: None if t is None else t[index].contiguous()  # noqa: E731
    return RtLinear(lin.name, lin.kind, index.numel(), lin.K, lin.gs, pick(lin.w), pick(lin.scale), pick(lin.minv),
                    pick(lin.bias), pick(lin.corr), pick(lin.zero))


def dense_matmul(x: torch.Tensor, lin: RtLinear, dequant_rows=None, tile_bytes: int = 8 << 20) -> torch.Tensor:
    """``x [M, K] @ W^T`` for prefill: fp32 GEMM on tiles of rows dequantised by
    ``dequant_rows(lin, n0, n1, out)`` (measured faster than a fused int kernel at large M)."""
    if lin.kind == F32:
        return F.linear(x, lin.w, lin.bias)
    if lin.kind == Q8A8:
        return _w8a8_matmul(x, lin)
    if lin.kind == Q8A8G:
        return _w8a8_group_matmul(x, lin)
    rows = max(64, (tile_bytes // (4 * lin.K)) // 64 * 64)
    fill = dequant_rows or (lambda l, n0, n1, out: out.copy_(_dequant_slice(l, n0, n1)))
    if rows >= lin.N:
        w = torch.empty(lin.N, lin.K, dtype=torch.float32)
        fill(lin, 0, lin.N, w)
        return F.linear(x, w, lin.bias)
    y = torch.empty(x.shape[0], lin.N, dtype=torch.float32)
    buf = torch.empty(rows, lin.K, dtype=torch.float32)
    for n0 in range(0, lin.N, rows):
        n1 = min(lin.N, n0 + rows)
        tile = buf[: n1 - n0]
        fill(lin, n0, n1, tile)
        y[:, n0:n1] = F.linear(x, tile, None if lin.bias is None else lin.bias[n0:n1])
    return y


def _dequant_slice(lin: RtLinear, n0: int, n1: int) -> torch.Tensor:
    return select_rows(lin, torch.arange(n0, n1)).dequantize()


def _w8a8_matmul(x: torch.Tensor, lin: RtLinear) -> torch.Tensor:
    """Dynamic per-token int8 activations, exact int32 accumulation (``torch._int_mm``
    when this torch has it on CPU), same rounding as the decode kernel."""
    from slimformer.kernels import reference

    q, sx = reference.quantize_activation_per_token(x)
    try:
        acc = torch._int_mm(q.to(torch.int8).contiguous(), lin.w.t())
    except (RuntimeError, AttributeError, NotImplementedError):
        acc = (q.double() @ lin.w.double().t()).to(torch.int32)
    acc = acc + lin.corr[None, :] * q.sum(-1, keepdim=True)
    y = acc.float() * (sx * lin.scale[None, :])
    return y if lin.bias is None else y + lin.bias


def _w8a8_group_matmul(x: torch.Tensor, lin: RtLinear) -> torch.Tensor:
    """Q8A8G for many tokens: the group-wise W8A8 kernel of slimformer.kernels, the
    same quantisation and integer sums as the decode step."""
    from slimformer import kernels

    if lin.packed is None:
        codes = (lin.w.to(torch.int16) + 128).to(torch.uint8)
        lin.packed = kernels.prepare_w8a8_groups(codes, lin.scale.float(), lin.gs, bits=8)
    return kernels.w8a8_group_linear(x, lin.packed, lin.bias)
