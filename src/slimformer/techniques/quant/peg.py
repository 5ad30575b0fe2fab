"""PEG (Bondarenko 2021): per-embedding-group static activation quantisation.

The input dimensions of each target Linear are split into K equal groups, each with
one static scale and zero-point calibrated from the min/max of its dimensions. With
``permute`` the groups come from a range-based permutation: dimensions sorted by their
calibrated range, so the few outlier dimensions share a group instead of stretching the
grid of every other dimension. The permutation is stored as a per-dimension group
index, so nothing is reordered at run time. Weights: round to nearest, 8 bits per
output channel, packed as QuantLinear packs them.

``PEGLinear`` is also the layer of mixed 16/8-bit activations (one group, 8 or 16 bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from slimformer.core.observers import InputRangeObserver
from slimformer.core.transform import BlockContext, Needs, Transform, register
from slimformer.errors import QuantConfigError
from slimformer.formats.spec import WeightSpec
from slimformer.nn.peg import (
    ActGrid,
    PEGLinear,
    float_weight,
)
from slimformer.nn.surgery import set_module


def group_assignment(lo: torch.Tensor, hi: torch.Tensor, groups: int, permute: bool, symmetric: bool) -> torch.Tensor:
    """The group of each input dimension: contiguous blocks of ``in/groups`` dimensions,
    or, with ``permute``, blocks of the dimensions sorted by calibrated range (what sets
    the scale: max |x| when symmetric, max − min otherwise)."""
    n = lo.numel()
    rank_to_group = torch.arange(n) // (n // groups)
    if not permute:
        return rank_to_group
    spread = torch.maximum(lo.abs(), hi.abs()) if symmetric else hi - lo
    order = torch.argsort(spread.float(), stable=True)
    group = torch.empty(n, dtype=torch.long)
    group[order] = rank_to_group
    return group


@register
@dataclass(frozen=True)
class PEG(Transform):
    """Per-embedding-group activation quantisation (``bits``, static, ``groups`` groups
    of input dimensions, range-sorted when ``permute``) with 8-bit per-channel weights."""

    groups: int = 6
    permute: bool = True
    bits: int = 8                 # activation bits
    act_symmetric: bool = True
    weight_bits: int = 8
    needs = Needs.CALIBRATION

    def __post_init__(self):
        if not isinstance(self.groups, int) or self.groups < 1:
            raise QuantConfigError(f"groups must be a positive integer, got {self.groups!r}")
        self.act_grid()
        self.weight_spec()

    def act_grid(self) -> ActGrid:
        if self.bits > 8:
            raise QuantConfigError(f"PEG activation bits must be from 2 to 8, got {self.bits}")
        return ActGrid(self.bits, self.act_symmetric)

    def weight_spec(self) -> WeightSpec:
        return WeightSpec(self.weight_bits, True, "channel")

    def plan_model(self, model, adapter, calib, plan) -> None:
        """Refuse, before any block changes, a group count that does not divide a layer."""
        for index, block in enumerate(adapter.get_blocks(model)):
            for name in self.targets.select(adapter.linears, index):
                in_features = float_weight(block.get_submodule(name), f"{adapter.blocks}.{index}.{name}").shape[1]
                if in_features % self.groups:
                    raise QuantConfigError(
                        f"{adapter.blocks}.{index}.{name}: PEG groups {self.groups} does not divide "
                        f"its {in_features} input dimensions")

    def prepare(self, block: nn.Module, ctx: BlockContext) -> None:
        ctx.state["observer"] = InputRangeObserver(self.target_linears(block, ctx))

    def convert(self, block: nn.Module, ctx: BlockContext) -> None:
        observer: InputRangeObserver = ctx.state.pop("observer")
        observer.remove()
        grid, wspec = self.act_grid(), self.weight_spec()
        for name, module in self.target_linears(block, ctx).items():
            lo, hi = observer.lo[name], observer.hi[name]
            group_of = group_assignment(lo, hi, self.groups, self.permute, grid.symmetric)
            weight = float_weight(module, f"{ctx.prefix}.{name}")
            layer = PEGLinear.from_float(weight, module.bias, group_of, lo, hi, grid, wspec)
            # How much the widest group's grid is coarser than the narrowest one's.
            ctx.report(name, peg_scale_ratio=round(float(layer.act_scale.max() / layer.act_scale.min()), 3))
            set_module(block, name, layer)
