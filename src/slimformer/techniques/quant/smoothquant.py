"""SmoothQuant (Xiao 2022): move activation outliers into the weights before W8A8.

Per input channel j of the projections reading one tensor X,
``s_j = max|X_j|^α / max_k |W_kj|^(1−α)`` (the max over the rows of all those
projections); then X/s and W·diag(s) give the same product, with the activation's
outlier channels shrunk and the weights' columns grown to meet them. The division is
folded into the norm that produces X (``fold: norm``: RMSNorm weight, LayerNorm weight
and bias), so the smoothed model in full precision is the original one. This stage does
not quantise: a following stage (RTN, GPTQ, ...) does.

Post-norm models (BERT) cannot fold: their LayerNorm output also feeds the residual.
``fold: input`` keeps the scale as an explicit per-channel multiply of the layer's
input instead (``InputScaledLinear``, which any later quantiser fills in place), and
then works on any projection.

``alpha_grid``: per group, the α of the grid whose W8A8 fake quantisation (8-bit
per-channel weights, 8-bit activations of ``act_granularity``) gives the smallest error
of the group's outputs on the calibration inputs; the choice is reported per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from slimformer.core.transform import BlockContext, Needs, Targets, Transform, register
from slimformer.errors import QuantConfigError
from slimformer.formats.primitives import (
    choose_qparams,
    fake_quantize_activation,
    fake_quantize_weight,
)
from slimformer.formats.spec import ActSpec, WeightSpec
from slimformer.models.adapters import Adapter
from slimformer.nn.input_scaled import InputScaledLinear
from slimformer.nn.peg import float_weight
from slimformer.nn.surgery import set_module

_SCALE_RANGE = (1e-5, 1e5)
_GRID_ROWS_PER_BATCH = 256   # calibration rows kept per forward for the α search


@dataclass(frozen=True)
class NormFollowers(Targets):
    """SmoothQuant's default targets: the projections that read a norm's output
    (attention and FFN inputs), whatever the family names them."""


def smoothing_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = act_max_j^α / weight_max_j^(1−α)``; channels with no activation or no weight
    seen keep 1 (nothing to balance), and s stays within [1e-5, 1e5]."""
    act_max, weight_max = act_max.float(), weight_max.float()
    scale = act_max.clamp_min(1e-5).pow(alpha) / weight_max.clamp_min(1e-5).pow(1 - alpha)
    scale = torch.where((act_max > 0) & (weight_max > 0), scale, torch.ones_like(scale))
    return scale.clamp(*_SCALE_RANGE)


def w8a8_error(x: torch.Tensor, weights: list[torch.Tensor], act_max: torch.Tensor, scale: torch.Tensor,
               act_granularity: str) -> float:
    """Squared error of the W8A8 outputs of ``weights`` on ``x`` once smoothed by ``scale``
    (weights per channel; activations per token, or per tensor with the static scale
    calibration gives: the largest smoothed channel maximum)."""
    smoothed = x / scale
    spec = ActSpec(8, True, act_granularity, dynamic=act_granularity == "token")
    static = None
    if act_granularity == "tensor":
        static, _ = choose_qparams((act_max / scale).max().reshape(1, 1), 8, True)
        static = static.reshape(())
    x_q = fake_quantize_activation(smoothed, spec, static)
    error = 0.0
    for w in weights:
        w_q = fake_quantize_weight(w * scale, WeightSpec(8, True, "channel"))
        error += float(((x_q @ w_q.T) - (x @ w.T)).pow(2).sum())
    return error


