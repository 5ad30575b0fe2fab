"""ZeroQuant (Yao et al. 2022): group-wise weights, token-wise dynamic activations.

Each projection's weight gets one symmetric scale per group of ``group_size`` input
columns; each token's input gets its own scale at run time (no calibration). The
speed comes from the kernel, not from the transform: ``QuantLinear`` runs this format
on ``kernels.w8a8_group_linear``, which quantises the tokens in its input pass (the
quantise step fused into the matmul's prologue rather than a separate op and tensor)
and applies the group and token scales to exact int32 group dot products in its
epilogue (dequantisation fused into the matmul).

The paper's layer-by-layer distillation (LKD) is not part of this transform: it needs
training, and the format is the same with or without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from slimformer.core.transform import BlockContext, Transform, register
from slimformer.errors import QuantConfigError
from slimformer.formats.spec import ActSpec, WeightSpec
from slimformer.nn.quant_linear import QuantLinear
from slimformer.nn.surgery import linear_weight, set_module


@register
@dataclass(frozen=True)
class ZeroQuant(Transform):
    weight_bits: int = 8
    group_size: int = 64
    act_bits: int = 8

    def __post_init__(self):
        self.weight_spec()   # validate early: bits range, group size
        self.act_spec()

    def weight_spec(self) -> WeightSpec:
        return WeightSpec(self.weight_bits, True, "group", self.group_size)

    def act_spec(self) -> ActSpec:
        return ActSpec(self.act_bits, True, "token", True)

    def convert(self, block: nn.Module, ctx: BlockContext) -> None:
        wspec, aspec = self.weight_spec(), self.act_spec()
        for name, module in self.target_linears(block, ctx).items():
            weight = linear_weight(module)
            if weight.shape[1] % self.group_size:
                raise QuantConfigError(
                    f"{ctx.prefix}.{name}: group_size {self.group_size} does not divide its "
                    f"{weight.shape[1]} input columns"
                )
            qlinear = QuantLinear.from_float(weight, module.bias, wspec, aspec)
            error = (qlinear.dequantized_weight() - weight.float()).norm() / weight.float().norm().clamp_min(1e-30)
            ctx.report(name, weight_rel_error=round(error.item(), 6))
            set_module(block, name, qlinear)
