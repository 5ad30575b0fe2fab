"""Loss terms: the training loss is a weighted sum of terms that the recipe's ``train:``
section and the training stages add.

A term is called once per micro-batch as ``term(trainer, ids, logits)``: the token ids and
the student's logits (None for an encoder, which has no LM head), computed once and
shared by every term; the trainer adds ``term.weight * term(...)``. A term that needs
more of the student's forward (each block's output, each block's self-attention output)
says so in its class attributes and reads ``trainer.student`` (a :class:`Captured`), so
the student still runs once. Terms that use a teacher call ``trainer.teacher_forward``:
the teacher runs once per micro-batch, without gradients, however many terms use it.

Built-in terms:

- :class:`LanguageModelling`: next-token cross-entropy (``causal_lm``);
- :class:`Distillation`: Hinton's KL(teacher ‖ student) at a temperature (``distill``);
- :class:`HiddenDistillation`: per-block MSE between student and teacher block outputs
  (``distill_hidden``), normalised by the teacher's mean square unless ``normalize: false``;
  a student with fewer blocks aligns block i with teacher block ``layer_map[i]``
  (``DropLayers`` records the map in ``config.slimformer_layer_map``; ``layer_map: uniform``
  instead aligns block i with teacher block (i+1)·N/M − 1, the last with the last, as TinyBERT);
- :class:`AttentionDistillation`: the same on each block's self-attention output (the
  output projection's output, captured by forward hooks through the model adapter)
  (``distill_attn``);
- :class:`EmbeddingCosine`: 1 − cosine between the student's and the teacher's
  mean-pooled sentence embeddings (last hidden state, as sentence-transformers' MiniLM
  pools), for encoders (``embed_cosine``);
- :class:`Regularizer`: a hook point, any ``fn(trainer, step) -> tensor | None``
  (e.g. a :class:`~slimformer.train.hooks.TrainHook`'s ``regularizer``).

Teacher terms without a teacher get the model as it was before the recipe's first stage
(the runner; see ``core/runner.py``). In a recipe, ``train: {loss: distill,
distill_weight: 0.5, distill_temperature: 2}`` still works (it becomes
``0.5·LanguageModelling + 0.5·Distillation(T=2)``); a list of terms spells any mix::

    train:
      loss: [{causal_lm: {weight: 0.5}}, {distill: {weight: 0.5, temperature: 2.0}},
             {distill_hidden: {weight: 1.0}}, {distill_attn: {weight: 0.5, layer_map: [0, 2, 4]}}]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimformer.errors import RecipeError, TrainingError
from slimformer.models.adapters import adapter_for


def causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target term, KL(teacher ‖ student) at ``temperature``, scaled by T² so
    its gradients keep their size as T changes."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1).flatten(0, 1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1).flatten(0, 1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Mean squared error; ``normalize``: divided by the teacher's mean square, so layers
    with large residual streams do not drown the others (0 = equal, 1 = as far as zero)."""
    err = (student.float() - teacher.float()).pow(2).mean()
    return err / teacher.float().pow(2).mean().clamp_min(1e-12) if normalize else err


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over real tokens (sentence-transformers' pooling for MiniLM)."""
    if mask is None:
        return hidden.float().mean(1)
    mask = mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def embedding_cosine_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 − cos(mean-pooled student, mean-pooled teacher), averaged over sequences."""
    return (1 - F.cosine_similarity(mean_pool(student, mask), mean_pool(teacher, mask), dim=-1)).mean()


# -- one forward, with what the terms need captured --------------------------------------


@dataclass
class Captured:
    """One model's forward on one micro-batch."""

    logits: torch.Tensor | None = None
    last_hidden: torch.Tensor | None = None
    blocks: list[torch.Tensor] | None = None      # each block's output
    attention: list[torch.Tensor] | None = None   # each block's self-attention output


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def forward_capture(model: nn.Module, ids: torch.Tensor, *, blocks: bool = False, attention: bool = False) -> Captured:
    """``model`` on ``ids`` once; ``blocks``/``attention``: also record each block's output
    and each block's self-attention output (forward hooks on the blocks and on the
    adapter's attention output projection, removed afterwards)."""
    adapter = adapter_for(model)
    found_blocks: list[torch.Tensor] = []
    found_attn: list[torch.Tensor] = []
    handles = []
    if blocks or attention:
        for block in adapter.get_blocks(model):
            if blocks:
                handles.append(block.register_forward_hook(lambda m, a, out: found_blocks.append(_first(out))))
            if attention:
                # Looked up per forward: a stage may have swapped the projection (fake-quant).
                proj = block.get_submodule(adapter.attention_out[0])
                handles.append(proj.register_forward_hook(lambda m, a, out: found_attn.append(_first(out))))
    try:
        kwargs = {"use_cache": False} if adapter.is_decoder else {}
        out = model(input_ids=ids, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    logits = getattr(out, "logits", None)
    last = getattr(out, "last_hidden_state", None)
    return Captured(logits, last, found_blocks if blocks else None, found_attn if attention else None)


# -- the terms ------------------------------------------------------------------------


@dataclass
class LossTerm:
    """Base class: ``weight * self(trainer, ids, logits)`` is added to the loss.

    Class attributes say what the term needs, so the trainer runs each model once with
    just that captured: ``needs_logits`` (an LM head), ``needs_blocks`` / ``needs_attention``
    (the student's per-block outputs, in ``trainer.student``), ``uses_teacher`` (a
    ``teacher`` field, run through ``trainer.teacher_forward``)."""

    weight: float = 1.0

    name: str = dataclasses.field(default="term", init=False, repr=False)
    needs_logits: ClassVar[bool] = False
    needs_blocks: ClassVar[bool] = False
    needs_attention: ClassVar[bool] = False
    uses_teacher: ClassVar[bool] = False

    def __call__(self, trainer, ids: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor | None:
        raise NotImplementedError

    def check(self, student: nn.Module) -> None:
        """Refuse, in one line, a student (and teacher) this term cannot work with."""
        if self.needs_logits and not adapter_for(student).is_decoder:
            raise TrainingError(f"loss term {self.name} needs a language-model head; this model is an encoder "
                                "(use embed_cosine, distill_hidden or distill_attn)")
        teacher = getattr(self, "teacher", None)
        if teacher is None:
            return
        s, t = student.config, teacher.config
        if adapter_for(teacher).family != adapter_for(student).family:
            raise TrainingError(f"loss term {self.name}: the teacher is a {adapter_for(teacher).family} model, "
                                f"the student a {adapter_for(student).family} model")
        if self.needs_logits and s.vocab_size != t.vocab_size:
            raise TrainingError(f"loss term {self.name}: the teacher's vocabulary has {t.vocab_size} tokens, "
                                f"the student's {s.vocab_size}")
        if (self.needs_blocks or self.needs_attention or self.name == "embed_cosine") \
                and _hidden_size(s) != _hidden_size(t):
            raise TrainingError(f"loss term {self.name}: the teacher's hidden size is {_hidden_size(t)}, "
                                f"the student's {_hidden_size(s)}")

    def describe(self) -> dict:
        """JSON-friendly settings, saved with the training record."""
        return {"term": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                      if f.init and f.name != "teacher" and _plain(getattr(self, f.name))}}


def _hidden_size(config) -> int | None:
    return getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)


def _plain(value) -> bool:
    return value is None or isinstance(value, (int, float, str, bool)) or (
        isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value))


