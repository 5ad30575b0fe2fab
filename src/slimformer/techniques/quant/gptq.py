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
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from slimformer.core.plan import planned_bits
from slimformer.core.transform import BlockContext, Needs, Transform, register
from slimformer.errors import QuantConfigError
from slimformer.formats.primitives import (
    choose_qparams,
    fake_quantize_activation,
    static_act_params,
    storable_scale,
)
from slimformer.formats.spec import QuantFormat, WeightSpec
from slimformer.nn.quant_linear import QuantLinear
from slimformer.nn.surgery import linear_weight, set_module

_CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(17))   # 1.0 … 0.6
_MAX_DAMPENING_STEPS = 6


class GPTQWarning(UserWarning):
    pass


@register
@dataclass(frozen=True)
class GPTQ(QuantFormat, Transform):
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

    def one_pass(self) -> bool:
        return self.true_sequential

    # ------------------------------------------------------------------ per block
    def prepare(self, block: nn.Module, ctx: BlockContext) -> None:
        ctx.state.clear()
        ctx.state.update(results={}, hessians={}, ranges={}, handles=[])
        act = self.act_spec()
        for names in self._input_groups(ctx):
            key = names[0]

            def hook(_module, args, names=names, key=key):
                x = args[0].detach()
                if act is not None and key not in ctx.state["results"]:
                    lo, hi = ctx.state["ranges"].get(key, (0.0, 0.0))
                    ctx.state["ranges"][key] = (min(lo, x.min().item()), max(hi, x.max().item()))
                if not self.true_sequential:
                    _accumulate(ctx.state["hessians"], key, x)
                    return None
                if key not in ctx.state["results"]:   # the group's first member to run
                    self._quantize_group(block, ctx, names, *_hessian(x))
                if act is None:
                    return None
                # the rest of this forward computes as the finished layer will: quantised inputs
                return (fake_quantize_activation(args[0], act, *self._static_params(ctx, key)), *args[1:])

            for name in names:
                ctx.state["handles"].append(block.get_submodule(name).register_forward_pre_hook(hook))

    def convert(self, block: nn.Module, ctx: BlockContext) -> None:
        for handle in ctx.state.pop("handles", []):
            handle.remove()
        results = ctx.state["results"]
        for names in self._input_groups(ctx):
            if names[0] not in results:
                if names[0] not in ctx.state["hessians"]:
                    raise QuantConfigError(f"{ctx.prefix}.{names[0]}: no calibration input reached this layer")
                hessian, count = ctx.state["hessians"].pop(names[0])
                self._quantize_group(block, ctx, names, hessian / count, count)
            act_params = self._static_params(ctx, names[0])
            for name in names:
                module = block.get_submodule(name)
                spec, codes, scale, zero = results[names[0]][name]
                qlinear = QuantLinear.from_float(linear_weight(module), module.bias, spec, self.act_spec(),
                                                 codes=codes, scale=scale, zero=zero)
                if act_params[0] is not None:
                    qlinear.act_scale, qlinear.act_zero = act_params
                set_module(block, name, qlinear)
        ctx.state.clear()

    def _static_params(self, ctx: BlockContext, key: str) -> tuple:
        """Per-tensor activation scale and zero-point from the observed range (static only)."""
        act = self.act_spec()
        if act is None or act.dynamic:
            return None, None
        return static_act_params(*ctx.state["ranges"][key], act)

    def _input_groups(self, ctx: BlockContext) -> list[list[str]]:
        """Target projections grouped by shared input, in data-flow order."""
        chosen = set(self.targets.select(ctx.adapter.linears, ctx.index))
        a = ctx.adapter
        parts = [a.attention_in, *[(n,) for n in a.attention_out], a.mlp_in, *[(n,) for n in a.mlp_out]]
        return [g for g in ([n for n in part if n in chosen] for part in parts) if g]

    def _quantize_group(self, block: nn.Module, ctx: BlockContext, names: list[str],
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
@dataclass
class PreparedHessian:
    inverse_cholesky: torch.Tensor   # upper Cholesky factor of H⁻¹, columns in visiting order
    perm: torch.Tensor | None        # visiting order (act-order), None for 0..K-1
    importance: torch.Tensor         # diag(H) in the original column order (for clip search)
    dead: torch.Tensor               # inputs that were always zero
    dampening: float                 # the dampening finally used (fraction of mean diagonal)


def _hessian(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    flat = x.reshape(-1, x.shape[-1]).float()
    return (flat.T @ flat).mul_(2.0 / flat.shape[0]), flat.shape[0]


def _accumulate(store: dict, key: str, x: torch.Tensor) -> None:
    flat = x.reshape(-1, x.shape[-1]).float()
    total, count = store.get(key, (torch.zeros(flat.shape[1], flat.shape[1]), 0))
    store[key] = (total.addmm_(flat.T, flat, alpha=2.0), count + flat.shape[0])


def prepare_hessian(hessian: torch.Tensor, act_order: bool, dampening: float, label: str = "layer") -> PreparedHessian:
    """Dampen, (act-order) permute, and factor H⁻¹ = UᵀU. The factorisation runs in
    float64: cheap at these sizes, and it keeps nearly singular Hessians usable."""
    H = hessian.detach().double().clone()
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    importance = diag.float().clone()
    perm = torch.argsort(diag, descending=True) if act_order else None
    if perm is not None:
        H = H[perm][:, perm]
    mean_diag = H.diagonal().mean().item()
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    fraction = dampening
    for step in range(_MAX_DAMPENING_STEPS):
        L, info = torch.linalg.cholesky_ex(H + fraction * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                if step:
                    warnings.warn(f"{label}: the calibration Hessian is ill-conditioned; dampening raised from "
                                  f"{dampening:g} to {fraction:g} of its mean diagonal", GPTQWarning, stacklevel=3)
                return PreparedHessian(U.float(), perm, importance, dead, fraction)
        fraction *= 10
    raise QuantConfigError(f"{label}: the calibration Hessian is singular even with dampening {fraction / 10:g}; "
                           "use more calibration data")


def _params(w: torch.Tensor, spec: WeightSpec, importance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point for each row of ``w`` ([rows, cols]), as stored (float16
    scale): min/max, or the clipping ratio with the least importance-weighted error."""
    scale, zero = choose_qparams(w, spec.bits, spec.symmetric)
    scale = storable_scale(scale)
    if importance is None:
        return scale, zero
    best_err = None
    lo_all, hi_all = w.amin(dim=1).clamp_max(0), w.amax(dim=1).clamp_min(0)
    for ratio in _CLIP_GRID:
        if spec.symmetric:
            s = storable_scale(torch.maximum(-lo_all, hi_all) * ratio / spec.qmax)
            z = torch.zeros_like(s)
        else:
            s = storable_scale((hi_all - lo_all) * ratio / spec.qmax)
            z = torch.round(-lo_all * ratio / s).clamp(0, spec.qmax)
        q = (torch.round(w / s[:, None]) + z[:, None]).clamp(spec.qmin, spec.qmax)
        err = ((q - z[:, None]) * s[:, None] - w).square_() @ importance
        if best_err is None:
            best_err, scale, zero = err, s, z
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def gptq_quantize(weight: torch.Tensor, prepared: PreparedHessian, spec: WeightSpec, block_size: int = 128,
                  static_groups: bool = True, clip_search: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise ``weight`` ([out, in]) column by column with error feedback.

    Returns codes ``[out, in]`` (uint8, stored form: symmetric codes offset by 2^(bits-1)),
    scale and zero-point ``[out|1, groups]`` exactly as :func:`quantize_weight` lays them out.
    """
    W = weight.detach().float().clone()
    N, K = W.shape
    W[:, prepared.dead] = 0
    group = spec.group_size if spec.granularity == "group" else K
    if K % group:
        raise QuantConfigError(f"group_size {group} does not divide the layer's {K} input columns")
    n_groups = K // group
    rows = 1 if spec.granularity == "tensor" else N
    importance = prepared.importance if clip_search else None
    scale = torch.empty(rows, n_groups)
    zero = torch.zeros(rows, n_groups)
    # Ranges fixed up front: per tensor, per channel, or static groups (original order).
    upfront = spec.granularity != "group" or static_groups
    if spec.granularity == "tensor":
        imp = None if importance is None else importance.repeat(N)
        s, z = _params(W.reshape(1, -1), spec, imp)
        scale[:], zero[:] = s[:, None], z[:, None]
    elif upfront:
        for g in range(n_groups):
            cols = slice(g * group, (g + 1) * group)
            scale[:, g], zero[:, g] = _params(W[:, cols], spec, None if importance is None else importance[cols])

    perm = prepared.perm
    if perm is not None:
        W = W[:, perm]
    order = perm if perm is not None else torch.arange(K)
    group_of = (order // group).tolist()
    U = prepared.inverse_cholesky
    codes = torch.empty(N, K, dtype=torch.uint8)
    offset = 2 ** (spec.bits - 1) if spec.symmetric else 0
    qmin, qmax = spec.qmin, spec.qmax
    for start in range(0, K, block_size):
        stop = min(start + block_size, K)
        W1 = W[:, start:stop].clone()
        err_block = torch.empty_like(W1)
        U1 = U[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            g = group_of[col]
            if not upfront and col % group == 0:   # dynamic groups: range from the updated weights
                cols = slice(col, col + group)
                rest = W1[:, i:i + group] if i + group <= W1.shape[1] else torch.cat([W1[:, i:], W[:, stop:col + group]], 1)
                scale[:, g], zero[:, g] = _params(rest, spec, None if importance is None else importance[cols])
            s = scale[:, g] if rows == N else scale[0, g].expand(N)
            z = zero[:, g] if rows == N else zero[0, g].expand(N)
            w = W1[:, i]
            q = torch.round(w / s).add_(z).clamp_(qmin, qmax)
            codes[:, int(order[col])] = (q + offset).to(torch.uint8)
            err = (w - (q - z) * s) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            err_block[:, i] = err
        if stop < K:
            W[:, stop:].addmm_(err_block, U[start:stop, stop:], alpha=-1.0)
    return codes, scale, zero


def _write_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Overwrite a Linear's (or GPT-2 Conv1D's, stored transposed) weight in place."""
    with torch.no_grad():
        target = linear_weight(module)   # [out, in] view: Linear, Conv1D, or a SmoothQuant input wrapper's layer
        target.copy_(weight.to(target.dtype))


def layer_output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    """‖W X − Ŵ X‖_F / ‖W X‖_F over inputs ``x`` ([tokens, in])."""
    ref = x @ weight.T
    return (torch.linalg.matrix_norm(ref - x @ approx.T) / torch.linalg.matrix_norm(ref)).item()


__all__ = ["GPTQ", "GPTQWarning", "PreparedHessian", "gptq_quantize", "layer_output_error", "prepare_hessian"]
