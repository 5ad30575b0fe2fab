"""A small training loop for short CPU fine-tuning, shared by the sparsity methods
(and later QAT and distillation).

A loss made of terms (``train/losses.py``: language modelling, distillation,
regularisers), gradient accumulation, AdamW, warm-up then constant,
linear or cosine decay, gradient clipping, checkpoints (safetensors) every
``save_every`` steps with exact resume, and a progress bar showing the loss. The
techniques plug in as :class:`~slimformer.train.hooks.TrainHook`s.

The LR schedule is read at ``schedule_step``, a counter that normally equals the step
but that a hook may move back (learning-rate rewinding) or pin (``constant_lr``,
fine-tuning at the final learning rate).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm.auto import tqdm

from slimformer.errors import RecipeError, TrainingError
from slimformer.train.hooks import TrainHook
from slimformer.models.adapters import adapter_for
from slimformer.train.losses import (  # noqa: F401  (causal_lm_loss, distillation_loss: re-exported)
    Captured,
    LossTerm,
    Regularizer,
    causal_lm_loss,
    distillation_loss,
    forward_capture,
    needs_teacher,
    parse_terms,
    with_teacher,
)
from slimformer.util.atomic import atomic_directory

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class TrainConfig:
    """How to train; a recipe's ``train:`` mapping and the CLI's flags fill it."""

    steps: int = 100
    batch_size: int = 4              # sequences per micro-batch
    seq_len: int = 512
    grad_accum: int = 1              # micro-batches per optimiser step
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    min_lr_ratio: float = 0.1        # the decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    loss: Literal["causal_lm", "distill"] | list = "causal_lm"   # or a list of terms: see train/losses.py
    distill_temperature: float = 2.0
    distill_weight: float = 0.5      # share of the distillation term; the rest is cross-entropy
    save_every: int = 0              # 0: only the final model
    keep_checkpoints: int = 2
    seed: int = 0
    # Parameters that do not train: keywords embeddings, lm_head, norms, or regular
    # expressions matched against parameter names. The teacher shares them (no copy).
    freeze: list = dataclasses.field(default_factory=list)
    # More passes over the data than this is refused (too little data for the steps);
    # more than one pass is a warning, recorded with the result. The default only
    # catches a mistake (a short file): small-model runs legitimately repeat data ~10 times.
    max_epochs: float = 100.0

    def __post_init__(self):
        positive = ("steps", "batch_size", "seq_len", "grad_accum", "keep_checkpoints")
        for key in positive:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RecipeError(f"train: {key} must be a positive integer, got {value!r}")
        for key in ("warmup_steps", "save_every", "seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RecipeError(f"train: {key} must be a non-negative integer, got {value!r}")
        if not self.lr > 0:
            raise RecipeError(f"train: lr must be positive, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise RecipeError(f"train: min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not 0 <= self.distill_weight <= 1:
            raise RecipeError(f"train: distill_weight must be in [0, 1], got {self.distill_weight!r}")
        if isinstance(self.freeze, str):
            self.freeze = [self.freeze]
        if not isinstance(self.freeze, (list, tuple)) or not all(isinstance(f, str) for f in self.freeze):
            raise RecipeError(f"train: freeze must be a list of names (embeddings, lm_head, norms) or patterns, "
                              f"got {self.freeze!r}")
        self.freeze = list(self.freeze)
        if isinstance(self.max_epochs, bool) or not isinstance(self.max_epochs, (int, float)) or not self.max_epochs > 0:
            raise RecipeError(f"train: max_epochs must be a positive number, got {self.max_epochs!r}")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise RecipeError(f"train: schedule must be constant, linear or cosine, got {self.schedule!r}")
        self.loss_terms()   # validates ``loss``

    def loss_terms(self) -> list[LossTerm]:
        """The terms ``loss`` names (``distill`` uses ``distill_weight`` and ``distill_temperature``)."""
        return parse_terms(self.loss, distill_weight=self.distill_weight, distill_temperature=self.distill_temperature)

    @classmethod
    def parse(cls, mapping, **overrides) -> "TrainConfig":
        """From a recipe's ``train:`` mapping, with CLI ``overrides`` (None = not given)."""
        mapping = dict(mapping or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(mapping) - names
        if unknown:
            raise RecipeError(f"train: unknown key '{sorted(unknown)[0]}' (accepted: {', '.join(sorted(names))})")
        mapping.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("lr", "min_lr_ratio", "weight_decay", "max_grad_norm", "distill_temperature", "distill_weight",
                    "max_epochs"):
            value = mapping.get(key)
            if isinstance(value, str):   # PyYAML reads 1e-4 (no dot) as a string
                try:
                    mapping[key] = float(value)
                except ValueError:
                    raise RecipeError(f"train: {key} must be a number, got {value!r}") from None
            elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise RecipeError(f"train: {key} must be a number, got {value!r}")
        return cls(**mapping)

    def lr_at(self, schedule_step: int) -> float:
        """The learning rate the schedule gives at ``schedule_step``."""
        if self.warmup_steps and schedule_step < self.warmup_steps:
            return self.lr * (schedule_step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (schedule_step - self.warmup_steps) / span)
        floor = self.lr * self.min_lr_ratio
        if self.schedule == "linear":
            return floor + (self.lr - floor) * (1 - progress)
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class TokenBatches:
    """Micro-batches of ``[batch_size, seq_len]`` windows cut from one token stream.

    The windows are shuffled once per epoch with a generator seeded by (seed, epoch), so
    the batch of any step is a pure function of the step: resuming needs no data state."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0,
                 wrap: tuple[int, int] | None = None):
        """``wrap``: ``(first, last)`` token ids put around every window (an encoder's
        [CLS] and [SEP]), the window then holding ``seq_len - 2`` text tokens."""
        tokens = tokens.flatten()
        inner = seq_len - 2 if wrap is not None else seq_len
        if inner < 1:
            raise TrainingError(f"seq_len {seq_len} leaves no room for text between {wrap}")
        self.windows = tokens[: tokens.numel() // inner * inner].view(-1, inner)
        if wrap is not None:
            n = self.windows.shape[0]
            self.windows = torch.cat([torch.full((n, 1), wrap[0], dtype=tokens.dtype), self.windows,
                                      torch.full((n, 1), wrap[1], dtype=tokens.dtype)], dim=1)
        if self.windows.shape[0] < batch_size:
            raise TrainingError(
                f"training data has {tokens.numel()} tokens: {self.windows.shape[0]} windows of {seq_len}, "
                f"fewer than one batch of {batch_size}"
            )
        self.batch_size, self.seed = batch_size, seed
        self.per_epoch = self.windows.shape[0] // batch_size

    def __call__(self, index: int) -> torch.Tensor:
        """The ``index``-th micro-batch of the run."""
        epoch, position = divmod(index, self.per_epoch)
        order = torch.randperm(self.windows.shape[0], generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return self.windows[order[position * self.batch_size:(position + 1) * self.batch_size]]


def run_fingerprint(model: nn.Module, recipe_text: str, source: str) -> dict:
    """What a checkpoint must match to be resumed: the model's architecture and the recipe."""
    digest = lambda text: hashlib.sha256(text.encode()).hexdigest()[:16]  # noqa: E731
    return {"source": source, "config": digest(model.config.to_json_string(use_diff=False)),
            "recipe": digest(recipe_text)}


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict]          # one entry per step: step, loss, lr, and the hooks' metrics
    resumed_from: int | None = None
    memory: dict | None = None   # bytes: student, teacher (only what it does not share), gradients, optimiser
    warnings: list[str] = dataclasses.field(default_factory=list)
    epochs: float | None = None  # passes over the training data


