"""QuantLinear: a Linear that stores packed integer weights and computes correctly.

``forward`` runs the fast CPU kernels of ``slimformer.kernels`` (weight-only int8,
int2-4 group-wise, dynamic per-token W8A8), repacked into their runtime layout on
first use. ``forward_reference`` unpacks and dequantises the weight and calls
``F.linear``: the definition the kernels are tested against, and the path for
formats no kernel covers (5-7 bits in groups, static activation scales).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimformer import kernels
from slimformer.formats import packing
from slimformer.formats.primitives import (
    dequantize_weight,
    fake_quantize_activation,
    quantize_weight,
)
from slimformer.formats.spec import ActSpec, WeightSpec
from slimformer.nn.registry import register_module_type


@register_module_type
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

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_spec is not None:
            x = fake_quantize_activation(x, self.act_spec, self.act_scale, self.act_zero)
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runtime is None:
            self._runtime = self._prepare_runtime()
        kernel, packed = self._runtime
        if kernel is None:
            return self.forward_reference(x)
        return kernel(x, packed, self.bias).to(x.dtype)

    _runtime: tuple | None = None   # (kernel, packed weight), built on first forward

    def _prepare_runtime(self) -> tuple:
        """Pick the kernel for this format and repack the weight for it (once)."""
        spec, act = self.weight_spec, self.act_spec
        if not kernels.kernels_available():
            _warn_no_kernels()
            return None, None
        zero = None if spec.symmetric else self.zero
        group = spec.group_size if spec.granularity == "group" else None
        per_row = spec.granularity != "group"
        if act is not None:
            if act.dynamic and act.bits == 8 and act.symmetric and act.granularity == "token":
                if per_row:
                    return kernels.w8a8_linear, kernels.prepare_int8(self.codes(), self.scale, zero, spec.bits, spec.symmetric)
                if spec.symmetric:  # group-wise weights (ZeroQuant)
                    return kernels.w8a8_group_linear, kernels.prepare_w8a8_groups(self.codes(), self.scale, group, spec.bits)
            return None, None
        if spec.bits <= 4:
            return kernels.int4_linear, kernels.prepare_int4(self.codes(), self.scale, zero, group, spec.symmetric, bits=spec.bits)
        if per_row:
            return kernels.int8_linear, kernels.prepare_int8(self.codes(), self.scale, zero, spec.bits, spec.symmetric)
        return None, None

    def _load_from_state_dict(self, *args, **kwargs):
        self._runtime = None   # new weights: repack on the next forward
        super()._load_from_state_dict(*args, **kwargs)

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


_warned_no_kernels = False


def _warn_no_kernels() -> None:
    global _warned_no_kernels
    if not _warned_no_kernels:
        _warned_no_kernels = True
        warnings.warn(f"slimformer.kernels unavailable ({kernels.load_error()}); "
                      "quantised layers use the slow reference path", RuntimeWarning, stacklevel=3)
