"""Mixed 16/8-bit activations (Bondarenko 2021): static activation quantisation of every
target Linear's input and of each block's FFN residual sum, at 8 bits except the
points named in ``keep_16bit``, which stay on the int16 grid.

Activation points, by name:
- a projection's path inside its block (``mlp.down_proj``, ``output.dense``, ...): its input;
- ``ffn_residual``: the residual sum after the FFN, i.e. the tensor that carries the
  outliers Bondarenko et al. found. In pre-norm decoders (Llama, GPT-2, OPT) that sum
  is the block's output hidden state, so the block output is quantised (what the next
  block, both its norm and its residual branch, or the final norm reads). In post-norm
  models (BERT, OPT with ``do_layer_norm_before: false``) the sum is the input of the
  LayerNorm that closes the FFN sub-block (BERT: ``output.dense(h) + h_in`` entering
  ``output.LayerNorm``), so that LayerNorm's input is quantised.

Weights: 8 bits per output channel. The quantised Linears are ``PEGLinear`` with one
group; the residual point is a ``HiddenStateQuant`` module attached to the block (or
the LayerNorm) that quantises its output (input) through a hook.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from slimformer.core.observers import InputRangeObserver
from slimformer.core.transform import BlockContext, Needs, Transform, register
from slimformer.errors import QuantConfigError
from slimformer.formats.spec import WeightSpec
from slimformer.models.adapters import Adapter
from slimformer.nn.hidden_state import HiddenStateQuant
from slimformer.nn.peg import ActGrid, PEGLinear, float_weight, static_group_params
from slimformer.nn.surgery import set_module

FFN_RESIDUAL = "ffn_residual"
_POINT_MODULE = "ffn_residual_quant"   # the HiddenStateQuant child's name


def ffn_residual_point(model: nn.Module, adapter: Adapter, block: nn.Module) -> tuple[str, str]:
    """Where a block's FFN residual sum is: ``(path of the module inside the block, "input"
    | "output")`` — the block's output in pre-norm models, else the input of the
    LayerNorm that closes the FFN sub-block."""
    post_norm = not adapter.norms or getattr(model.config, "do_layer_norm_before", True) is False
    if not post_norm:
        return "", "output"
    if adapter.norms:   # OPT post-norm: the FFN group's norm closes the sub-block
        ffn_norm = next(group.norm for group in adapter.norms if set(group.linears) & set(adapter.mlp_in))
        return ffn_norm, "input"
    # BERT: the LayerNorm next to the FFN output projection
    parent_path = adapter.mlp_out[0].rpartition(".")[0]
    parent = block.get_submodule(parent_path) if parent_path else block
    norms = [name for name, child in parent.named_children() if isinstance(child, nn.LayerNorm)]
    if len(norms) != 1:
        raise QuantConfigError(f"cannot find the LayerNorm after {adapter.mlp_out[0]} in this {adapter.family} block")
    return f"{parent_path}.{norms[0]}" if parent_path else norms[0], "input"


@register
@dataclass(frozen=True)
class MixedPrecisionActivations(Transform):
    """8-bit per-channel weights; static activations at ``bits`` (8) except the points
    matching a ``keep_16bit`` pattern (``ffn_residual`` or a projection path, as regular
    expressions), which use the int16 grid."""

    keep_16bit: list[str] = field(default_factory=lambda: [FFN_RESIDUAL])
    bits: int = 8
    act_symmetric: bool = True
    weight_bits: int = 8
    needs = Needs.CALIBRATION

    def __post_init__(self):
        object.__setattr__(self, "keep_16bit", tuple(self.keep_16bit))
        for pattern in self.keep_16bit:
            if not isinstance(pattern, str):
                raise QuantConfigError(f"keep_16bit entries must be point names, got {pattern!r}")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise QuantConfigError(f"keep_16bit: invalid pattern {pattern!r}: {exc}") from None
        if self.bits > 8:
            raise QuantConfigError(f"bits (the low precision) must be from 2 to 8, got {self.bits}")
        ActGrid(self.bits, self.act_symmetric)
        WeightSpec(self.weight_bits, True, "channel")

    def grid(self, point: str) -> ActGrid:
        keep = any(re.fullmatch(p, point) for p in self.keep_16bit)
        return ActGrid(16 if keep else self.bits, self.act_symmetric)

    def plan_model(self, model, adapter, calib, plan) -> None:
        points = (FFN_RESIDUAL, *adapter.linears)
        for pattern in self.keep_16bit:
            if not any(re.fullmatch(pattern, p) for p in points):
                raise QuantConfigError(
                    f"keep_16bit: '{pattern}' names no activation point of this {adapter.family} model "
                    f"(points: {', '.join(points)})")
        ffn_residual_point(model, adapter, adapter.get_blocks(model)[0])   # fails early where unsupported

    def prepare(self, block: nn.Module, ctx: BlockContext) -> None:
        ctx.state["observer"] = InputRangeObserver(self.target_linears(block, ctx))
        path, where = ffn_residual_point(ctx.model, ctx.adapter, block)
        owner = block.get_submodule(path) if path else block
        span = ctx.state["residual_range"] = [torch.tensor(0.0), torch.tensor(0.0)]

        def observe(x):
            x = x[0] if isinstance(x, tuple) else x
            span[0] = torch.minimum(span[0], x.detach().min().float())
            span[1] = torch.maximum(span[1], x.detach().max().float())

        if where == "output":
            handle = owner.register_forward_hook(lambda _m, _a, out: observe(out))
        else:
            handle = owner.register_forward_pre_hook(lambda _m, args: observe(args[0]))
        ctx.state["residual_handle"] = handle

    def convert(self, block: nn.Module, ctx: BlockContext) -> None:
        observer: InputRangeObserver = ctx.state.pop("observer")
        observer.remove()
        ctx.state.pop("residual_handle").remove()
        wspec = WeightSpec(self.weight_bits, True, "channel")
        for name, module in self.target_linears(block, ctx).items():
            weight = float_weight(module, f"{ctx.prefix}.{name}")
            one_group = torch.zeros(weight.shape[1], dtype=torch.long)
            grid = self.grid(name)
            lo, hi = observer.lo[name], observer.hi[name]
            set_module(block, name, PEGLinear.from_float(weight, module.bias, one_group, lo, hi, grid, wspec))
            ctx.report(name, act_bits=grid.bits)
        path, where = ffn_residual_point(ctx.model, ctx.adapter, block)
        lo, hi = ctx.state.pop("residual_range")
        point = HiddenStateQuant(self.grid(FFN_RESIDUAL), where)
        scale, zero = static_group_params(lo.reshape(1), hi.reshape(1), point.grid)
        point.scale, point.zero = scale.reshape(()), zero.reshape(())
        set_module(block, f"{path}.{_POINT_MODULE}" if path else _POINT_MODULE, point)
        ctx.report(FFN_RESIDUAL, act_bits=point.grid.bits)
