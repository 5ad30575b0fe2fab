"""One-shot pruning Transforms: magnitude (layer-wise or global) and N:M, optionally
after a channel-permutation search (Pool & Yu 2021).

They zero weights in place (the dense layout, so every runtime and later stage reads
them unchanged); the ``SparseStorage`` stage (``sparsity/storage.py``) then stores the
pruned layers compactly. Each pruned layer reports its sparsity and the fraction of
|weight| it kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from slimformer.core.transform import BlockContext, Transform, register, target_weights
from slimformer.eval.sparsity import describe_sparsity
from slimformer.formats.masks import (
    check_nm,
    check_sparsity,
    global_threshold,
    kept_magnitude,
    magnitude_mask,
    nm_mask,
    sparsity_of,
    threshold_mask,
)
from slimformer.nn.surgery import linear_weight


def _prune(weight: torch.Tensor, mask: torch.Tensor, ctx: BlockContext, name: str) -> None:
    ctx.report(name, sparsity=round(sparsity_of(mask), 6), kept_magnitude=round(kept_magnitude(weight, mask), 6))
    with torch.no_grad():
        weight.mul_(mask)


class _Pruning(Transform):
    """A one-shot pruning stage: its result is described by the sparsity of its targets."""

    def summary(self, model, adapter):
        return {"sparsity": describe_sparsity(target_weights(model, adapter, self.targets))}


@register
@dataclass(frozen=True)
class Magnitude(_Pruning):
    """Zero the smallest weights: ``sparsity`` of each layer (``scope: layer``) or of all
    targeted layers together under one threshold (``scope: global``)."""

    sparsity: float = 0.5
    scope: Literal["layer", "global"] = "layer"

    def __post_init__(self):
        check_sparsity(self.sparsity)
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope must be layer or global, got {self.scope!r}")

    def plan_model(self, model, adapter, calib, plan):
        if self.scope == "global":
            weights = list(target_weights(model, adapter, self.targets).values())
            plan[("magnitude_threshold", id(self))] = global_threshold(weights, self.sparsity)

    def convert(self, block, ctx):
        for name, module in self.target_linears(block, ctx).items():
            weight = linear_weight(module)
            if self.scope == "global":
                mask = threshold_mask(weight, ctx.plan[("magnitude_threshold", id(self))])
            else:
                mask = magnitude_mask(weight, self.sparsity)
            _prune(weight, mask, ctx, name)


@register
@dataclass(frozen=True)
class NMSparsity(_Pruning):
    """Keep the ``n`` largest of every ``m`` consecutive input weights of each row.

    ``permute: true`` first searches a permutation of the input channels of the layers
    whose inputs can be permuted without changing the function (down_proj with gate/up
    rows; o_proj with value rows, per key/value head) and applies it to the connected
    layers, so more magnitude survives the pruning."""

    n: int = 2
    m: int = 4
    permute: bool = False
    search_rounds: int = 200
    seed: int = 0

    def __post_init__(self):
        check_nm(self.n, self.m)

    def convert(self, block, ctx):
        if self.permute:
            from slimformer.core.permutation import permute_block_for_nm

            before_after = permute_block_for_nm(block, ctx.adapter, ctx.model.config, self.n, self.m,
                                                max_rounds=self.search_rounds, seed=self.seed + ctx.index)
            for name, (before, after) in before_after.items():
                ctx.report(name, kept_magnitude_default_order=round(before, 6))
        for name, module in self.target_linears(block, ctx).items():
            weight = linear_weight(module)
            _prune(weight, nm_mask(weight, self.n, self.m, f"{ctx.prefix}.{name}"), ctx, name)


@register
@dataclass(frozen=True)
class SparseStorage(Transform):
    """Store the pruned projections compactly (``SparseLinear``): N:M as values + packed
    in-group positions when ``n``/``m`` are given and the weight is N:M, else a bitmap or
    CSR, whichever is smaller; ``dtype`` float16/bfloat16 halves the values. Place it after
    the pruning stage (or at the end of a training recipe)."""

    format: Literal["auto", "nm", "bitmap", "csr"] = "auto"
    n: int | None = None
    m: int | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = None

    def __post_init__(self):
        if (self.n is None) != (self.m is None):
            raise ValueError("give both n and m for N:M storage")
        if self.n is not None:
            check_nm(self.n, self.m)
        if self.format == "nm" and self.n is None:
            raise ValueError("format nm needs n and m")

    def convert(self, block, ctx):
        from slimformer.nn.sparse import SparseLinear
        from slimformer.nn.surgery import set_module

        for name, module in self.target_linears(block, ctx).items():
            sparse = SparseLinear.from_linear(module, self.format, self.n, self.m, self.dtype, f"{ctx.prefix}.{name}")
            ctx.report(name, storage=sparse.format, stored_bytes=sparse.stored_bytes(),
                       dense_bytes=linear_weight(module).numel() * linear_weight(module).element_size())
            set_module(block, name, sparse)
