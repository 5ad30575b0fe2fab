"""LLM.int8() (Dettmers et al. 2022): vector-wise int8 matmul with a mixed-precision
decomposition for the emergent outlier features.

Per projection ``y = x Wᵀ + b`` with ``x [tokens, K]``:
  * input dimensions j where some |x_j| ≥ ``threshold`` are *outlier dimensions*: their
    part ``x[:, O] W[:, O]ᵀ`` is computed in floating point;
  * the rest is an int8 × int8 matmul with one scale per token (row of x) and one per
    output row of W, rescaled by the outer product of the two scale vectors.

The outlier set is the one found on calibration data (those columns of W are kept in
the model's dtype, bit for bit), plus any further column that exceeds the threshold in
the input at hand: such a column goes through the floating-point matmul with its int8
weights dequantised, as bitsandbytes does at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from slimformer.core.transform import BlockContext, Needs, Transform, register
from slimformer.errors import QuantConfigError
from slimformer.nn.int8_outlier import (
    Int8OutlierLinear,
)
from slimformer.nn.surgery import linear_weight, set_module


@register
@dataclass(frozen=True)
class LLMInt8(Transform):
    """Swap each target projection for an :class:`Int8OutlierLinear`; its outlier input
    dimensions are those where any calibration input reaches ``threshold`` in magnitude."""

    threshold: float = 6.0

    needs = Needs.CALIBRATION

    def __post_init__(self):
        if not self.threshold >= 0:
            raise QuantConfigError(f"threshold must be a non-negative number, got {self.threshold!r}")

    def prepare(self, block: nn.Module, ctx: BlockContext) -> None:
        """Record each target projection's per-input-column max |x| over the calibration data."""
        column_max: dict[str, torch.Tensor] = {}
        handles = []
        for name, module in self.target_linears(block, ctx).items():
            def observe(_module, args, name=name):
                x = args[0].detach()
                amax = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
                column_max[name] = amax if name not in column_max else torch.maximum(column_max[name], amax)

            handles.append(module.register_forward_pre_hook(observe))
        ctx.state["column_max"], ctx.state["handles"] = column_max, handles

    def convert(self, block: nn.Module, ctx: BlockContext) -> None:
        for handle in ctx.state.pop("handles", []):
            handle.remove()
        column_max = ctx.state.pop("column_max", {})
        for name, module in self.target_linears(block, ctx).items():
            if name not in column_max:
                raise QuantConfigError(f"{ctx.prefix}.{name}: no calibration input reached this projection")
            outliers = (column_max[name] >= self.threshold).nonzero().flatten()
            qlinear = Int8OutlierLinear.from_float(linear_weight(module), module.bias, outliers, self.threshold)
            ctx.report(name, outlier_fraction=qlinear.outlier_fraction, outlier_dims=outliers.tolist())
            set_module(block, name, qlinear)
