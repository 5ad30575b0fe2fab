"""GOBO (Zadeh et al. 2020): weights treated as Gaussian; the few far out in the tails are
outliers kept in float16, every other weight becomes the index of one of 2^b centroids.

Per layer:
  * outliers: weights more than ``outlier_sigma`` standard deviations from the layer's
    mean. The paper fits a Gaussian per layer and flags weights whose log-probability is
    below −4; that cut depends on the layer's scale (for BERT-base's σ ≈ 0.04 it is
    ≈ 3.5σ), so we use the scale-free z-score instead, default 3σ (0.27% of a Gaussian);
  * the rest: per table (the whole layer, each output row, or each group of
    ``group_size`` input columns of a row) 2^b centroids, initialised on equally spaced
    quantiles and refined by Lloyd's iterations (assign each weight to its nearest
    centroid, move each centroid to the mean of its weights — the paper's update), until
    no assignment changes or ``iterations`` are done.

Stored: packed ``bits``-bit indices, the float16 centroid tables, and the outliers as
(flat int32 index, float16 value) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from slimformer.core.transform import BlockContext, Transform, register
from slimformer.errors import QuantConfigError
from slimformer.formats.primitives import group_view
from slimformer.formats.spec import WeightSpec
from slimformer.nn.gobo import GOBOLinear
from slimformer.nn.surgery import linear_weight, set_module


def lloyd_1d(values: torch.Tensor, valid: torch.Tensor, n_centroids: int, iterations: int
             ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """1-D k-means on each row of ``values [tables, n]`` over the entries where ``valid``.

    Returns (centroids ``[tables, n_centroids]`` sorted ascending, index of each value's
    nearest centroid ``[tables, n]``, the total squared error of the valid entries after
    each assignment step — non-increasing, as Lloyd's algorithm guarantees).

    In one dimension the nearest-centroid clusters are runs of the sorted values cut at
    the midpoints between centroids, so each iteration bisects ``n_centroids − 1`` cuts
    and reads cluster sums off prefix sums: exact Lloyd steps in O(k log n) per table
    instead of O(n log k)."""
    values = values.float()
    tables, n = values.shape
    counts = valid.sum(dim=1, keepdim=True)                                   # [tables, 1]
    # Valid entries first, in order; invalid ones sort to the end as +inf.
    ordered = torch.where(valid, values, torch.full_like(values, float("inf"))).sort(dim=1).values.contiguous()
    kept = torch.where(torch.arange(n) < counts, ordered, torch.zeros_like(ordered)).double()
    zeros = torch.zeros(tables, 1, dtype=torch.float64)
    prefix = torch.cat([zeros, kept.cumsum(dim=1)], dim=1)                   # [tables, n + 1]
    prefix_sq = torch.cat([zeros, (kept * kept).cumsum(dim=1)], dim=1)
    # Equally spaced quantiles of the valid entries.
    levels = (torch.arange(n_centroids, dtype=torch.float32) + 0.5) / n_centroids
    rank = (levels[None, :] * (counts - 1).clamp_min(0)).round().long()
    centroids = torch.where(counts > 0, ordered.gather(1, rank), torch.zeros(tables, n_centroids))
    errors: list[float] = []
    previous_cuts = None
    for step in range(iterations + 1):
        midpoints = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
        # Values equal to a midpoint go to the lower centroid, as in _nearest.
        cuts = torch.searchsorted(ordered, midpoints, right=True).minimum(counts)
        edges = torch.cat([torch.zeros_like(counts), cuts, counts], dim=1)    # [tables, k + 1]
        sums = prefix.gather(1, edges).diff(dim=1)
        squares = prefix_sq.gather(1, edges).diff(dim=1)
        members = edges.diff(dim=1)
        c = centroids.double()
        errors.append(float((squares - 2 * c * sums + c * c * members).sum()))
        if step == iterations or (previous_cuts is not None and torch.equal(cuts, previous_cuts)):
            break
        previous_cuts = cuts
        means = (sums / members.clamp_min(1)).float()
        # An empty cluster keeps its centroid (the error cannot grow); keep them sorted
        # so clusters stay runs between consecutive midpoints.
        centroids = torch.where(members > 0, means, centroids).sort(dim=1).values
    return centroids, _nearest(values.contiguous(), centroids), errors


def _nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``centroids`` for every value (bisection on
    the midpoints: no ``[tables, n, k]`` distance tensor)."""
    midpoints = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
    return torch.searchsorted(midpoints, values)


def gobo_quantize(weight: torch.Tensor, spec: WeightSpec, outlier_sigma: float, iterations: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GOBO of an ``[out, in]`` weight. ``spec`` gives the bits and the table granularity.

    Returns (indices ``[out, in]`` uint8, centroids ``[out|1, n_groups, 2^bits]`` holding
    float16 values, outlier flat indices (int64, sorted), outlier values (float16))."""
    w = weight.detach().float()
    mean, std = w.mean(), w.std(unbiased=False)
    outlier = (w - mean).abs() > outlier_sigma * std
    grouped = group_view(w, spec)                       # [rows, n_groups, group]
    rows, n_groups, group = grouped.shape
    valid = ~group_view(outlier, spec).reshape(rows * n_groups, group)
    centroids, _, _ = lloyd_1d(grouped.reshape(rows * n_groups, group), valid, 2**spec.bits, iterations)
    # Stored in float16: assign against the stored values, so no weight lands on a
    # centroid that rounding moved away from it.
    centroids = centroids.to(torch.float16).float().sort(dim=1).values
    indices = _nearest(grouped.reshape(rows * n_groups, group).contiguous(), centroids)
    flat_index = outlier.reshape(-1).nonzero().flatten()
    values = w.reshape(-1)[flat_index].to(torch.float16)
    return (indices.reshape(w.shape).to(torch.uint8), centroids.reshape(rows, n_groups, -1),
            flat_index, values)


def gobo_linear(weight: torch.Tensor, bias: torch.Tensor | None, spec: WeightSpec, outlier_sigma: float = 3.0,
                iterations: int = 20) -> GOBOLinear:
    """A GOBOLinear holding GOBO's quantisation of the ``[out, in]`` ``weight``."""
    indices, centroids, flat_index, values = gobo_quantize(weight, spec, outlier_sigma, iterations)
    return GOBOLinear.from_codes(indices, centroids, flat_index, values, bias, spec, weight.dtype)


@register
@dataclass(frozen=True)
class GOBO(Transform):
    bits: int = 3
    granularity: Literal["tensor", "channel", "group"] = "channel"
    group_size: int | None = None
    outlier_sigma: float = 3.0
    iterations: int = 20

    def __post_init__(self):
        self.weight_spec()   # bits 2..8, group settings
        if not self.outlier_sigma > 0:
            raise QuantConfigError(f"outlier_sigma must be positive, got {self.outlier_sigma!r}")
        if self.iterations < 0:
            raise QuantConfigError(f"iterations must be 0 or more, got {self.iterations!r}")

    def weight_spec(self) -> WeightSpec:
        # Only bits and the table granularity matter; "symmetric" has no meaning for a table.
        return WeightSpec(self.bits, True, self.granularity, self.group_size)

    def convert(self, block: nn.Module, ctx: BlockContext) -> None:
        spec = self.weight_spec()
        for name, module in self.target_linears(block, ctx).items():
            try:
                glinear = gobo_linear(linear_weight(module), module.bias, spec, self.outlier_sigma, self.iterations)
            except QuantConfigError as exc:
                raise QuantConfigError(f"{ctx.prefix}.{name}: {exc}") from None
            ctx.report(name, outlier_fraction=glinear.outlier_fraction)
            set_module(block, name, glinear)
