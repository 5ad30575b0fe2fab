"""Reference paths: dequantise with the project's own primitives and call F.linear.

Every fast kernel in :mod:`slimformer.kernels` is tested against these, and shapes
a kernel cannot handle fall back to them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimformer.formats.primitives import dequantize_weight
from slimformer.formats.spec import ActSpec, WeightSpec


def int8_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int = 8,
                symmetric: bool = True) -> torch.Tensor:
    spec = WeightSpec(bits=bits, symmetric=symmetric, granularity="channel")
    scale = scale.float().reshape(-1, 1).expand(codes.shape[0], 1)
    z = None if zero is None or not zero.numel() else zero.float().reshape(-1, 1).expand(codes.shape[0], 1)
    return dequantize_weight(codes, scale, z, spec, codes.shape)


def int4_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int | None,
                symmetric: bool, bits: int = 4) -> torch.Tensor:
    n, k = codes.shape
    if group_size is None or group_size == k or scale.shape[-1] == 1:
        spec = WeightSpec(bits=bits, symmetric=symmetric, granularity="channel")
    else:
        spec = WeightSpec(bits=bits, symmetric=symmetric, granularity="group", group_size=group_size)
    scale = scale.float().reshape(-1, scale.shape[-1]).expand(n, -1)
    z = None if zero is None or not zero.numel() else zero.float()
    return dequantize_weight(codes, scale.float(), z, spec, codes.shape)


def int8_linear(x, codes, scale, zero=None, bits=8, symmetric=True, bias=None) -> torch.Tensor:
    w = int8_weight(codes, scale, zero, bits, symmetric)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def int4_linear(x, codes, scale, zero, group_size, symmetric, bias=None, bits=4) -> torch.Tensor:
    w = int4_weight(codes, scale, zero, group_size, symmetric, bits)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def quantize_activation_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per token, as primitives.fake_quantize_activation:
    returns (q int ``[M, K]`` as int32, scale ``[M, 1]``)."""
    from slimformer.formats.primitives import activation_scale

    spec = ActSpec(bits=8, symmetric=True, granularity="token", dynamic=True)
    x2 = x.reshape(-1, x.shape[-1]).float()
    scale, _ = activation_scale(x2, spec)
    q = torch.round(x2 / scale).clamp(spec.qmin, spec.qmax).to(torch.int32)
    return q, scale


def w8a8_linear(x, codes, scale, zero=None, bits=8, symmetric=True, bias=None) -> torch.Tensor:
    """Exact integer reference: int64 accumulation of int8 activation codes times
    integer weight values, then ``× (s_x ⊗ s_w)``."""
    offset = 2 ** (bits - 1) if symmetric else 0
    wq = codes.to(torch.int64) - offset
    if zero is not None and zero.numel():
        wq = wq - zero.reshape(-1, 1).round().to(torch.int64)
    q, sx = quantize_activation_per_token(x)
    acc = q.to(torch.int64) @ wq.t()  # exact
    sw = scale.float().reshape(1, -1).expand(1, codes.shape[0])
    y = acc.to(torch.float32) * (sx * sw)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], codes.shape[0]).to(x.dtype)