FREEZE_KEYWORDS = ("embeddings", "lm_head", "norms")


def frozen_parameters(model: nn.Module, patterns) -> list[nn.Parameter]:
    """The parameters ``patterns`` name (see ``TrainConfig.freeze``), each once."""
    adapter = adapter_for(model)
    found: dict[int, nn.Parameter] = {}
    for pattern in patterns:
        matched = []
        if pattern in FREEZE_KEYWORDS:
            if pattern == "norms":
                modules = [m for m in model.modules() if "norm" in type(m).__name__.lower()]
            else:
                path = adapter.embed_tokens if pattern == "embeddings" else adapter.lm_head
                if pattern == "embeddings" and path is None and hasattr(model, "embeddings"):
                    path = "embeddings"   # BERT: word, position and type embeddings
                if path is None:
                    raise RecipeError(f"train: freeze {pattern}: a {adapter.family} model has none")
                modules = [model.get_submodule(path)]
            matched = [p for m in modules for p in m.parameters()]
        else:
            try:
                regex = re.compile(pattern)
            except re.error as exc:
                raise RecipeError(f"train: freeze: invalid pattern {pattern!r}: {exc}") from None
            matched = [p for name, p in model.named_parameters(remove_duplicate=False) if regex.fullmatch(name)]
        if not matched:
            raise RecipeError(f"train: freeze {pattern!r} matches no parameter of this model")
        found.update((id(p), p) for p in matched)
    return list(found.values())