@dataclass
class LanguageModelling(LossTerm):
    """Next-token cross-entropy on the training ids."""

    name: str = dataclasses.field(default="causal_lm", init=False, repr=False)
    needs_logits: ClassVar[bool] = True

    def __call__(self, trainer, ids, logits):
        return causal_lm_loss(logits, ids)


@dataclass
class _TeacherTerm(LossTerm):
    """A term against a teacher model (None: the runner supplies the model as it was
    before the recipe's first stage)."""

    teacher: nn.Module | None = dataclasses.field(default=None, repr=False)
    uses_teacher: ClassVar[bool] = True

    def teacher_out(self, trainer, ids) -> Captured:
        if self.teacher is None:
            raise TrainingError(f"the {self.name} loss needs a teacher model")
        return trainer.teacher_forward(self.teacher, ids)


@dataclass
class Distillation(_TeacherTerm):
    """KL(teacher ‖ student) at ``temperature``, scaled by T²."""

    temperature: float = 2.0

    name: str = dataclasses.field(default="distill", init=False, repr=False)
    needs_logits: ClassVar[bool] = True

    def __post_init__(self):
        if not self.temperature > 0:
            raise RecipeError(f"train: distillation temperature must be positive, got {self.temperature!r}")

    def __call__(self, trainer, ids, logits):
        return distillation_loss(logits, self.teacher_out(trainer, ids).logits, self.temperature)


