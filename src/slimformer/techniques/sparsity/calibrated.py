"""One-shot pruning from calibration inputs: SparseGPT and Wanda, layer by layer
(``core/sequential.py``: layers sharing an input form a group; true-sequential in one
calibration forward per block), to an unstructured ``sparsity`` per layer or an
``n``:``m`` pattern, optionally after the N:M channel permutation searched on the
method's saliency |W|·‖X‖ (``core/permutation.py``).

**SparseGPT** (Frantar & Alistarh 2023) reconstructs each layer's output. Columns are
visited in order; a pruned weight's error is pushed onto the columns not yet visited
through the inverse Hessian of the layer's output error (the OBS update, GPTQ's
machinery: ``core/hessian.py``), so the kept weights compensate for the pruned ones.
Masks: unstructured, chosen per block of ``block_size`` columns by the saliency
w² / [H⁻¹]²_jj of the weights as updated so far (each layer prunes exactly its
``sparsity``); N:M, chosen every M columns. Joint mode (``bits`` given, with the other
weight-format keys of :class:`QuantFormat`): the kept weights are quantised column by
column as GPTQ does, in the same pass, and the layer becomes a ``QuantLinear`` whose
pruned weights are exact zeros (the zero code).

**Wanda** (Sun et al. 2023) prunes by |W_ij| · ‖X_j‖₂, the weight's magnitude times the
norm of its input channel over the calibration tokens, comparing the weights of each
output row (unstructured: each row keeps its top 1 − sparsity) or each group of M inputs
of a row (N:M). No weight update: one statistic per input, one sort.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from slimformer.core.hessian import HessianWarning, hessian_sum, obs_compress, prepare_hessian
from slimformer.core.sequential import LayerwiseStage
from slimformer.core.transform import Needs, register
from slimformer.errors import QuantConfigError, SparsityConfigError
from slimformer.eval.sparsity import describe_sparsity
from slimformer.formats.masks import check_nm, check_nm_fits, check_sparsity, kept_magnitude, nm_mask, row_mask
from slimformer.formats.spec import WeightGranularity, WeightSpec
from slimformer.nn.quant_linear import QuantLinear
from slimformer.nn.surgery import is_linear, linear_weight, set_module


@dataclass(frozen=True)
class CalibratedPruning(LayerwiseStage):
    """``sparsity`` (unstructured, per layer; 0.5 when neither it nor ``n``/``m`` is given)
    or ``n`` and ``m`` (keep N of every M consecutive inputs); ``permute: true`` (N:M only)
    searches ``search_rounds`` rounds of channel permutation first."""

    sparsity: float | None = None
    n: int | None = None
    m: int | None = None
    permute: bool = False
    search_rounds: int = 200
    seed: int = 0
    true_sequential: bool = True

    needs = Needs.CALIBRATION
    error = SparsityConfigError

    def __post_init__(self):
        if (self.n is None) != (self.m is None):
            raise SparsityConfigError("give both n and m for N:M sparsity")
        if self.n is not None:
            check_nm(self.n, self.m)
            if self.sparsity is not None:
                raise SparsityConfigError("give either sparsity (unstructured) or n and m (N:M), not both")
        else:
            check_sparsity(self.unstructured)
            if self.permute:
                raise SparsityConfigError("permute applies to N:M sparsity (give n and m)")
        if self.search_rounds < 0:
            raise SparsityConfigError(f"search_rounds must be >= 0, got {self.search_rounds!r}")

    @property
    def unstructured(self) -> float:
        return 0.5 if self.sparsity is None else self.sparsity

    def permutation(self) -> tuple[int, int, dict] | None:
        return (self.n, self.m, {"max_rounds": self.search_rounds, "seed": self.seed}) if self.permute else None

    def prepare(self, block, ctx) -> None:
        if self.m is not None:   # every layer checked before the first is pruned
            for name, module in self.target_linears(block, ctx).items():
                check_nm_fits(f"{ctx.prefix}.{name}", linear_weight(module).shape[1], self.m)
        super().prepare(block, ctx)

    def summary(self, model, adapter):
        weights = {}
        for index, block in enumerate(adapter.get_blocks(model)):
            for name in self.targets.select(adapter.linears, index):
                module = block.get_submodule(name)
                weights[f"{adapter.blocks}.{index}.{name}"] = (
                    linear_weight(module) if is_linear(module) else module.dequantized_weight())
        return {"sparsity": describe_sparsity(weights)}

    def _report(self, ctx, name: str, weight: torch.Tensor) -> None:
        ctx.report(name, sparsity=round(float((weight == 0).float().mean()), 6))


@register
@dataclass(frozen=True)
class SparseGPT(CalibratedPruning):
    """Prune to ``sparsity`` or ``n``:``m`` with OBS reconstruction; ``bits`` (and
    ``symmetric``, ``granularity``, ``group_size``) also quantises the kept weights."""

    dampening: float = 0.01          # fraction of the mean Hessian diagonal added to it
    block_size: int = 128            # columns per mask choice (unstructured) and lazy update
    bits: int | None = None          # joint quantisation: the weight format
    symmetric: bool = True
    granularity: WeightGranularity = "channel"
    group_size: int | None = None
    static_groups: bool = True
    clip_search: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not self.dampening > 0:
            raise SparsityConfigError(f"dampening must be positive, got {self.dampening!r}")
        if self.block_size < 1:
            raise SparsityConfigError(f"block_size must be positive, got {self.block_size!r}")
        if self.m is not None and self.block_size % self.m:
            raise SparsityConfigError(f"block_size {self.block_size} must be a multiple of M={self.m}")
        if self.bits is not None:
            self.weight_spec()   # validates bits and the group settings
        elif (self.granularity, self.group_size) != ("channel", None):
            raise QuantConfigError("granularity and group_size need bits (joint quantisation)")

    def weight_spec(self) -> WeightSpec | None:
        if self.bits is None:
            return None
        return WeightSpec(self.bits, self.symmetric, self.granularity, self.group_size)

    # ------------------------------------------------------------------ per block
    def statistic(self, flat):
        return hessian_sum(flat)

    def column_norms(self, stat):
        return stat.diagonal().clamp_min(0).sqrt()

    def init_state(self, ctx) -> None:
        ctx.state.update(results={})

    def compress_group(self, block, ctx, names, hessian, tokens) -> None:
        label = f"{ctx.prefix}.{names[0]}" + (f" (+{len(names) - 1} sharing its input)" if len(names) > 1 else "")
        if tokens < hessian.shape[0] and not ctx.plan.get("sparsegpt_warned_few_tokens"):
            ctx.plan["sparsegpt_warned_few_tokens"] = True   # once per run
            warnings.warn(f"{label}: {tokens} calibration tokens for {hessian.shape[0]} inputs: the Hessian is "
                          "rank-deficient, SparseGPT leans on dampening (use more calibration data)",
                          HessianWarning, stacklevel=2)
        prepared = prepare_hessian(hessian, False, self.dampening, label)
        if prepared.dampening != self.dampening:
            ctx.report(names[0], sparsegpt_dampening=prepared.dampening)
        spec = self.weight_spec()
        # Rows are independent given the shared Hessian: layers sharing an input are done
        # stacked (per-tensor scales stay per layer).
        stacks = [[n] for n in names] if spec is not None and spec.granularity == "tensor" else [names]
        for members in stacks:
            weights = [linear_weight(block.get_submodule(n)).detach().float() for n in members]
            try:
                done = obs_compress(torch.cat(weights), prepared, spec, block_size=self.block_size,
                                    static_groups=self.static_groups, clip_search=self.clip_search,
                                    sparsity=self.unstructured if self.n is None else 0.0,
                                    n=self.n or 0, m=self.m or 0, row_splits=[w.shape[0] for w in weights],
                                    name=f"{ctx.prefix}.{members[0]}")
            except (QuantConfigError, SparsityConfigError) as exc:
                message = str(exc)
                if not message.startswith(ctx.prefix):
                    message = f"{ctx.prefix}.{members[0]}: {message}"
                raise type(exc)(message) from None
            rows = 0
            for name, w in zip(members, weights):
                part = slice(rows, rows + w.shape[0])
                rows += w.shape[0]
                new = done.weight[part]
                if spec is not None:
                    per_row = spec.granularity != "tensor"
                    saved = (spec, done.codes[part], done.scale[part] if per_row else done.scale,
                             None if spec.symmetric else (done.zero[part] if per_row else done.zero))
                    ctx.state["results"][name] = saved
                    new = QuantLinear.from_float(w, None, spec, codes=saved[1], scale=saved[2],
                                                 zero=saved[3]).dequantized_weight()
                target = linear_weight(block.get_submodule(name))
                with torch.no_grad():
                    target.copy_(new.to(target.dtype))
                self._report(ctx, name, new)

    def reorder_outputs(self, ctx, name, index) -> None:
        saved = ctx.state["results"].get(name)
        if saved is None:
            return
        spec, codes, scale, zero = saved
        per_row = spec.granularity != "tensor"
        ctx.state["results"][name] = (spec, codes[index], scale[index] if per_row else scale,
                                      zero[index] if per_row and zero is not None else zero)

    def finish_group(self, block, ctx, names) -> None:
        if self.bits is None:
            return
        for name in names:
            module = block.get_submodule(name)
            spec, codes, scale, zero = ctx.state["results"][name]
            set_module(block, name, QuantLinear.from_float(linear_weight(module), module.bias, spec, None,
                                                           codes=codes, scale=scale, zero=zero))


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖ for ``weight`` ``[out, in]`` and the inputs' norms ``[in]``."""
    return weight.detach().abs().float() * input_norms.float()


@register
@dataclass(frozen=True)
class Wanda(CalibratedPruning):
    """Prune by |W|·‖X‖ per output row (``sparsity``) or N:M (``n``, ``m``; ``permute``
    first searches the channel permutation keeping the most of that score)."""

    def statistic(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(flat.float(), dim=0).square()   # Σ_tokens x_j²

    def column_norms(self, stat: torch.Tensor) -> torch.Tensor:
        return stat.sqrt()

    def compress_group(self, block, ctx, names, stat, tokens) -> None:
        norms = self.column_norms(stat)
        for name in names:
            weight = linear_weight(block.get_submodule(name))
            scores = wanda_scores(weight, norms)
            if self.n is not None:
                mask = nm_mask(scores, self.n, self.m, f"{ctx.prefix}.{name}")
            else:
                mask = row_mask(scores, self.unstructured)
            ctx.report(name, sparsity=round(1 - float(mask.float().mean()), 6),
                       kept_magnitude=round(kept_magnitude(weight, mask), 6))
            with torch.no_grad():
                weight.mul_(mask)
