"""QuantLinear: a Linear that stores packed integer weights and computes correctly.

This is the reference path: the weight is unpacked and dequantised per forward,
one layer at a time, so memory stays at the packed size. Fast kernels come from
``slimformer.kernels`` (runtime issue) and must match this module's output.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimformer.quant import packing
from slimformer.quant.primitives import dequantize_weight, fake_quantize_activation, quantize_weight
from slimformer.quant.spec import ActSpec, WeightSpec


class QuantLinear(nn.Module):
    """``y = act_q(x) @ dequant(W)ᵀ + b`` with W held as packed ``bits``-bit codes.

    Buffers (what is saved): ``qweight`` (uint8 packed), ``scale`` (float16), ``zero``
    (uint8, asymmetric only), ``bias`` and, for static activation quantisation,
    ``act_scale``/``act_zero``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_spec: WeightSpec,
        act_spec: ActSpec | None = None,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec, self.act_spec = weight_spec, act_spec
        numel = in_features * out_features
        groups = {"tensor": 1, "channel": 1, "group": in_features // (weight_spec.group_size or 1)}
        rows = 1 if weight_spec.granularity == "tensor" else out_features
        n_groups = groups[weight_spec.granularity]
        self.register_buffer("qweight", torch.zeros(packing.packed_nbytes(numel, weight_spec.bits), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(rows, n_groups, dtype=torch.float16))
        # Symmetric formats have no zero-point; keep an empty buffer so nothing is stored.
        zero_shape = (0,) if weight_spec.symmetric else (rows, n_groups)
        self.register_buffer("zero", torch.zeros(zero_shape, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        static = act_spec is not None and not act_spec.dynamic
        self.register_buffer("act_scale", torch.ones(()) if static else None)
        self.register_buffer("act_zero", torch.zeros(()) if static else None)
        self.compute_dtype = dtype

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_spec: WeightSpec,
        act_spec: ActSpec | None = None,
        codes: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        zero: torch.Tensor | None = None,
    ) -> "QuantLinear":
        """Build from an ``[out, in]`` float weight. Techniques that choose their own
        codes (GPTQ, ...) pass ``codes``/``scale``/``zero``; otherwise RTN is used."""
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, weight_spec, act_spec, bias is not None, weight.dtype)
        if codes is None:
            codes, scale, zero = quantize_weight(weight, weight_spec)
        module.qweight = packing.pack(codes, weight_spec.bits)
        module.scale = scale.to(torch.float16).contiguous()
        module.zero = zero.to(torch.uint8).contiguous() if not weight_spec.symmetric else module.zero
        if bias is not None:
            module.bias = bias.detach().clone()
        return module

    def codes(self) -> torch.Tensor:
        numel = self.in_features * self.out_features
        return packing.unpack(self.qweight, self.weight_spec.bits, numel).reshape(self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        shape = torch.Size((self.out_features, self.in_features))
        return dequantize_weight(self.codes(), self.scale, self.zero, self.weight_spec, shape).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_spec is not None:
            x = fake_quantize_activation(x, self.act_spec, self.act_scale, self.act_zero)
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        act = "" if self.act_spec is None else f", act=a{self.act_spec.bits}-{self.act_spec.granularity}"
        return f"{self.in_features}, {self.out_features}, {self.weight_spec.describe()}{act}"

    def config(self) -> dict:
        """What a saved directory records to rebuild this module."""
        return {
            "type": "QuantLinear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "weight": self.weight_spec.to_dict(),
            "act": None if self.act_spec is None else self.act_spec.to_dict(),
        }

    @classmethod
    def from_config(cls, cfg: dict, dtype: torch.dtype = torch.float32) -> "QuantLinear":
        act = ActSpec(**cfg["act"]) if cfg.get("act") else None
        return cls(cfg["in_features"], cfg["out_features"], WeightSpec(**cfg["weight"]), act, cfg["bias"], dtype)