@register
@dataclass(frozen=True)
class SmoothQuant(Transform):
    alpha: float = 0.5
    alpha_grid: list[float] | None = None
    act_granularity: Literal["tensor", "token"] = "token"   # of the W8A8 the α search scores
    fold: Literal["norm", "input"] = "norm"
    targets: Targets = NormFollowers()
    needs = Needs.CALIBRATION

    def __post_init__(self):
        if isinstance(self.alpha, bool) or not 0 <= self.alpha <= 1:
            raise QuantConfigError(f"alpha must be from 0 to 1, got {self.alpha!r}")
        if self.alpha_grid is not None:
            grid = tuple(self.alpha_grid)
            if not grid or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1
                                   for a in grid):
                raise QuantConfigError(f"alpha_grid must be a non-empty list of values from 0 to 1, got {self.alpha_grid!r}")
            object.__setattr__(self, "alpha_grid", grid)
        if self.act_granularity not in ("tensor", "token"):
            raise QuantConfigError(f"act_granularity must be tensor or token, got {self.act_granularity!r}")
        if self.fold not in ("norm", "input"):
            raise QuantConfigError(f"fold must be norm or input, got {self.fold!r}")

    # ------------------------------------------------------------------ which layers
    def selected(self, adapter: Adapter, index: int) -> list[str]:
        if isinstance(self.targets, NormFollowers):
            return [n for n in adapter.attention_in + adapter.mlp_in
                    if self.targets.blocks is None or index in self.targets.blocks]
        return self.targets.select(adapter.linears, index)

    def groups(self, adapter: Adapter, index: int) -> list[tuple[str | None, tuple[str, ...]]]:
        """``(norm, projections)`` sharing one smoothing scale. Folding into a norm changes
        every projection that reads it, so the whole norm group is smoothed; with
        ``fold: input`` each set of targets reading the same tensor is."""
        chosen = self.selected(adapter, index)
        if self.fold == "norm":
            return [(g.norm, g.linears) for g in adapter.norms if set(g.linears) & set(chosen)]
        same_input = (adapter.attention_in, adapter.attention_out, adapter.mlp_in, adapter.mlp_out)
        return [(None, members) for group in same_input if (members := tuple(n for n in group if n in chosen))]

    def plan_model(self, model, adapter, calib, plan) -> None:
        """Refuse, before any block changes, a target whose scale cannot be folded."""
        if self.fold == "input":
            return
        post_norm_opt = getattr(model.config, "do_layer_norm_before", True) is False
        for index in range(len(adapter.get_blocks(model))):
            for name in self.selected(adapter, index):
                reads_norm = any(name in g.linears for g in adapter.norms)
                if reads_norm and not post_norm_opt:
                    continue
                if not adapter.norms or post_norm_opt:
                    why = (f"this {adapter.family} model is post-norm: its LayerNorm output also feeds the "
                           "residual, so dividing it by s would change the model")
                else:
                    why = "no norm precedes it"
                raise QuantConfigError(
                    f"{adapter.blocks}.{index}.{name}: SmoothQuant cannot fold its scale into a norm ({why}); "
                    "use fold: input to keep the scale as a per-channel multiply inside the layer")

    # ------------------------------------------------------------------ calibration
    def prepare(self, block: nn.Module, ctx: BlockContext) -> None:
        stats: dict[tuple[str, ...], dict] = {}
        handles = []
        for _norm, members in self.groups(ctx.adapter, ctx.index):
            entry = stats[members] = {"act_max": None, "rows": []}

            def observe(_module, args, entry=entry):
                x = args[0].detach().float()
                x = x.reshape(-1, x.shape[-1])
                seen = x.abs().amax(0)
                entry["act_max"] = seen if entry["act_max"] is None else torch.maximum(entry["act_max"], seen)
                if self.alpha_grid is not None:
                    step = max(1, x.shape[0] // _GRID_ROWS_PER_BATCH)
                    entry["rows"].append(x[::step].clone())

            # the members read the same tensor: one of them is enough
            handles.append(block.get_submodule(members[0]).register_forward_pre_hook(observe))
        ctx.state["stats"], ctx.state["handles"] = stats, handles

    def convert(self, block: nn.Module, ctx: BlockContext) -> None:
        for handle in ctx.state.pop("handles"):
            handle.remove()
        stats = ctx.state.pop("stats")
        for norm_name, members in self.groups(ctx.adapter, ctx.index):
            act_max = stats[members]["act_max"]
            modules = {name: block.get_submodule(name) for name in members}
            weights = {name: float_weight(module, f"{ctx.prefix}.{name}") for name, module in modules.items()}
            weight_max = torch.cat([w.detach().float().abs() for w in weights.values()]).amax(0)
            alpha = self.alpha
            if self.alpha_grid is not None:
                rows = torch.cat(stats[members]["rows"])
                floats = [w.detach().float() for w in weights.values()]
                errors = {a: w8a8_error(rows, floats, act_max, smoothing_scales(act_max, weight_max, a),
                                        self.act_granularity) for a in self.alpha_grid}
                alpha = min(errors, key=errors.get)
            scale = smoothing_scales(act_max, weight_max, alpha)
            with torch.no_grad():
                if norm_name is not None:
                    self._fold_into_norm(block.get_submodule(norm_name), scale, f"{ctx.prefix}.{norm_name}")
                for name, module in modules.items():
                    weights[name].mul_(scale.to(weights[name].dtype))
                    if self.fold == "input":
                        self._scale_input(block, name, module, scale)
            for name in members:
                ctx.report(name, smoothquant_alpha=alpha, smoothquant_max_scale=round(float(scale.max()), 4))

    @staticmethod
    def _fold_into_norm(norm: nn.Module, scale: torch.Tensor, path: str) -> None:
        weight = getattr(norm, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != scale.shape:
            raise QuantConfigError(f"{path}: SmoothQuant needs a norm with a per-channel weight to fold into")
        weight.div_(scale.to(weight.dtype))
        bias = getattr(norm, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.div_(scale.to(bias.dtype))

    @staticmethod
    def _scale_input(block: nn.Module, name: str, module: nn.Module, scale: torch.Tensor) -> None:
        if isinstance(module, InputScaledLinear):   # smoothed before: the scales compose
            module.input_scale.div_(scale)
        else:
            set_module(block, name, InputScaledLinear(module, 1.0 / scale))
