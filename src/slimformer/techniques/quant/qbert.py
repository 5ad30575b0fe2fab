"""Q-BERT group-wise quantisation (Shen et al. 2020): each attention head's slice of a
projection matrix is a group with its own symmetric scale.

Which slice is a head's, per projection role (the adapter says which role a name has):
  * q / k / v: the head's ``head_dim`` output rows; k and v have the key/value head
    count (grouped-query attention); a fused q|k|v projection (GPT-2's ``c_attn``) has
    the q heads, then the k heads, then the v heads stacked along its rows;
  * attention output: the head's ``head_dim`` input columns (every output row reads
    them);
  * FFN matrices: ``ffn_groups`` groups of consecutive rows (default: as many groups as
    the attention matrices have, heads × ``sub_groups``); as equal as the row count
    allows, since a head count need not divide the FFN width (SmolLM2: 9 heads, 1536
    rows → groups of 171 and 170 rows).
``sub_groups`` splits each head's slice into that many equal parts, each with a scale.

The result is an ordinary :class:`QuantLinear`: row groups as per-channel scales that
repeat over a group's rows; column groups as group scales (``group_size`` = the
columns of one part) that repeat over all rows. One scale is the max |w| over the
whole group, so the kernels run it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from slimformer.core.transform import BlockContext, Transform, register
from slimformer.errors import QuantConfigError
from slimformer.formats.primitives import storable_scale
from slimformer.formats.spec import WeightSpec
from slimformer.nn.quant_linear import QuantLinear
from slimformer.nn.surgery import linear_weight, set_module


def _codes(weight: torch.Tensor, scale: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """Symmetric codes (unsigned, offset ``2^(bits-1)``) of ``weight`` against a scale
    broadcast to it."""
    q = torch.round(weight / scale).clamp(spec.qmin, spec.qmax)
    return (q + 2 ** (spec.bits - 1)).to(torch.uint8)


def quantize_row_groups(weight: torch.Tensor, bits: int, groups: int, equal: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor, WeightSpec]:
    """One scale per ``groups`` blocks of consecutive output rows of ``[out, in]``:
    equal blocks (heads), or with ``equal=False`` blocks as equal as the row count allows
    (sizes differ by at most one row). Returns (codes ``[out, in]``, scale ``[out, 1]``
    repeated over each block's rows, spec)."""
    out_features, _ = weight.shape
    if equal and (groups < 1 or out_features % groups):
        raise QuantConfigError(f"{groups} row groups do not divide the layer's {out_features} output rows")
    if not 1 <= groups <= out_features:
        raise QuantConfigError(f"{groups} row groups do not fit the layer's {out_features} output rows")
    spec = WeightSpec(bits, True, "channel")
    w = weight.detach().float()
    row_max = w.abs().amax(dim=1)
    parts = row_max.tensor_split(groups)
    group_max = torch.stack([part.max() for part in parts])
    group_of_row = torch.arange(groups).repeat_interleave(torch.tensor([len(part) for part in parts]))
    scale = storable_scale((group_max / spec.qmax).clamp_min(1e-12))
    row_scale = scale[group_of_row][:, None]
    return _codes(w, row_scale, spec), row_scale, spec


def quantize_column_groups(weight: torch.Tensor, bits: int, groups: int
                           ) -> tuple[torch.Tensor, torch.Tensor, WeightSpec]:
    """One scale per ``groups`` equal blocks of input columns (over all rows). Returns
    (codes, scale ``[out, groups]`` repeated over rows, spec with ``group_size`` = block)."""
    out_features, in_features = weight.shape
    if groups < 1 or in_features % groups:
        raise QuantConfigError(f"{groups} column groups do not divide the layer's {in_features} input columns")
    spec = WeightSpec(bits, True, "group", in_features // groups)
    blocks = weight.detach().float().reshape(out_features, groups, -1)
    scale = storable_scale((blocks.abs().amax(dim=(0, 2)) / spec.qmax).clamp_min(1e-12))
    codes = _codes(blocks, scale[None, :, None], spec).reshape(out_features, in_features)
    return codes, scale[None, :].expand(out_features, groups).contiguous(), spec


@register
@dataclass(frozen=True)
class QBERT(Transform):
    bits: int = 4
    sub_groups: int = 1
    ffn_groups: int | None = None

    def __post_init__(self):
        WeightSpec(self.bits, True, "channel")   # bits 2..8
        if self.sub_groups < 1:
            raise QuantConfigError(f"sub_groups must be 1 or more, got {self.sub_groups!r}")
        if self.ffn_groups is not None and self.ffn_groups < 1:
            raise QuantConfigError(f"ffn_groups must be 1 or more, got {self.ffn_groups!r}")

    def groups(self, name: str, ctx: BlockContext) -> tuple[str, int, str]:
        """("rows" | "columns" | "ffn rows", number of groups, where that number comes
        from) for the projection ``name``."""
        adapter = ctx.adapter
        heads, kv_heads = adapter.num_heads(ctx.model.config)
        split = f" × {self.sub_groups} sub_groups" if self.sub_groups > 1 else ""
        if name in adapter.attention_in:
            if len(adapter.attention_in) == 1:            # fused q|k|v
                n = heads + 2 * kv_heads
                return "rows", n * self.sub_groups, f"{n} heads in the fused q|k|v{split}"
            is_query = name == adapter.attention_in[0]    # the adapter lists q, k, v in order
            n = heads if is_query else kv_heads
            return "rows", n * self.sub_groups, f"{n} {'query' if is_query else 'key/value'} heads{split}"
        if name in adapter.attention_out:
            return "columns", heads * self.sub_groups, f"{heads} heads{split}"
        if self.ffn_groups is not None:
            return "ffn rows", self.ffn_groups, "ffn_groups"
        return "ffn rows", heads * self.sub_groups, f"ffn groups default to {heads} heads{split}"

    def convert(self, block: nn.Module, ctx: BlockContext) -> None:
        for name, module in self.target_linears(block, ctx).items():
            weight = linear_weight(module)
            axis, groups, why = self.groups(name, ctx)
            try:
                if axis == "columns":
                    codes, scale, spec = quantize_column_groups(weight, self.bits, groups)
                else:
                    codes, scale, spec = quantize_row_groups(weight, self.bits, groups, equal=axis == "rows")
            except QuantConfigError as exc:
                raise QuantConfigError(f"{ctx.prefix}.{name}: {exc} ({why})") from None
            zero = torch.zeros_like(scale)
            ctx.report(name, groups=groups)
            set_module(block, name, QuantLinear.from_float(weight, module.bias, spec, codes=codes, scale=scale, zero=zero))
