"""RTN: round every weight to the nearest grid point; optionally quantise the
Linear inputs too (dynamic per token / per tensor, or static from calibration)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from slimformer.core.plan import planned_bits
from slimformer.core.transform import BlockContext, Needs, Transform, register
from slimformer.errors import QuantConfigError
from slimformer.formats.primitives import static_act_params
from slimformer.formats.spec import QuantFormat
from slimformer.nn.quant_linear import QuantLinear
from slimformer.nn.surgery import linear_weight, set_module


@register
@dataclass(frozen=True)
class RTN(QuantFormat, Transform):
    """Arguments: the weight / activation format (:class:`QuantFormat`) and ``targets``."""

    def requires(self) -> Needs:
        static = self.act_bits is not None and not self.act_dynamic
        return Needs.CALIBRATION if static else Needs.NONE

    def prepare(self, block: nn.Module, ctx: BlockContext) -> None:
        """Observe the min/max of each target Linear's input for static activation scales."""
        ranges: dict[str, list[float]] = {}
        handles = []
        for name, module in self.target_linears(block, ctx).items():
            ranges[name] = [0.0, 0.0]

            def observe(_module, args, name=name):
                x = args[0].detach()
                ranges[name][0] = min(ranges[name][0], x.min().item())
                ranges[name][1] = max(ranges[name][1], x.max().item())

            handles.append(module.register_forward_pre_hook(observe))
        ctx.state["ranges"], ctx.state["handles"] = ranges, handles

    def convert(self, block: nn.Module, ctx: BlockContext) -> None:
        for handle in ctx.state.pop("handles", []):
            handle.remove()
        ranges = ctx.state.pop("ranges", {})
        wspec, aspec = self.weight_spec(), self.act_spec()
        for name, module in self.target_linears(block, ctx).items():
            weight = linear_weight(module)
            spec = self.weight_spec(planned_bits(ctx, name, self.bits, wspec))   # HAWQ may choose per layer
            try:
                qlinear = QuantLinear.from_float(weight, module.bias, spec, aspec)
            except QuantConfigError as exc:
                raise QuantConfigError(f"{ctx.prefix}.{name}: {exc}") from None
            if aspec is not None and not aspec.dynamic:
                lo, hi = ranges[name]
                qlinear.act_scale, qlinear.act_zero = static_act_params(lo, hi, aspec)
            set_module(block, name, qlinear)