@dataclass
class _LayerTerm(_TeacherTerm):
    """Per-block terms: student block i against teacher block ``layer_map[i]`` (default:
    the student's ``config.slimformer_layer_map`` from DropLayers, else the identity when
    both have as many blocks)."""

    normalize: bool = True
    layer_map: list[int] | str | None = None   # or "uniform": student block i ↔ teacher (i+1)·N/M − 1

    def __post_init__(self):
        if self.layer_map == "uniform":
            return
        if self.layer_map is not None:
            if not isinstance(self.layer_map, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layer_map):
                raise RecipeError(f"train: loss term {self.name}: layer_map must be uniform or a list of teacher block numbers, "
                                  f"got {self.layer_map!r}")
            self.layer_map = list(self.layer_map)

    def resolved_map(self, student: nn.Module) -> list[int]:
        n_student = len(adapter_for(student).get_blocks(student))
        n_teacher = len(adapter_for(self.teacher).get_blocks(self.teacher))
        found = self.layer_map if self.layer_map is not None else getattr(student.config, "slimformer_layer_map", None)
        if found == "uniform":   # TinyBERT's mapping: the last student block learns the teacher's last
            found = [(i + 1) * n_teacher // n_student - 1 for i in range(n_student)]
        if found is None:
            if n_student != n_teacher:
                raise TrainingError(f"loss term {self.name}: the student has {n_student} blocks, the teacher "
                                    f"{n_teacher}; give layer_map (teacher block per student block) or drop "
                                    "layers with DropLayers, which records it")
            found = list(range(n_student))
        found = list(found)
        if len(found) != n_student or any(i >= n_teacher for i in found):
            raise TrainingError(f"loss term {self.name}: layer_map {found} does not fit a student of {n_student} "
                                f"blocks and a teacher of {n_teacher}")
        return found

    def check(self, student):
        super().check(student)
        if self.teacher is not None:
            self.resolved_map(student)

    def _layers(self, trainer, ids, what: str):
        student = getattr(trainer.student, what)
        teacher = getattr(self.teacher_out(trainer, ids), what)
        mapping = self.resolved_map(trainer.model)
        total = sum(hidden_mse(student[i], teacher[j], self.normalize) for i, j in enumerate(mapping))
        return total / len(mapping)


@dataclass
class HiddenDistillation(_LayerTerm):
    """Mean over student blocks of the (normalised) MSE between block outputs."""

    name: str = dataclasses.field(default="distill_hidden", init=False, repr=False)
    needs_blocks: ClassVar[bool] = True

    def __call__(self, trainer, ids, logits):
        return self._layers(trainer, ids, "blocks")


@dataclass
class AttentionDistillation(_LayerTerm):
    """Mean over student blocks of the (normalised) MSE between self-attention outputs."""

    name: str = dataclasses.field(default="distill_attn", init=False, repr=False)
    needs_attention: ClassVar[bool] = True

    def __call__(self, trainer, ids, logits):
        return self._layers(trainer, ids, "attention")


@dataclass
class EmbeddingCosine(_TeacherTerm):
    """1 − cosine between mean-pooled last hidden states (sentence embeddings): trains an
    encoder without an LM head. The training windows have no padding, so every position
    is pooled."""

    name: str = dataclasses.field(default="embed_cosine", init=False, repr=False)

    def check(self, student):
        super().check(student)
        if adapter_for(student).is_decoder:
            raise TrainingError("loss term embed_cosine compares sentence embeddings of an encoder; "
                                "this model is a decoder (use distill or distill_hidden)")

    def __call__(self, trainer, ids, logits):
        return embedding_cosine_loss(trainer.student.last_hidden, self.teacher_out(trainer, ids).last_hidden)


@dataclass
class Regularizer(LossTerm):
    """The hook point for extra terms: ``fn(trainer, step)`` returns a tensor or None
    (None adds nothing)."""

    fn: Callable[[Any, int], torch.Tensor | None] | None = dataclasses.field(default=None, repr=False)

    name: str = dataclasses.field(default="regularizer", init=False, repr=False)

    def __call__(self, trainer, ids, logits):
        return None if self.fn is None else self.fn(trainer, trainer.step)


# Names a recipe's ``train: loss:`` may use.
TERMS: dict[str, type[LossTerm]] = {"causal_lm": LanguageModelling, "distill": Distillation,
                                    "distill_hidden": HiddenDistillation, "distill_attn": AttentionDistillation,
                                    "embed_cosine": EmbeddingCosine}


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
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "teacher"}
    for key, value in args.items():
        if key not in fields:
            raise RecipeError(f"train: loss term {name}: unknown setting '{key}' (accepted: {', '.join(fields)})")
        default = fields[key].default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise RecipeError(f"train: loss term {name}: {key} must be true or false, got {value!r}")
            continue
        if key == "layer_map":
            continue   # a list or "uniform", checked by the term
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
    """``terms`` with ``teacher`` given to every teacher term that has none."""
    return [dataclasses.replace(t, teacher=teacher) if t.uses_teacher and t.teacher is None else t
            for t in terms]


def needs_teacher(terms: list[LossTerm]) -> bool:
    return any(t.uses_teacher and t.teacher is None for t in terms)
