"""Linear layers in the formats the native decoder multiplies with.

The description itself is :class:`slimformer.formats.matrix.CompressedMatrix` (``RtLinear``
here, its runtime name): kinds, the one Q4 layout, slicing and stacking live there, and
GGUF blocks <-> description in :mod:`slimformer.formats.gguf`. This module turns a model's
modules into descriptions (:func:`from_module`: any
:class:`~slimformer.nn.base.CompressedLinear` through its ``matrix()``) and multiplies many
tokens with them (:func:`dense_matmul`).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimformer.formats.gguf import GGUF_BLOCK, from_gguf_tensor, to_gguf_blocks  # noqa: F401 (re-exported)
from slimformer.formats.matrix import (  # noqa: F401 (re-exported: the decoder and tests use these names)
    F32,
    KIND_NAMES,
    Q4,
    Q8,
    Q8A8,
    Q8A8G,
    CompressedMatrix,
    NotNative,
    UnsupportedFormat,
    concat,
    from_dense,
    maybe_half,
    pack_nibbles,
    select_rows,
    unpack_nibbles,
)
from slimformer.nn.base import CompressedLinear, CompressedModule
from slimformer.nn.quant_linear import QuantLinear
from slimformer.nn.surgery import is_linear, linear_weight

RtLinear = CompressedMatrix
_maybe_half = maybe_half


def _fallback(name: str, weight: torch.Tensor, bias, why: str) -> RtLinear:
    """The dense fp32 description of a layer the native formats cannot hold, with the
    reason recorded on it (``fallback``) and warned naming the layer."""
    warnings.warn(f"slimformer.runtime: layer {name} runs as dequantised fp32 (slower): {why}",
                  RuntimeWarning, stacklevel=3)
    return from_dense(name, weight, bias, fallback=why)


def from_module(name: str, module: nn.Module) -> RtLinear:
    """The description of the layer at ``name``: an ``nn.Linear`` (or GPT-2 Conv1D) as fp32,
    any :class:`CompressedLinear` through its ``matrix()``. When the module has no native
    format but its dequantised weight computes the same function, the dense fp32 fallback
    with a warning naming the layer and why (recorded in ``fallback``); when running it
    dense would change the results (activation quantisation, outlier decomposition),
    :class:`UnsupportedFormat` naming the layer and why."""
    if isinstance(module, CompressedLinear):
        try:
            return module.matrix(name)
        except NotNative as exc:
            if not exc.dense_ok:
                raise UnsupportedFormat(f"layer {name} ({type(module).__name__}): {exc.reason}") from None
            return _fallback(name, module.dequantized_weight(), getattr(module, "bias", None),
                             f"{type(module).__name__}: {exc.reason}")
    if isinstance(module, CompressedModule):
        why = getattr(module, "not_native", None) or "not a matrix"
        raise UnsupportedFormat(f"layer {name} ({type(module).__name__}): {why}")
    if is_linear(module):
        return from_dense(name, linear_weight(module), module.bias)
    raise UnsupportedFormat(f"layer {name} is a {type(module).__name__}, not a linear layer")


def from_quant_linear(name: str, module: QuantLinear) -> RtLinear:
    """A QuantLinear's description (its stored Q4 bytes as they are; see ``QuantLinear.matrix``)."""
    return from_module(name, module)


def quantize_rtn(name: str, weight: torch.Tensor, bias: torch.Tensor | None, bits: int = 8) -> RtLinear:
    """Round an fp32 weight to ``bits`` per output row (symmetric RTN, the same rounding
    and fp16 scales as ``QuantLinear``) and return it in the runtime layout."""
    from slimformer.formats.spec import WeightSpec

    module = QuantLinear.from_float(weight.detach().float(), bias, WeightSpec(bits=bits))
    return from_quant_linear(name, module)


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
    return lin.select_rows(torch.arange(n0, n1)).dequantize()


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
