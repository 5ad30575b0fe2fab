"""Runs a recipe over a model: ``run_recipe`` takes the stages in recipe order, one-shot
stages block by block (``run_transforms``) and training stages through ``train/``.

One-shot stages, block by block: without calibration data each Transform converts each block in turn. With it, the
inputs of the first block are captured once, then for every block and every
Transform in recipe order: prepare → forward the calibration inputs through the
block (observers record) → convert; finally the block's outputs, computed by the
already-compressed block, become the next block's inputs. Only one block's
activations are held at a time.

Before the blocks, every Transform may analyse the whole model (``plan_model``, e.g.
HAWQ's sensitivities) and leave decisions in a plan all stages share. A "one-pass"
Transform (GPTQ) compresses each layer inside the calibration forward, as the whole
calibration batch reaches it; that forward's outputs then feed the next block.
Weights and calibration activations are checked for NaN/Inf, naming the layer.

Training stages: consecutive training stages share one training run (one Trainer: their
``training_hook``s side by side, their ``loss_terms`` added to the recipe's). One-shot
stages before them run first, those after them on the trained model.
"""

from __future__ import annotations

import copy
import hashlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from slimformer.core.transform import BlockContext, Needs, Transform
from slimformer.errors import DataError, QuantConfigError, RecipeError
from slimformer.models.adapters import adapter_for
from slimformer.nn.base import CompressedModule
from slimformer.errors import TrainingError
from slimformer.train.loop import TokenBatches, TrainConfig, Trainer, TrainResult, frozen_parameters
from slimformer.train.losses import LossTerm, needs_teacher, with_teacher


@dataclass
class RunResult:
    seconds: float
    fallbacks: list[str] = field(default_factory=list)
    layers: dict[str, dict] = field(default_factory=dict)   # per-layer facts the techniques reported
    training: TrainResult | None = None    # the training run, when the recipe has training stages


@dataclass
class TrainingRun:
    """How ``run_recipe`` runs a recipe's training stages.

    ``terms``: the loss (default: the terms ``config.loss`` names); the stages' own terms
    are added. A distillation term without a teacher gets ``teacher``, else a copy of the
    model taken before the recipe's first stage."""

    config: TrainConfig
    batches: TokenBatches
    teacher: nn.Module | None = None
    terms: list[LossTerm] | None = None
    checkpoint_dir: Path | None = None
    fingerprint: dict | None = None
    resume: bool = False


class _StopForward(Exception):
    pass


