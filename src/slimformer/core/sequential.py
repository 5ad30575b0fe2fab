"""Calibrated stages that compress a block layer by layer from a statistic of each layer's
input (GPTQ and SparseGPT: the Hessian 2XᵀX; Wanda: the input norms).

How they run:
  * Layers that read the same input (q/k/v, gate/up) form one group: one statistic, one
    decision per group (e.g. one Cholesky factor shared by their rows).
  * ``true_sequential`` (default): the whole calibration set goes through a block as one
    batch and each group is compressed in a forward pre-hook the moment its input
    arrives, so every layer sees inputs computed by the already-compressed layers before
    it (q/k/v → o → gate/up → down), and that one forward also yields the next block's
    inputs. Otherwise the statistics are accumulated over a full-precision forward and
    every group is compressed in ``convert``.
  * N:M channel permutation (``core/permutation.py``): before the FFN's output projection
    (and the attention output projection) is compressed, the permutation of its input
    channels that keeps the most of the stage's saliency |W|·‖X_j‖ is applied to it and
    to the layers that produce those channels (already compressed: permuting their
    output rows keeps their own N:M pattern, which runs along inputs), and to the
    calibration input reaching it, so the block computes what it computed before.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimformer.core.transform import BlockContext, Transform
from slimformer.errors import QuantConfigError


class LayerwiseStage(Transform):
    """Base of the stages above. A subclass (a frozen dataclass with a ``true_sequential``
    field) gives :meth:`statistic` and :meth:`compress_group`, and may override the rest."""

    error = QuantConfigError   # the error class for this stage's configuration problems

    # -------------------------------------------------------------- subclass contract
    def statistic(self, flat: torch.Tensor) -> torch.Tensor:
        """Sum over the tokens (rows of ``flat`` ``[tokens, in]``) of the per-token statistic."""
        raise NotImplementedError

    def compress_group(self, block: nn.Module, ctx: BlockContext, names: list[str], stat: torch.Tensor,
                       tokens: int) -> None:
        """Compress the layers ``names`` given their input's statistic (averaged over ``tokens``):
        their weights must hold the compressed values afterwards (the forward goes on with them)."""
        raise NotImplementedError

    def finish_group(self, block: nn.Module, ctx: BlockContext, names: list[str]) -> None:
        """At ``convert``, after every group is compressed: swap in the saved modules."""

    def init_state(self, ctx: BlockContext) -> None:
        """Add this stage's own per-block state to ``ctx.state``."""

    def observe(self, ctx: BlockContext, key: str, x: torch.Tensor) -> None:
        """See every input reaching the group ``key`` (e.g. activation ranges)."""

    def layer_input(self, ctx: BlockContext, key: str, args: tuple) -> tuple | None:
        """Replace a compressed layer's input in the one-pass forward (e.g. fake-quantised)."""
        return None

    def permutation(self) -> tuple[int, int, dict] | None:
        """(N, M, search settings for ``search_permutation``) when this stage permutes
        channels for N:M before compressing, else None."""
        return None

    def column_norms(self, stat: torch.Tensor) -> torch.Tensor:
        """‖X_j‖ per input channel (up to a common factor) from the statistic."""
        raise NotImplementedError

    def reorder_outputs(self, ctx: BlockContext, name: str, index: torch.Tensor) -> None:
        """A compressed layer's output channels were permuted (new k = old ``index[k]``):
        reorder whatever was saved for it."""

    # -------------------------------------------------------------------- the runner
    def one_pass(self) -> bool:
        return self.true_sequential

    def input_groups(self, ctx: BlockContext) -> list[list[str]]:
        """Target projections grouped by shared input, in data-flow order."""
        chosen = set(self.targets.select(ctx.adapter.linears, ctx.index))
        a = ctx.adapter
        parts = [a.attention_in, *[(n,) for n in a.attention_out], a.mlp_in, *[(n,) for n in a.mlp_out]]
        return [g for g in ([n for n in part if n in chosen] for part in parts) if g]

    def prepare(self, block: nn.Module, ctx: BlockContext) -> None:
        ctx.state.clear()
        ctx.state.update(done={}, stats={}, handles=[])
        self.init_state(ctx)
        for names in self.input_groups(ctx):
            key = names[0]

            def hook(_module, args, names=names, key=key):
                x = args[0].detach()
                self.observe(ctx, key, x)
                flat = x.reshape(-1, x.shape[-1])
                if not self.true_sequential:
                    total, count = ctx.state["stats"].get(key, (None, 0))
                    stat = self.statistic(flat)
                    ctx.state["stats"][key] = (stat if total is None else total.add_(stat), count + flat.shape[0])
                    return None
                if key not in ctx.state["done"]:   # the group's first member to run
                    stat, index = self._permute(block, ctx, names, self.statistic(flat).div_(flat.shape[0]))
                    ctx.state["done"][key] = index
                    self.compress_group(block, ctx, names, stat, flat.shape[0])
                index = ctx.state["done"][key]
                if index is not None:   # the channels were permuted: so is the input
                    args = (args[0].index_select(-1, index), *args[1:])
                new = self.layer_input(ctx, key, args)
                return new if new is not None else (args if index is not None else None)

            for name in names:
                ctx.state["handles"].append(block.get_submodule(name).register_forward_pre_hook(hook))

    def convert(self, block: nn.Module, ctx: BlockContext) -> None:
        for handle in ctx.state.pop("handles", []):
            handle.remove()
        groups = self.input_groups(ctx)
        for names in groups:
            if names[0] in ctx.state["done"]:
                continue
            if names[0] not in ctx.state["stats"]:
                raise self.error(f"{ctx.prefix}.{names[0]}: no calibration input reached this layer")
            total, count = ctx.state["stats"].pop(names[0])
            stat, index = self._permute(block, ctx, names, total / count)
            ctx.state["done"][names[0]] = index
            self.compress_group(block, ctx, names, stat, count)
        for names in groups:
            self.finish_group(block, ctx, names)
        ctx.state.clear()

    def _permute(self, block: nn.Module, ctx: BlockContext, names: list[str], stat: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Permute the input channels of an output projection for N:M (see the module
        docstring); returns the statistic in the new order and the index (None: unchanged)."""
        wanted = self.permutation()
        a = ctx.adapter
        if wanted is None or len(names) != 1 or names[0] not in (a.mlp_out[0], a.attention_out[0]):
            return stat, None
        from slimformer.core.permutation import permute_ffn_for_nm, permute_values_for_nm

        n, m, search = wanted
        name = names[0]
        kwargs = dict(search, input_norms=self.column_norms(stat), seed=search.get("seed", 0) + ctx.index)
        if name == a.mlp_out[0]:
            before, after, maps = permute_ffn_for_nm(block, a, n, m, **kwargs)
        else:
            before, after, maps = permute_values_for_nm(block, a, ctx.model.config, n, m, **kwargs)
        ctx.report(name, kept_saliency_default_order=round(before, 6), kept_saliency_permuted=round(after, 6))
        for producer, index in maps["outputs"].items():
            self.reorder_outputs(ctx, producer, index)
        index = maps["inputs"][name]
        stat = stat.index_select(0, index)
        if stat.dim() == 2:
            stat = stat.index_select(1, index)
        return stat, index
