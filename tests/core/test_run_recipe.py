"""run_recipe: one-shot and training stages in recipe order, consecutive training stages in one run."""

from dataclasses import dataclass

import pytest
import torch

from slimformer.core.runner import TrainingRun, recipe_segments, run_recipe
from slimformer.core.transform import Needs, Transform
from slimformer.errors import RecipeError
from slimformer.models.tiny import tiny_model
from slimformer.train import TokenBatches, TrainConfig, TrainHook
from slimformer.train.losses import Distillation, Regularizer

EVENTS: list = []


@dataclass(frozen=True)
class OneShot(Transform):
    label: str = "a"

    def convert(self, block, ctx):
        if ctx.index == 0:
            EVENTS.append(("convert", self.label))


class _Hook(TrainHook):
    def __init__(self, label):
        self.label = label

    def on_start(self, trainer):
        EVENTS.append(("train", self.label, trainer.step, len(trainer.hooks)))


@dataclass(frozen=True)
class Trains(Transform):
    label: str = "t"
    needs = Needs.TRAINING

    def training_hook(self, model, adapter, config):
        EVENTS.append(("hook", self.label))
        return _Hook(self.label)

    def loss_terms(self, model, adapter, config):
        return [Regularizer(weight=0.0, fn=lambda trainer, step: torch.tensor(1.0))]


def _run(stages, **train):
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (8, 16))
    config = TrainConfig(steps=2, batch_size=2, seq_len=16, **train)
    return model, run_recipe(model, stages, train=TrainingRun(config, TokenBatches(ids, 2, 16)), progress=False)


def test_stages_run_in_recipe_order_and_training_stages_share_one_run():
    EVENTS.clear()
    model, result = _run([OneShot(label="before"), Trains(label="t1"), Trains(label="t2"), OneShot(label="after")])
    assert EVENTS == [("convert", "before"), ("hook", "t1"), ("hook", "t2"), ("train", "t1", 0, 2),
                      ("train", "t2", 0, 2), ("convert", "after")]
    assert result.training.steps == 2
    assert not any(p.requires_grad for p in model.parameters())


def test_training_stages_must_be_consecutive_and_need_training_settings():
    with pytest.raises(RecipeError, match="consecutive"):
        recipe_segments([Trains(), OneShot(), Trains()])
    with pytest.raises(RecipeError, match="trains"):
        run_recipe(tiny_model("llama"), [OneShot(), Trains()], progress=False)


def test_distillation_teacher_is_the_model_before_the_first_stage():
    seen = {}

    @dataclass(frozen=True)
    class Zero(Transform):
        def finish(self, model, adapter):
            with torch.no_grad():
                model.lm_head.weight.zero_()

        def convert(self, block, ctx):
            pass

    @dataclass(frozen=True)
    class Spy(Trains):
        def training_hook(self, model, adapter, config):
            hook = _Hook("spy")
            hook.on_start = lambda trainer: seen.update(teacher=[t for t in trainer.terms if isinstance(t, Distillation)][0].teacher)
            return hook

    _run([Zero(), Spy()], loss="distill")
    assert float(seen["teacher"].lm_head.weight.abs().sum()) > 0