class _InputCatcher(nn.Module):
    """Stands in for block 0 to record what the model feeds it, then stops the forward."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.hidden: list[torch.Tensor] = []
        self.kwargs: dict | None = None

    def forward(self, hidden_states, *args, **kwargs):
        self.hidden.append(hidden_states.detach())
        if self.kwargs is None:
            # Same length, no padding: masks and position tensors are the same for every batch.
            self.kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
            self.kwargs["use_cache"] = False
        raise _StopForward


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.inference_mode()
def capture_block_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], dict]:
    adapter = adapter_for(model)
    blocks = adapter.get_blocks(model)
    catcher = _InputCatcher(blocks[0])
    blocks[0] = catcher
    try:
        for start in range(0, calib.shape[0], batch_size):
            try:
                model(input_ids=calib[start:start + batch_size], use_cache=False)
            except _StopForward:
                pass
    finally:
        blocks[0] = catcher.block
    return catcher.hidden, catcher.kwargs or {}


@torch.inference_mode()
def _forward_block(block: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    return [_block_output(block(h, **kwargs)) for h in inputs]


def _one_batch_kwargs(kwargs: dict) -> dict:
    """The captured keyword inputs, made valid for all calibration sequences as one batch:
    per-sequence tensors (e.g. OPT's position ids) are identical rows (same length, no
    padding), so one row broadcasts."""
    def squeeze(value):
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] > 1 and bool((value == value[:1]).all()):
            return value[:1]
        if isinstance(value, tuple):
            return tuple(squeeze(v) for v in value)
        return value

    return {k: squeeze(v) for k, v in kwargs.items()}


@torch.inference_mode()
def _forward_one_batch(block: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    sizes = [h.shape[0] for h in inputs]
    out = _block_output(block(torch.cat(inputs), **_one_batch_kwargs(kwargs)))
    return list(out.split(sizes))


def _check_finite_weights(block: nn.Module, adapter, prefix: str) -> None:
    for name in adapter.linears:
        weight = getattr(block.get_submodule(name), "weight", None)
        if torch.is_tensor(weight) and not torch.isfinite(weight).all():
            raise QuantConfigError(f"{prefix}.{name}: the weight contains NaN or Inf")


def _watch_finite_inputs(block: nn.Module, ctx: BlockContext) -> list:
    """Pre-hooks that stop calibration at the first projection fed NaN or Inf, naming it
    (a sum is one cheap pass; it is non-finite if any element is)."""
    def check(name):
        def hook(_module, args):
            if not torch.isfinite(args[0].detach().sum()):
                raise DataError(f"{ctx.prefix}.{name}: the calibration activations reaching it contain NaN or Inf")
        return hook

    return [block.get_submodule(n).register_forward_pre_hook(check(n)) for n in ctx.adapter.linears]


def run_transforms(
    model: nn.Module,
    transforms: list[Transform],
    calib: torch.Tensor | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> RunResult:
    """Apply ``transforms`` in order to every block of ``model``.

    ``calib``: ``[n, seqlen]`` token ids, required when any Transform needs calibration.
    """
    start = time.perf_counter()
    adapter = adapter_for(model)
    blocks = adapter.get_blocks(model)
    needs_data = any(t.requires() is Needs.CALIBRATION for t in transforms)
    if any(t.requires() is Needs.TRAINING for t in transforms):
        raise NotImplementedError("training Transforms run through the training loop, not run_transforms")
    if needs_data and (calib is None or calib.numel() == 0):
        raise DataError("this recipe needs calibration data (--calib)")

    plan: dict = {}
    for transform in transforms:
        transform.plan_model(model, adapter, calib if needs_data else None, plan)
    inputs, kwargs = capture_block_inputs(model, calib, batch_size) if needs_data else ([], {})
    fallbacks: list[str] = []
    layer_report: dict[str, dict] = {}
    states: dict[int, dict] = {id(t): {} for t in transforms}
    # leave=False: a failure mid-way prints only the error, not a stale bar.
    with tqdm(total=len(blocks), desc="compressing", unit="block", disable=not progress, leave=False) as bar:
        for index, block in enumerate(blocks):
            prefix = f"{adapter.blocks}.{index}"
            _check_finite_weights(block, adapter, prefix)
            outputs = None   # the compressed block's outputs, when the last stage's one-pass forward made them
            for transform in transforms:
                ctx = BlockContext(model, adapter, index, prefix, states[id(transform)], fallbacks, plan, layer_report)
                if transform.keeps_block_outputs and transform.requires() is not Needs.CALIBRATION:
                    transform.convert(block, ctx)
                    continue
                outputs = None
                if transform.requires() is Needs.CALIBRATION:
                    watchers = _watch_finite_inputs(block, ctx)
                    try:
                        transform.prepare(block, ctx)
                        if transform.one_pass():
                            outputs = _forward_one_batch(block, inputs, kwargs)
                        else:
                            _forward_block(block, inputs, kwargs)
                    finally:
                        for handle in watchers:
                            handle.remove()
                transform.convert(block, ctx)
            if needs_data and index + 1 < len(blocks):
                inputs = outputs if outputs is not None else _forward_block(block, inputs, kwargs)
            bar.update()
    for transform in transforms:
        transform.finish(model, adapter)
    return RunResult(time.perf_counter() - start, fallbacks, layer_report)


def recipe_segments(stages: list[Transform]) -> list[tuple[bool, list[Transform]]]:
    """``stages`` cut into runs of one-shot stages and runs of training stages, in order:
    ``[(trains, [stage, ...]), ...]``. A recipe has at most one run of training stages."""
    segments: list[tuple[bool, list[Transform]]] = []
    for stage in stages:
        trains = stage.requires() is Needs.TRAINING
        if segments and segments[-1][0] == trains:
            segments[-1][1].append(stage)
        else:
            segments.append((trains, [stage]))
    if sum(trains for trains, _ in segments) > 1:
        raise RecipeError("the training stages of a recipe must be consecutive (they share one training run)")
    return segments


def run_recipe(
    model: nn.Module,
    stages: list[Transform],
    *,
    calib: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    train: TrainingRun | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> RunResult:
    """Run ``stages`` on ``model`` in recipe order: one-shot stages block by block
    (:func:`run_transforms`), consecutive training stages as one training run.

    ``calib``: ``[n, seqlen]`` token ids, or a function giving them (called once, only if
    a one-shot stage needs calibration). ``train``: required when a stage trains.
    """
    start = time.perf_counter()
    segments = recipe_segments(list(stages))
    training = [s for trains, group in segments if trains for s in group]
    if training and train is None:
        raise RecipeError(f"stage {type(training[0]).__name__} trains: run the recipe with training settings "
                          "(`slimformer train`)")
    adapter = adapter_for(model)
    terms: list[LossTerm] = []
    shared: dict = {}   # tensors the teacher shares with the student, checked unchanged at the end
    if training:
        terms = list(train.config.loss_terms() if train.terms is None else train.terms)
        if needs_teacher(terms):
            # the model as it is now, before any stage, teaches
            if train.teacher is not None:
                teacher = train.teacher
            else:
                teacher, shared = shared_teacher(model, stages, train.config.freeze)
            terms = with_teacher(terms, teacher)
    calib_ids = None

    def calibration():
        nonlocal calib_ids
        if calib_ids is None:
            calib_ids = calib() if callable(calib) else calib
        return calib_ids

    result = RunResult(0.0)
    for trains, group in segments:
        if trains:
            check_shared(shared)   # the one-shot stages before training left the teacher's tensors alone
            result.training = _train(model, adapter, group, train, terms, progress)
            continue
        needs_data = any(t.requires() is Needs.CALIBRATION for t in group)
        run = run_transforms(model, group, calibration() if needs_data else None, batch_size=batch_size,
                             progress=progress)
        result.fallbacks.extend(run.fallbacks)
        for layer, facts in run.layers.items():
            result.layers.setdefault(layer, {}).update(facts)
    check_shared(shared)
    for line in runtime_fallbacks(model):
        if line not in result.fallbacks:
            result.fallbacks.append(line)
    result.seconds = time.perf_counter() - start
    return result


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
    return hashlib.sha1(data.tobytes()).hexdigest()


def shared_teacher(model: nn.Module, stages: list[Transform], freeze) -> tuple[nn.Module, dict]:
    """A frozen copy of ``model`` to teach it, sharing (not copying) every parameter that
    training freezes (``freeze``, see ``TrainConfig``) and that no stage's targets select:
    those the student neither trains nor changes, so the teacher costs memory only where
    it differs. Returns the teacher and ``{name: (tensor, digest)}`` of what it shares,
    for :func:`check_shared`."""
    adapter = adapter_for(model)
    targeted: set[int] = set()
    for index, block in enumerate(adapter.get_blocks(model)):
        for stage in stages:
            for name in stage.targets.select(adapter.linears, index):
                targeted.update(id(p) for p in block.get_submodule(name).parameters())
    frozen = {id(p) for p in frozen_parameters(model, freeze)} - targeted
    shared = {name: p for name, p in model.named_parameters() if id(p) in frozen}
    memo = {id(p): p for p in shared.values()}
    teacher = copy.deepcopy(model, memo).eval()
    for p in teacher.parameters():
        if id(p) not in memo:
            p.requires_grad_(False)
    return teacher, {name: (p, _digest(p)) for name, p in shared.items()}


def check_shared(shared: dict) -> None:
    """Fail if a stage changed a tensor the teacher shares with the student (the teacher
    would then no longer be the model before the recipe)."""
    for name, (tensor, digest) in shared.items():
        if _digest(tensor) != digest:
            raise TrainingError(f"{name}: a stage changed this tensor, which the teacher shares with the student "
                                "because training freezes it; do not freeze it")


def runtime_fallbacks(model: nn.Module) -> list[str]:
    """``"layer: reason"`` for every compressed module that will run a slower path than its
    format asked for (no kernel for it, kernels unavailable); one warning per reason names
    how many layers and the first of them. Recorded in the result, ``slimformer.json`` and
    the report."""
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, CompressedModule):
            reason = module.runtime_fallback()
            if reason:
                found.setdefault(reason, []).append(name)
    for reason, names in found.items():
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        warnings.warn(f"{names[0]}{more}: {reason}", RuntimeWarning, stacklevel=3)
    return [f"{name}: {reason}" for reason, names in found.items() for name in names]


def _train(model, adapter, stages, run: TrainingRun, terms, progress) -> TrainResult:
    teacher = next((t.teacher for t in terms if getattr(t, "teacher", None) is not None), run.teacher)
    model.requires_grad_(True)
    try:
        hooks = [stage.training_hook(model, adapter, run.config) for stage in stages]
        stage_terms = [term for stage in stages for term in stage.loss_terms(model, adapter, run.config)]
        trainer = Trainer(model, run.config, run.batches, hooks=hooks, teacher=teacher,
                          terms=terms + stage_terms, checkpoint_dir=run.checkpoint_dir,
                          fingerprint=run.fingerprint, progress=progress)
        return trainer.run(resume=run.resume)
    finally:
        model.requires_grad_(False)


def recipe_summary(model: nn.Module, stages: list[Transform]) -> dict:
    """What the stages report about the result (``Transform.summary``), the first stage's
    value for each key (e.g. ``sparsity``)."""
    adapter = adapter_for(model)
    found: dict = {}
    for stage in stages:
        for key, value in (stage.summary(model, adapter) or {}).items():
            found.setdefault(key, value)
    return found
