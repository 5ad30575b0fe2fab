"""PEGLinear and the static activation grid: the input is quantised with static parameters
shared by groups of its dimensions (PEG; mixed 16/8 keeps the grid for hidden states)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimformer.errors import QuantConfigError
from slimformer.formats import packing
from slimformer.formats.matrix import CompressedMatrix, NotNative
from slimformer.formats.primitives import (
    choose_qparams,
    dequantize_weight,
    fake_quantize_activation,
    quantize_weight,
)
from slimformer.formats.spec import WeightSpec, _IntegerGrid
from slimformer.nn.base import CompressedLinear
from slimformer.nn.registry import register_module_type
from slimformer.nn.surgery import linear_weight

W8_PER_CHANNEL = WeightSpec(8, True, "channel")



def float_weight(module: nn.Module, path: str) -> torch.Tensor:
    """The ``[out, in]`` weight of a float projection; a one-line error naming the layer
    when an earlier stage already quantised it."""
    try:
        return linear_weight(module)
    except TypeError:
        raise QuantConfigError(f"{path}: needs a float layer, found {type(module).__name__} "
                               "(an earlier stage already quantised it)") from None



@dataclass(frozen=True)
class ActGrid(_IntegerGrid):
    """The integer grid of statically quantised activations: 2 to 16 bits (ActSpec stops
    at 8; mixed precision keeps some activations on the int16 grid)."""

    bits: int = 8
    symmetric: bool = True

    def __post_init__(self):
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 16:
            raise QuantConfigError(f"activation bits must be from 2 to 16, got {self.bits!r}")



def static_group_params(lo: torch.Tensor, hi: torch.Tensor, grid: ActGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero-point covering each observed range ``[lo_g, hi_g]``
    (``[K]`` each; the grid always holds 0). Same arithmetic as RTN's per-tensor
    ``static_act_params``, one row per group."""
    observed = torch.stack([lo.float().clamp_max(0), hi.float().clamp_min(0)], dim=-1)
    if grid.symmetric:
        observed = observed.abs()
    return choose_qparams(observed, grid.bits, grid.symmetric)



@register_module_type
class PEGLinear(CompressedLinear):
    """``y = act_q(x) @ dequant(W)ᵀ + b`` where the input is quantised with static
    parameters shared by groups of its dimensions.

    Buffers (what is saved): ``qweight`` (uint8 packed), ``scale`` (float16, one per row),
    ``zero`` (uint8, asymmetric weights only), ``bias``, ``act_group`` (int16: the group
    of each input dimension), ``act_scale``/``act_zero`` (float32, one per group).
    """

    def __init__(self, in_features: int, out_features: int, groups: int, act_grid: ActGrid,
                 weight_spec: WeightSpec = W8_PER_CHANNEL, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if weight_spec.granularity != "channel":
            raise QuantConfigError("PEGLinear weights are quantised per output channel")
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.act_grid, self.weight_spec = act_grid, weight_spec
        numel = in_features * out_features
        self.register_buffer("qweight", torch.zeros(packing.packed_nbytes(numel, weight_spec.bits), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, 1, dtype=torch.float16))
        self.register_buffer("zero", torch.zeros((0,) if weight_spec.symmetric else (out_features, 1), dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.register_buffer("act_group", torch.zeros(in_features, dtype=torch.int16))
        self.register_buffer("act_scale", torch.ones(groups))
        self.register_buffer("act_zero", torch.zeros(groups))
        self.compute_dtype = dtype

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, group_of: torch.Tensor,
                   lo: torch.Tensor, hi: torch.Tensor, act_grid: ActGrid,
                   weight_spec: WeightSpec = W8_PER_CHANNEL) -> "PEGLinear":
        """From an ``[out, in]`` weight, the group of each input dimension and the
        calibrated per-dimension input range ``lo``/``hi``."""
        out_features, in_features = weight.shape
        groups = int(group_of.max()) + 1
        module = cls(in_features, out_features, groups, act_grid, weight_spec, bias is not None, weight.dtype)
        codes, scale, zero = quantize_weight(weight, weight_spec)
        module.qweight = packing.pack(codes, weight_spec.bits)
        module.scale = scale.to(torch.float16).contiguous()
        if not weight_spec.symmetric:
            module.zero = zero.to(torch.uint8).contiguous()
        if bias is not None:
            module.bias = bias.detach().clone()
        group_lo = torch.full((groups,), float("inf")).scatter_reduce(0, group_of, lo.float(), "amin")
        group_hi = torch.full((groups,), float("-inf")).scatter_reduce(0, group_of, hi.float(), "amax")
        module.act_scale, module.act_zero = static_group_params(group_lo, group_hi, act_grid)
        module.act_group = group_of.to(torch.int16)
        return module

    def dequantized_weight(self) -> torch.Tensor:
        numel = self.in_features * self.out_features
        shape = torch.Size((self.out_features, self.in_features))
        codes = packing.unpack(self.qweight, self.weight_spec.bits, numel).reshape(shape)
        return dequantize_weight(codes, self.scale, self.zero, self.weight_spec, shape).to(self.compute_dtype)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        group = self.act_group.long()
        return fake_quantize_activation(x, self.act_grid, self.act_scale[group], self.act_zero[group])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the dense weight is dequantised once (not saved; dropped with new weights)
        if self._weight is None:
            self._weight = self.dequantized_weight()
        return F.linear(self.quantize_input(x), self._weight.to(x.dtype), self.bias)

    _weight = None

    def drop_runtime(self) -> None:
        self._weight = None

    @property
    def dense_equivalent(self) -> bool:
        return False   # the input is quantised with static per-group parameters

    def matrix(self, name: str = "") -> CompressedMatrix:
        raise NotNative(f"static a{self.act_grid.bits} activations with per-group parameters (PEG) have no "
                        "native kernel", dense_ok=False)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, {self.weight_spec.describe()}, "
                f"a{self.act_grid.bits}-static, groups={self.groups}")

    def config(self) -> dict:
        return {
            "type": "PEGLinear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "groups": self.groups,
            "bias": self.bias is not None,
            "weight": self.weight_spec.to_dict(),
            "act": self.act_grid.to_dict(),
        }

    @classmethod
    def from_config(cls, cfg: dict, dtype: torch.dtype = torch.float32) -> "PEGLinear":
        return cls(cfg["in_features"], cfg["out_features"], cfg["groups"], ActGrid(**cfg["act"]),
                   WeightSpec(**cfg["weight"]), cfg["bias"], dtype)