def _storages(tensors) -> dict[int, int]:
    """data pointer → bytes of each distinct storage among ``tensors``."""
    out = {}
    for t in tensors:
        if t is not None and t.numel():
            storage = t.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out


def training_memory(model: nn.Module, teachers, optimizer, params) -> dict:
    """Bytes held for training, counted by distinct storage: the student's parameters and
    buffers, what the teachers hold that the student does not (shared tensors count
    once), a gradient per trained parameter, and the optimiser state."""
    student = _storages([*model.parameters(), *model.buffers()])
    teacher_all: dict[int, int] = {}
    for teacher in teachers:
        teacher_all.update(_storages([*teacher.parameters(), *teacher.buffers()]))
    teacher_only = {k: v for k, v in teacher_all.items() if k not in student}
    optim = _storages([v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)])
    grads = sum(p.numel() * p.element_size() for p in params)
    memory = {"student": sum(student.values()), "teacher_total": sum(teacher_all.values()),
              "teacher_only": sum(teacher_only.values()),
              "shared_with_teacher": sum(v for k, v in teacher_all.items() if k in student),
              "gradients": grads, "optimizer": sum(optim.values())}
    memory["total"] = memory["student"] + memory["teacher_only"] + grads + memory["optimizer"]
    return memory


class Trainer:
    """Trains ``model`` in place for ``config.steps`` optimiser steps."""

    def __init__(self, model: nn.Module, config: TrainConfig, batches: TokenBatches, *,
                 hooks: list[TrainHook] = (), teacher: nn.Module | None = None,
                 terms: list[LossTerm] | None = None,
                 checkpoint_dir: Path | None = None, fingerprint: dict | None = None, progress: bool = True):
        """``terms``: the loss (default: the terms ``config.loss`` names); ``teacher`` goes to
        every distillation term without one. Each hook's ``regularizer`` is added as a
        :class:`~slimformer.train.losses.Regularizer` term."""
        terms = with_teacher(config.loss_terms() if terms is None else list(terms), teacher)
        if needs_teacher(terms):
            raise TrainingError("the distillation loss needs a teacher model")
        for term in terms:
            term.check(model)
        self.warnings: list[str] = []
        per_epoch = getattr(batches, "per_epoch", None)   # micro-batches in one pass over the data
        self.epochs = None if per_epoch is None else config.steps * config.grad_accum / per_epoch
        if self.epochs is not None and self.epochs > config.max_epochs:
            raise TrainingError(f"too little training data for {config.steps} steps: {config.steps * config.grad_accum} "
                                f"micro-batches of {config.batch_size} would pass over its {per_epoch} batches "
                                f"{self.epochs:.1f} times (max_epochs {config.max_epochs:g}); "
                                "give more data or fewer steps")
        if self.epochs is not None and self.epochs > 1:
            self.warn(f"the run repeats the training data: {self.epochs:.2f} epochs of {per_epoch} batches")
        for param in frozen_parameters(model, config.freeze):
            param.requires_grad_(False)
        self.model, self.config, self.batches = model, config, batches
        self.hooks, self.teacher = list(hooks), teacher
        self.terms = terms + [Regularizer(fn=hook.regularizer) for hook in self.hooks
                              if type(hook).regularizer is not TrainHook.regularizer]
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.fingerprint = fingerprint or {}
        self.progress = progress
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        # What each forward must capture: the student once for every term, each teacher
        # once for all the terms that use it.
        self.capture = {"blocks": any(t.needs_blocks for t in self.terms),
                        "attention": any(t.needs_attention for t in self.terms)}
        self.teachers: dict[int, tuple[nn.Module, dict]] = {}
        for term in self.terms:
            if term.uses_teacher:
                _, wants = self.teachers.setdefault(id(term.teacher), (term.teacher, {"blocks": False, "attention": False}))
                wants["blocks"] |= term.needs_blocks
                wants["attention"] |= term.needs_attention
        self.student: Captured | None = None
        self._teacher_out: dict[int, Captured] = {}
        self.teacher_forwards = 0
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self.schedule_step = 0
        self.constant_lr: float | None = None   # set by a hook to train at a fixed rate
        self.history: list[dict] = []

    # -- the loop ---------------------------------------------------------------------

    def current_lr(self) -> float:
        return self.constant_lr if self.constant_lr is not None else self.config.lr_at(self.schedule_step)

    def warn(self, message: str) -> None:
        """A warning the user sees and the training record keeps."""
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        self.warnings.append(message)

    def teacher_forward(self, teacher: nn.Module, ids: torch.Tensor) -> Captured:
        """``teacher`` on the current micro-batch, without gradients, run once however many
        terms ask (cached until the next micro-batch)."""
        key = id(teacher)
        if key not in self._teacher_out:
            wants = self.teachers.get(key, (teacher, {}))[1]
            teacher.eval()
            with torch.no_grad():
                self._teacher_out[key] = forward_capture(teacher, ids, **wants)
            self.teacher_forwards += 1
        return self._teacher_out[key]

    def loss_on(self, ids: torch.Tensor) -> torch.Tensor:
        """The weighted sum of the loss terms on one micro-batch (the student's and each
        teacher's forward computed once)."""
        self._teacher_out = {}
        self.student = forward_capture(self.model, ids, **self.capture)
        logits = self.student.logits
        loss = None
        try:
            for term in self.terms:
                if term.weight == 0:
                    continue
                value = term(self, ids, logits)
                if value is None:
                    continue
                value = value if term.weight == 1 else term.weight * value
                loss = value if loss is None else loss + value
        finally:
            self._teacher_out = {}
            self.student = None
        if loss is None:
            raise TrainingError("the loss has no terms")
        return loss

    def memory(self) -> dict:
        """Training memory in bytes (see :func:`training_memory`)."""
        return training_memory(self.model, [t for t, _ in self.teachers.values()], self.optimizer,
                               self.params.values())

    def train_step(self) -> dict:
        cfg = self.config
        self.model.train()
        for hook in self.hooks:
            hook.before_forward(self, self.step)
        total = 0.0
        for micro in range(cfg.grad_accum):
            ids = self.batches(self.step * cfg.grad_accum + micro)
            loss = self.loss_on(ids)
            (loss / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
        for hook in self.hooks:
            hook.after_backward(self, self.step)
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params.values(), cfg.max_grad_norm)
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(total):
            raise TrainingError(f"the loss became {total} at step {self.step + 1}; lower the learning rate")
        # Count the step before the hooks see it: a hook that rewinds the schedule sets
        # where the *next* step reads it.
        self.step += 1
        self.schedule_step += 1
        for hook in self.hooks:
            hook.after_step(self, self.step - 1)
        record = {"step": self.step, "loss": total, "lr": lr}
        for hook in self.hooks:
            record.update(hook.metrics())
        return record

    def run(self, resume: bool = False) -> TrainResult:
        start = time.perf_counter()
        resumed_from = self.resume_latest() if resume else None
        for hook in self.hooks:
            hook.on_start(self)
        cfg = self.config
        with tqdm(total=cfg.steps, initial=self.step, desc="training", unit="step",
                  disable=not self.progress, leave=False) as bar:
            while self.step < cfg.steps:
                record = self.train_step()
                self.history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
                bar.update()
                if cfg.save_every and self.checkpoint_dir is not None and self.step % cfg.save_every == 0 \
                        and self.step < cfg.steps:
                    self.save_checkpoint()
        memory = self.memory()   # before on_end: the optimiser state is what training held
        for hook in self.hooks:
            hook.on_end(self)
        self.model.eval()
        return TrainResult(self.step, time.perf_counter() - start, self.history, resumed_from,
                           memory=memory, warnings=list(self.warnings), epochs=self.epochs)

    # -- checkpoints ------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """``checkpoint-<step>/`` in the checkpoint directory, written atomically; older
        ones beyond ``keep_checkpoints`` are removed."""
        target = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{self.step}"
        with atomic_directory(target, overwrite=True) as tmp:
            save_model(self.model, str(tmp / "model.safetensors"))
            save_file(self._optimizer_tensors(), str(tmp / "optimizer.safetensors"))
            hook_tensors = {f"{i}.{k}": v.contiguous() for i, h in enumerate(self.hooks) for k, v in h.state_dict().items()}
            save_file(hook_tensors, str(tmp / "hooks.safetensors"))
            state = {"step": self.step, "schedule_step": self.schedule_step, "constant_lr": self.constant_lr,
                     "fingerprint": self.fingerprint, "history": self.history,
                     "hooks": [h.extra_state() for h in self.hooks]}
            (tmp / "trainer.json").write_text(json.dumps(state, indent=1))
        for old in list_checkpoints(self.checkpoint_dir)[:-self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def _optimizer_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, param in self.params.items():
            for key, value in self.optimizer.state.get(param, {}).items():
                tensors[f"{name}/{key}"] = value.detach().contiguous()
        return tensors

    def resume_latest(self) -> int | None:
        """Restore the newest checkpoint, after checking it belongs to this model and recipe."""
        found = list_checkpoints(self.checkpoint_dir) if self.checkpoint_dir is not None else []
        if not found:
            return None
        path = found[-1]
        state = json.loads((path / "trainer.json").read_text())
        saved = state.get("fingerprint", {})
        for key, what in (("config", "model"), ("recipe", "recipe")):
            if saved.get(key) != self.fingerprint.get(key):
                raise TrainingError(f"checkpoint {path} was written for another {what} "
                                    f"({saved.get('source') if key == 'config' else 'recipe ' + str(saved.get(key))}); "
                                    "use another --out or --overwrite")
        try:   # load_model knows the tensors save_model dropped as shared (tied embeddings)
            load_model(self.model, str(path / "model.safetensors"))
        except RuntimeError as exc:
            raise TrainingError(f"checkpoint {path} does not fit this model: {str(exc).splitlines()[0]}") from None
        optim = load_file(str(path / "optimizer.safetensors"))
        for name, param in self.params.items():
            entries = {key.split("/", 1)[1]: value for key, value in optim.items() if key.split("/", 1)[0] == name}
            if entries:
                self.optimizer.state[param] = entries
        hook_tensors = load_file(str(path / "hooks.safetensors"))
        for i, hook in enumerate(self.hooks):
            hook.load_state_dict({k.split(".", 1)[1]: v for k, v in hook_tensors.items() if k.split(".", 1)[0] == str(i)})
            if i < len(state.get("hooks", [])):
                hook.load_extra_state(state["hooks"][i])
        self.step, self.schedule_step = state["step"], state["schedule_step"]
        self.constant_lr = state.get("constant_lr")
        self.history = state.get("history", [])
        return self.step


def list_checkpoints(directory: Path | None) -> list[Path]:
    """Checkpoint directories, oldest first."""
    if directory is None or not Path(directory).is_dir():
        return []
    found = [p for p in Path(directory).iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
