"""Model-level decisions that one stage plans and another applies (``BlockContext.plan``)."""

from __future__ import annotations

from slimformer.core.transform import BlockContext
from slimformer.errors import QuantConfigError
from slimformer.formats.spec import WeightSpec


def planned_bits(ctx: BlockContext, name: str, default: int, spec: WeightSpec) -> int:
    """The bits a HAWQ stage planned for layer ``name`` of this block (else ``default``);
    the quantising stage must use the format HAWQ measured errors with."""
    planned = ctx.plan.get("bits", {})
    if not planned:
        return default
    fmt = (spec.granularity, spec.group_size, spec.symmetric)
    if ctx.plan.get("bits_format") != fmt:
        measured = ctx.plan.get("bits_format")
        raise QuantConfigError(f"HAWQ allocated bits for granularity {measured[0]}, group_size {measured[1]}, "
                               f"symmetric {measured[2]}, but the quantising stage uses {fmt[0]}, {fmt[1]}, "
                               f"{fmt[2]}: give both stages the same format")
    return planned.get(f"{ctx.prefix}.{name}", default)
