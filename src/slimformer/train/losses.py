"""Loss terms: the training loss is a weighted sum of terms that the recipe's ``train:``
section and the training stages add.

A term is called once per micro-batch with the trainer, the token ids and the student's
logits (computed once and shared by every term) and returns a scalar tensor; the trainer
adds ``term.weight * term(...)``. Built-in terms:

- :class:`LanguageModelling`: next-token cross-entropy (``causal_lm``);
- :class:`Distillation`: Hinton's KL(teacher ‖ student) at a temperature, against a
  teacher model (``distill``); the runner gives it the model as it was before the recipe's
  first stage when no teacher is passed;
- :class:`Regularizer`: a hook point, any ``fn(trainer, step) -> tensor | None``
  (e.g. a :class:`~slimformer.train.hooks.TrainHook`'s ``regularizer``).

In a recipe, ``train: {loss: distill, distill_weight: 0.5, distill_temperature: 2}``
still works (it becomes ``0.5·LanguageModelling + 0.5·Distillation(T=2)``); a list of
terms spells the same explicitly::

    train:
      loss: [{causal_lm: {weight: 0.5}}, {distill: {weight: 0.5, temperature: 2.0}}]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimformer.errors import RecipeError, TrainingError


def causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target term, KL(teacher ‖ student) at ``temperature``, scaled by T² so
    its gradients keep their size as T changes."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1).flatten(0, 1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1).flatten(0, 1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t


@dataclass
class LossTerm:
    """Base class: ``weight * self(trainer, ids, logits)`` is added to the loss."""

    weight: float = 1.0

    name: str = dataclasses.field(default="term", init=False, repr=False)

    def __call__(self, trainer, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-friendly settings, saved with the training record."""
        return {"term": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                      if f.init and _plain(getattr(self, f.name))}}


def _plain(value) -> bool:
    return value is None or isinstance(value, (int, float, str, bool))


@dataclass
class LanguageModelling(LossTerm):
    """Next-token cross-entropy on the training ids."""

    name: str = dataclasses.field(default="causal_lm", init=False, repr=False)

    def __call__(self, trainer, ids, logits):
        return causal_lm_loss(logits, ids)


@dataclass
class Distillation(LossTerm):
    """KL(teacher ‖ student) at ``temperature``, scaled by T². ``teacher`` None: the runner
    supplies the model as it was before the recipe's first stage."""

    temperature: float = 2.0
    teacher: nn.Module | None = dataclasses.field(default=None, repr=False)

    name: str = dataclasses.field(default="distill", init=False, repr=False)

    def __post_init__(self):
        if not self.temperature > 0:
            raise RecipeError(f"train: distillation temperature must be positive, got {self.temperature!r}")

    def __call__(self, trainer, ids, logits):
        if self.teacher is None:
            raise TrainingError("the distillation loss needs a teacher model")
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits
        return distillation_loss(logits, teacher_logits, self.temperature)


@dataclass
class Regularizer(LossTerm):
    """The hook point for extra terms: ``fn(trainer, step)`` returns a tensor or None
    (None adds nothing)."""

    fn: Callable[[Any, int], torch.Tensor | None] | None = dataclasses.field(default=None, repr=False)

    name: str = dataclasses.field(default="regularizer", init=False, repr=False)

    def __call__(self, trainer, ids, logits):
        return None if self.fn is None else self.fn(trainer, trainer.step)


# Names a recipe's ``train: loss:`` may use.
TERMS: dict[str, type[LossTerm]] = {"causal_lm": LanguageModelling, "distill": Distillation}


def parse_terms(value, *, distill_weight: float = 0.5, distill_temperature: float = 2.0) -> list[LossTerm]:
    """Terms from a recipe's ``loss`` setting: ``causal_lm``, ``distill`` (shorthand for
    ``(1 - distill_weight)·causal_lm + distill_weight·distill``), or a list of
    ``{name: {weight: w, ...}}`` mappings (or bare names)."""
    if value == "causal_lm":
        return [LanguageModelling()]
    if value == "distill":
        return [LanguageModelling(weight=1 - distill_weight),
                Distillation(weight=distill_weight, temperature=distill_temperature)]
    if isinstance(value, (list, tuple)) and value:
        return [_parse_term(item) for item in value]
    raise RecipeError(f"train: loss must be causal_lm, distill or a list of terms ({', '.join(TERMS)}), got {value!r}")


def _parse_term(item) -> LossTerm:
    if isinstance(item, LossTerm):
        return item
    if isinstance(item, str):
        item = {item: {}}
    if not isinstance(item, dict) or len(item) != 1:
        raise RecipeError(f"train: each loss term must be a name or a mapping of one name to its settings, got {item!r}")
    (name, args), = item.items()
    if name not in TERMS:
        raise RecipeError(f"train: unknown loss term '{name}' (known: {', '.join(TERMS)})")
    args = dict(args or {})
    cls = TERMS[name]
    accepted = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "teacher"]
    for key, value in args.items():
        if key not in accepted:
            raise RecipeError(f"train: loss term {name}: unknown setting '{key}' (accepted: {', '.join(accepted)})")
        if isinstance(value, str):   # PyYAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"train: loss term {name}: {key} must be a number, got {value!r}")
        args[key] = float(value)
    return cls(**args)


def with_teacher(terms: list[LossTerm], teacher: nn.Module | None) -> list[LossTerm]:
    """``terms`` with ``teacher`` given to every distillation term that has none."""
    return [dataclasses.replace(t, teacher=teacher) if isinstance(t, Distillation) and t.teacher is None else t
            for t in terms]


def needs_teacher(terms: list[LossTerm]) -> bool:
    return any(isinstance(t, Distillation) and t.teacher is None for t in terms)
