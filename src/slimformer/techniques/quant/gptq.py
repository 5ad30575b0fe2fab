"""GPTQ (Frantar et al. 2022): quantise a layer's weight columns one at a time and push
each column's rounding error onto the columns not yet quantised, weighted by the inverse
Hessian of the layer's squared output error, H = 2 XᵀX / n over calibration inputs X.

How it runs here:
  * Layers that read the same input (q/k/v, gate/up) share one Hessian and one Cholesky
    factor; their rows are quantised together (GPTQ treats rows independently).
  * ``true_sequential`` (default): the whole calibration set goes through a block as one
    batch and each layer is quantised in a forward pre-hook the moment its input arrives,
    so every layer sees inputs computed by the already-quantised layers before it (q/k/v →
    o → gate/up → down), and that one forward also yields the next block's inputs. Two
    full-precision passes per block (observe, then recompute) become one.
  * ``act_order`` visits columns by decreasing Hessian diagonal; with groups it needs
    ``static_groups`` (group ranges fixed before any update, in the original column
    order), so the packed layout is the standard one and every kernel runs it.
  * ``clip_search``: each group's range is chosen by a small grid search over clipping
    ratios minimising the Hessian-diagonal-weighted rounding error (a cheap proxy of the
    output error), instead of plain min/max.
  * An ill-conditioned Hessian (fewer calibration tokens than inputs, dead inputs) gets
    more dampening automatically, with a warning naming the layer.

The Hessian machinery (accumulation, dampening, the Cholesky factor of H⁻¹, the column
loop with lazy block updates) lives in ``core/hessian.py``, shared with SparseGPT; the
per-input-group, true-sequential running in ``core/sequential.py``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from slimformer.core.hessian import (
    HessianWarning,
    PreparedHessian,
    hessian_sum,
    layer_output_error,
    obs_compress,
    prepare_hessian,
)
from slimformer.core.plan import planned_bits
from slimformer.core.sequential import LayerwiseStage
from slimformer.core.transform import BlockContext, Needs, register
from slimformer.errors import QuantConfigError
from slimformer.formats.primitives import fake_quantize_activation, static_act_params
from slimformer.formats.spec import QuantFormat, WeightSpec
from slimformer.nn.quant_linear import QuantLinear
from slimformer.nn.surgery import linear_weight, set_module

GPTQWarning = HessianWarning   # the Hessian machinery (core/hessian.py) is GPTQ's and SparseGPT's


@register
@dataclass(frozen=True)
class GPTQ(QuantFormat, LayerwiseStage):
    """Arguments: the format (:class:`QuantFormat`; activation quantisation optional, e.g.
    W8A8 after SmoothQuant), ``targets``, and GPTQ's own settings below."""

    bits: int = 4
    act_order: bool = True
    static_groups: bool = True
    dampening: float = 0.01          # fraction of the mean Hessian diagonal added to it
    block_size: int = 128            # columns per lazy batch update
    clip_search: bool = True
    true_sequential: bool = True

    needs = Needs.CALIBRATION

    def __post_init__(self):
        super().__post_init__()
        if self.act_order and self.granularity == "group" and not self.static_groups:
            raise QuantConfigError("act_order with group quantisation needs static_groups: true "
                                   "(groups keep the original column order, so the packed layout is standard)")
        if not self.dampening > 0:
            raise QuantConfigError(f"dampening must be positive, got {self.dampening!r}")
        if self.block_size < 1:
            raise QuantConfigError(f"block_size must be positive, got {self.block_size!r}")

    # ------------------------------------------------------------------ per block
    def statistic(self, flat: torch.Tensor) -> torch.Tensor:
        return hessian_sum(flat)

    def init_state(self, ctx: BlockContext) -> None:
        ctx.state.update(results={}, ranges={})

    def observe(self, ctx: BlockContext, key: str, x: torch.Tensor) -> None:
        if self.act_spec() is not None and key not in ctx.state["results"]:
            lo, hi = ctx.state["ranges"].get(key, (0.0, 0.0))
            ctx.state["ranges"][key] = (min(lo, x.min().item()), max(hi, x.max().item()))

    def layer_input(self, ctx: BlockContext, key: str, args: tuple) -> tuple | None:
        act = self.act_spec()
        if act is None:
            return None
        # the rest of this forward computes as the finished layer will: quantised inputs
        return (fake_quantize_activation(args[0], act, *self._static_params(ctx, key)), *args[1:])

    def finish_group(self, block: nn.Module, ctx: BlockContext, names: list[str]) -> None:
        act_params = self._static_params(ctx, names[0])
        for name in names:
            module = block.get_submodule(name)
            spec, codes, scale, zero = ctx.state["results"][names[0]][name]
            qlinear = QuantLinear.from_float(linear_weight(module), module.bias, spec, self.act_spec(),
                                             codes=codes, scale=scale, zero=zero)
            if act_params[0] is not None:
                qlinear.act_scale, qlinear.act_zero = act_params
            set_module(block, name, qlinear)

    def _static_params(self, ctx: BlockContext, key: str) -> tuple:
        """Per-tensor activation scale and zero-point from the observed range (static only)."""
        act = self.act_spec()
        if act is None or act.dynamic:
            return None, None
        return static_act_params(*ctx.state["ranges"][key], act)

    def compress_group(self, block: nn.Module, ctx: BlockContext, names: list[str],
                       hessian: torch.Tensor, tokens: int) -> None:
        """GPTQ every layer of ``names`` against their shared Hessian; put the dequantised
        weights in place (the running forward continues with them) and keep the codes."""
        label = f"{ctx.prefix}.{names[0]}" + (f" (+{len(names) - 1} sharing its input)" if len(names) > 1 else "")
        if tokens < hessian.shape[0] and not ctx.plan.get("gptq_warned_few_tokens"):
            ctx.plan["gptq_warned_few_tokens"] = True   # once per run, not once per layer
            warnings.warn(f"{label}: {tokens} calibration tokens for {hessian.shape[0]} inputs: the Hessian is "
                          "rank-deficient, GPTQ leans on dampening (use more calibration data)", GPTQWarning,
                          stacklevel=2)
        prepared = prepare_hessian(hessian, self.act_order, self.dampening, label)
        if prepared.dampening != self.dampening:
            ctx.report(names[0], gptq_dampening=prepared.dampening)
        # Layers of one format are quantised together (stacked rows); per-tensor scales
        # stay per layer.
        by_format: dict[tuple, list[str]] = {}
        for name in names:
            spec = self.weight_spec(planned_bits(ctx, name, self.bits, self.weight_spec()))
            by_format.setdefault((spec, name if spec.granularity == "tensor" else None), []).append(name)
        results = {}
        for (spec, _), members in by_format.items():
            weights = [linear_weight(block.get_submodule(n)).detach().float() for n in members]
            try:
                codes, scale, zero = gptq_quantize(torch.cat(weights), prepared, spec, self.block_size,
                                                   self.static_groups, self.clip_search)
            except QuantConfigError as exc:
                raise QuantConfigError(f"{ctx.prefix}.{members[0]}: {exc}") from None
            rows = 0
            for name, w in zip(members, weights):
                part = slice(rows, rows + w.shape[0])
                rows += w.shape[0]
                per_row = spec.granularity != "tensor"
                results[name] = (spec, codes[part], scale[part] if per_row else scale,
                                 (zero[part] if per_row else zero) if not spec.symmetric else None)
                _write_weight(block.get_submodule(name), QuantLinear.from_float(
                    w, None, spec, codes=codes[part], scale=results[name][2], zero=results[name][3]
                ).dequantized_weight())
        ctx.state["results"][names[0]] = results


# ---------------------------------------------------------------------- the algorithm
def gptq_quantize(weight: torch.Tensor, prepared: PreparedHessian, spec: WeightSpec, block_size: int = 128,
                  static_groups: bool = True, clip_search: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise ``weight`` ([out, in]) column by column with error feedback
    (:func:`slimformer.core.hessian.obs_compress`).

    Returns codes ``[out, in]`` (uint8, stored form: symmetric codes offset by 2^(bits-1)),
    scale and zero-point ``[out|1, groups]`` exactly as :func:`quantize_weight` lays them out.
    """
    done = obs_compress(weight, prepared, spec, block_size=block_size, static_groups=static_groups,
                        clip_search=clip_search)
    return done.codes, done.scale, done.zero


def _write_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Overwrite a Linear's (or GPT-2 Conv1D's, stored transposed) weight in place."""
    with torch.no_grad():
        target = linear_weight(module)   # [out, in] view: Linear, Conv1D, or a SmoothQuant input wrapper's layer
        target.copy_(weight.to(target.dtype))


__all__ = ["GPTQ", "GPTQWarning", "PreparedHessian", "gptq_quantize", "layer_output_error", "prepare_hessian"]
