"""Sparsity during training: each Transform here ``needs`` training and hands the
trainer a :class:`~slimformer.train.hooks.TrainHook`.

- ``FineTune``: dense training, no mask (train before pruning).
- ``MaskedFineTune``: keep the zeros a one-shot stage left (masked gradients and weights).
- ``GMP`` (Zhu & Gupta 2017): sparsity s_t = s_f + (s_i − s_f)(1 − (t − t₀)/(nΔt))³,
  masks recomputed by magnitude every Δt steps; pruned weights get no update.
- ``IterativePruning``: prune, retrain, repeat, with retraining by fine-tuning (at the
  schedule's final learning rate), weight rewinding (Frankle et al.: surviving weights
  back to their values at step k, LR schedule replayed from k) or learning-rate
  rewinding (Renda et al.: weights kept, LR schedule replayed from k).
- ``STE`` / ``SRSTE`` (Zhou et al. 2021): forward with the N:M-pruned weights, mask
  recomputed from the dense weights every step; the gradient updates the dense weights;
  SR-STE adds λ·(1−M)⊙W so pruned weights decay and masks settle.
- ``TopKAST`` (Jayakumar et al. 2020): forward with the top-D weights (set A), update
  the larger top set B ⊇ A, with an exploration regulariser that decays B∖A 1/D times
  harder than A; masks recomputed as training proceeds.

After training, each hook leaves the model in its pruned form (zeros in place).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from slimformer.core.transform import Needs, Transform, register, target_weights
from slimformer.errors import SparsityConfigError
from slimformer.eval.sparsity import describe_sparsity  # noqa: F401  (also re-exported)
from slimformer.formats.masks import (
    check_nm,
    check_sparsity,
    global_threshold,
    magnitude_mask,
    nm_mask,
    sparsity_of,
    threshold_mask,
)
from slimformer.train.hooks import TrainHook


def grad_of(weight: torch.Tensor) -> torch.Tensor | None:
    """The gradient of an ``[out, in]`` weight, also when it is a transposed view of the
    parameter (GPT-2's Conv1D stores ``[in, out]``)."""
    if weight._base is None:
        return weight.grad
    base_grad = weight._base.grad
    return None if base_grad is None else base_grad.t()


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str,
                    current: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Masks keeping the largest weights; already-pruned weights (``current``) stay pruned."""
    scores = {k: w.detach().abs() * (current[k] if current else 1) for k, w in weights.items()}
    if scope == "global":
        threshold = global_threshold(list(scores.values()), sparsity)
        return {k: threshold_mask(s, threshold) for k, s in scores.items()}
    return {k: magnitude_mask(s, sparsity) for k, s in scores.items()}


class _SparsityTransform(Transform):
    needs = Needs.TRAINING

    def convert(self, block, ctx):
        raise SparsityConfigError(f"{type(self).__name__} prunes during training: use `slimformer train`")

    def summary(self, model, adapter):
        return {"sparsity": describe_sparsity(target_weights(model, adapter, self.targets))}


class MaskHook(TrainHook):
    """Holds one mask per targeted weight; keeps pruned weights at zero with no gradient."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        self.weights = weights
        self.masks: dict[str, torch.Tensor] = {}

    def apply_masks(self) -> None:
        with torch.no_grad():
            for name, mask in self.masks.items():
                self.weights[name].mul_(mask)

    def after_backward(self, trainer, step):
        for name, mask in self.masks.items():
            grad = grad_of(self.weights[name])
            if grad is not None:
                grad.mul_(mask)

    def after_step(self, trainer, step):
        self.apply_masks()   # AdamW's momentum and weight decay would move masked weights otherwise

    def metrics(self):
        if not self.masks:
            return {"sparsity": 0.0}
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return {"sparsity": round(1 - kept / total, 4)}

    def state_dict(self):
        return {f"mask.{k}": m.to(torch.uint8) for k, m in self.masks.items()}

    def load_state_dict(self, state):
        self.masks = {k[len("mask."):]: v.bool() for k, v in state.items() if k.startswith("mask.")}


class KeepZerosHook(MaskHook):
    def on_start(self, trainer):
        if not self.masks:
            self.masks = {k: w.detach() != 0 for k, w in self.weights.items()}


@register
@dataclass(frozen=True)
class FineTune(_SparsityTransform):
    """Plain (dense) training: no mask. The first step of train → prune → retrain."""

    def training_hook(self, model, adapter, config):
        return TrainHook()


@register
@dataclass(frozen=True)
class MaskedFineTune(_SparsityTransform):
    """Fine-tune a pruned model, keeping its zeros (after a one-shot stage such as Magnitude)."""

    def training_hook(self, model, adapter, config):
        return KeepZerosHook(target_weights(model, adapter, self.targets))


class GMPHook(MaskHook):
    def __init__(self, weights, spec: "GMP", total_steps: int):
        super().__init__(weights)
        self.spec = spec
        self.start = round(spec.start * total_steps)
        self.end = max(self.start + spec.every, round(spec.end * total_steps))

    def target_sparsity(self, step: int) -> float:
        s = self.spec
        if step < self.start:
            return s.initial_sparsity
        progress = min(1.0, (step - self.start) / (self.end - self.start))
        return s.final_sparsity + (s.initial_sparsity - s.final_sparsity) * (1 - progress) ** 3

    def _update(self, step):
        sparsity = self.target_sparsity(step)
        if sparsity > 0:
            self.masks = magnitude_masks(self.weights, sparsity, self.spec.scope, self.masks or None)
            self.apply_masks()

    def on_start(self, trainer):
        if not self.masks:
            self._update(trainer.step)

    def after_step(self, trainer, step):
        done = step + 1
        if self.start <= done <= self.end and (done - self.start) % self.spec.every == 0 or done == self.end:
            self._update(done)
        else:
            self.apply_masks()

    def on_end(self, trainer):
        self._update(max(trainer.step, self.end))


@register
@dataclass(frozen=True)
class GMP(_SparsityTransform):
    """Gradual magnitude pruning from ``initial_sparsity`` to ``final_sparsity`` between the
    fractions ``start`` and ``end`` of training, masks recomputed every ``every`` steps."""

    final_sparsity: float = 0.5
    initial_sparsity: float = 0.0
    start: float = 0.0
    end: float = 0.75
    every: int = 10
    scope: Literal["layer", "global"] = "layer"

    def __post_init__(self):
        check_sparsity(self.final_sparsity)
        check_sparsity(self.initial_sparsity)
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError("initial_sparsity must not exceed final_sparsity")
        if not 0 <= self.start < self.end <= 1:
            raise ValueError(f"need 0 <= start < end <= 1, got start={self.start}, end={self.end}")
        if self.every < 1:
            raise ValueError(f"every must be a positive number of steps, got {self.every}")

    def training_hook(self, model, adapter, config):
        return GMPHook(target_weights(model, adapter, self.targets), self, config.steps)


class IterativeHook(MaskHook):
    def __init__(self, weights, spec: "IterativePruning", total_steps: int):
        super().__init__(weights)
        self.spec = spec
        first = spec.first_prune_step if spec.first_prune_step is not None else total_steps // (spec.rounds + 1)
        if not spec.rewind_step <= first < total_steps:
            raise SparsityConfigError(f"IterativePruning: need rewind_step <= first_prune_step < steps, got "
                                      f"{spec.rewind_step}, {first}, {total_steps}")
        span = (total_steps - first) / spec.rounds
        self.prune_steps = [first + round(r * span) for r in range(spec.rounds)]
        self.snapshot: dict[str, torch.Tensor] = {}
        self.rounds_done = 0

    def round_sparsity(self, round_index: int) -> float:
        """Each round prunes the same fraction of the weights still alive."""
        return 1 - (1 - self.spec.final_sparsity) ** ((round_index + 1) / self.spec.rounds)

    def _take_snapshot(self, trainer):
        self.snapshot = {name: p.detach().clone() for name, p in trainer.params.items()}

    def on_start(self, trainer):
        if trainer.step == self.spec.rewind_step and not self.snapshot and self.spec.retrain == "weight_rewind":
            self._take_snapshot(trainer)
        self._maybe_prune(trainer, trainer.step)

    def after_step(self, trainer, step):
        done = step + 1
        if done == self.spec.rewind_step and self.spec.retrain == "weight_rewind":
            self._take_snapshot(trainer)
        self.apply_masks()
        self._maybe_prune(trainer, done)

    def _maybe_prune(self, trainer, step):
        if self.rounds_done >= len(self.prune_steps) or step != self.prune_steps[self.rounds_done]:
            return
        self.masks = magnitude_masks(self.weights, self.round_sparsity(self.rounds_done), self.spec.scope,
                                     self.masks or None)
        self.rounds_done += 1
        retrain = self.spec.retrain
        if retrain == "finetune":
            trainer.constant_lr = trainer.config.lr_at(trainer.config.steps)   # the schedule's final rate
        else:
            trainer.schedule_step = self.spec.rewind_step
            if retrain == "weight_rewind":
                with torch.no_grad():
                    for name, p in trainer.params.items():
                        p.copy_(self.snapshot[name])
                trainer.optimizer.state.clear()   # a restart from step k: its moments are gone
        self.apply_masks()

    def state_dict(self):
        state = super().state_dict()
        state.update({f"snapshot.{k}": v for k, v in self.snapshot.items()})
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.snapshot = {k[len("snapshot."):]: v for k, v in state.items() if k.startswith("snapshot.")}

    def extra_state(self):
        return {"rounds_done": self.rounds_done}

    def load_extra_state(self, state):
        self.rounds_done = state.get("rounds_done", 0)


@register
@dataclass(frozen=True)
class IterativePruning(_SparsityTransform):
    """Prune to ``final_sparsity`` in ``rounds`` magnitude-pruning rounds, retraining after each.

    The first round comes at ``first_prune_step`` (default: steps / (rounds + 1), after
    dense training), the others evenly spaced after it. ``retrain``: ``finetune`` (train on
    at the schedule's final LR), ``weight_rewind`` (weights back to step ``rewind_step``,
    schedule replayed from there) or ``lr_rewind`` (weights kept, schedule replayed)."""

    final_sparsity: float = 0.5
    rounds: int = 1
    retrain: Literal["finetune", "weight_rewind", "lr_rewind"] = "finetune"
    rewind_step: int = 0
    first_prune_step: int | None = None
    scope: Literal["layer", "global"] = "layer"

    def __post_init__(self):
        check_sparsity(self.final_sparsity)
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if self.retrain not in ("finetune", "weight_rewind", "lr_rewind"):
            raise ValueError(f"retrain must be finetune, weight_rewind or lr_rewind, got {self.retrain!r}")
        if self.rewind_step < 0:
            raise ValueError("rewind_step must be >= 0")

    def training_hook(self, model, adapter, config):
        return IterativeHook(target_weights(model, adapter, self.targets), self, config.steps)


class DenseForwardHook(MaskHook):
    """Straight-through training: the forward sees pruned weights, the update goes to the
    dense ones. ``forward_masks`` recomputes the masks from the dense weights."""

    def __init__(self, weights):
        super().__init__(weights)
        self.dense: dict[str, torch.Tensor] = {}
        self.flips = 0.0

    def forward_masks(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def before_forward(self, trainer, step):
        new = self.forward_masks()
        if self.masks:
            changed = sum(int((new[k] != self.masks[k]).sum()) for k in new)
            self.flips = changed / sum(m.numel() for m in new.values())
        self.masks = new
        with torch.no_grad():
            for name, weight in self.weights.items():
                self.dense[name] = weight.detach().clone()
                weight.mul_(self.masks[name])

    def restore_dense(self):
        with torch.no_grad():
            for name, weight in self.weights.items():
                weight.copy_(self.dense[name])
        self.dense = {}

    def after_backward(self, trainer, step):
        self.restore_dense()   # the gradient, taken at the pruned point, now updates the dense weights

    def after_step(self, trainer, step):
        pass   # the dense weights stay dense between steps: the mask is re-chosen from them

    def on_end(self, trainer):
        self.masks = self.forward_masks()
        self.apply_masks()

    def metrics(self):
        return {**super().metrics(), "mask_flips": round(self.flips, 6)}

    def state_dict(self):
        return {}   # masks are recomputed from the dense weights every step


class STEHook(DenseForwardHook):
    def __init__(self, weights, n, m, decay):
        super().__init__(weights)
        self.n, self.m, self.decay = n, m, decay

    def forward_masks(self):
        return {k: nm_mask(w, self.n, self.m, k) for k, w in self.weights.items()}

    def after_backward(self, trainer, step):
        super().after_backward(trainer, step)
        if self.decay:
            for name, weight in self.weights.items():
                grad = grad_of(weight)
                if grad is not None:   # SR-STE: pruned weights decay towards zero
                    grad.add_(weight.detach() * ~self.masks[name], alpha=self.decay)


@register
@dataclass(frozen=True)
class STE(_SparsityTransform):
    """N:M sparsity learnt with the straight-through estimator (``decay`` > 0: SR-STE)."""

    n: int = 2
    m: int = 4
    decay: float = 0.0

    def __post_init__(self):
        check_nm(self.n, self.m)
        if self.decay < 0:
            raise ValueError(f"decay must be >= 0, got {self.decay}")

    def training_hook(self, model, adapter, config):
        weights = target_weights(model, adapter, self.targets)
        for name, weight in weights.items():
            nm_mask(weight, self.n, self.m, name)   # fail now, naming the layer, if M does not divide it
        return STEHook(weights, self.n, self.m, self.decay)


@register
@dataclass(frozen=True)
class SRSTE(STE):
    """Sparse-refined STE: STE plus a decay λ·(1−M)⊙W on the pruned weights (Zhou et al. use λ = 2e-4
    with plain SGD; with AdamW, whose step size ignores the gradient's scale, a larger λ bites sooner)."""

    decay: float = 2e-4


class TopKASTHook(DenseForwardHook):
    def __init__(self, weights, spec: "TopKAST"):
        super().__init__(weights)
        self.spec = spec
        self.backward_masks: dict[str, torch.Tensor] = {}

    def forward_masks(self):
        return magnitude_masks(self.weights, self.spec.sparsity, self.spec.scope)

    def before_forward(self, trainer, step):
        super().before_forward(trainer, step)
        # B is taken from the dense weights, restored after the backward; until then
        # self.dense holds them.
        dense = {k: self.dense[k] for k in self.weights}
        self.backward_masks = magnitude_masks(dense, self.spec.backward_sparsity, self.spec.scope)

    def after_backward(self, trainer, step):
        super().after_backward(trainer, step)
        density = 1 - self.spec.sparsity
        for name, weight in self.weights.items():
            grad = grad_of(weight)
            if grad is None:
                continue
            in_b, in_a = self.backward_masks[name], self.masks[name]
            grad.mul_(in_b)
            if self.spec.exploration:
                # d/dW of λ(‖W_A‖² + ‖W_B∖A‖² / D) / 2: weights outside A pay more to stay near the cut
                penalty = weight.detach() * (in_a + (in_b & ~in_a) / density)
                grad.add_(penalty, alpha=self.spec.exploration)


@register
@dataclass(frozen=True)
class TopKAST(_SparsityTransform):
    """Top-KAST: forward at ``sparsity``, gradients to the top (1 − ``backward_sparsity``) weights."""

    sparsity: float = 0.5
    backward_sparsity: float = 0.25
    exploration: float = 1e-4
    scope: Literal["layer", "global"] = "layer"

    def __post_init__(self):
        check_sparsity(self.sparsity)
        check_sparsity(self.backward_sparsity)
        if self.backward_sparsity > self.sparsity:
            raise ValueError("backward_sparsity must not exceed sparsity (the backward set B contains A)")
        if self.exploration < 0:
            raise ValueError("exploration must be >= 0")

    def training_hook(self, model, adapter, config):
        return TopKASTHook(target_weights(model, adapter, self.targets), self)
