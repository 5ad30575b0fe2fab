"""The interface training-time techniques plug into (sparsity masks now; QAT and
distillation later).

The trainer calls, around every optimiser step:
``before_forward`` → forward + loss (+ ``regularizer``) → backward → ``after_backward``
(gradient surgery: masking, straight-through restores, decay terms) → optimiser step
→ ``after_step`` (re-apply masks, update them on schedule).
Hooks keep whatever they need to resume in ``state_dict`` (tensors only, saved with
safetensors) and ``extra_state`` (JSON).
"""

from __future__ import annotations

import torch


class TrainHook:
    """Base class: every method is optional."""

    def on_start(self, trainer) -> None:
        """Once, before the first step (after a resume has restored state)."""

    def before_forward(self, trainer, step: int) -> None:
        """E.g. swap dense weights for their pruned version (straight-through estimators)."""

    def regularizer(self, trainer, step: int) -> torch.Tensor | None:
        """An extra term added to the loss, or None."""
        return None

    def after_backward(self, trainer, step: int) -> None:
        """Gradients are ready and not yet clipped: mask them, restore dense weights, add decay."""

    def after_step(self, trainer, step: int) -> None:
        """The optimiser has stepped: re-apply masks, recompute them on schedule."""

    def on_end(self, trainer) -> None:
        """After the last step: leave the model in its final (e.g. pruned) form."""

    def metrics(self) -> dict:
        """Numbers worth showing in the progress bar and the training log (e.g. sparsity)."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass
