"""Loss terms: the recipe's ``loss`` setting parsed into terms, and their weighted sum."""

import pytest
import torch

from slimformer.errors import RecipeError, TrainingError
from slimformer.models.tiny import tiny_model
from slimformer.train import TokenBatches, TrainConfig, Trainer
from slimformer.train.losses import (
    Distillation,
    LanguageModelling,
    Regularizer,
    causal_lm_loss,
    distillation_loss,
    parse_terms,
)


def test_distill_shorthand_is_the_two_terms():
    terms = TrainConfig(loss="distill", distill_weight=0.3, distill_temperature=4.0).loss_terms()
    assert [type(t) for t in terms] == [LanguageModelling, Distillation]
    assert terms[0].weight == pytest.approx(0.7) and terms[1].weight == 0.3 and terms[1].temperature == 4.0
    assert [type(t) for t in TrainConfig().loss_terms()] == [LanguageModelling]


def test_a_list_of_terms_in_the_recipe():
    config = TrainConfig.parse({"loss": [{"causal_lm": {"weight": 0.5}}, {"distill": {"weight": "5e-1", "temperature": 3}}]})
    terms = config.loss_terms()
    assert [(t.name, t.weight) for t in terms] == [("causal_lm", 0.5), ("distill", 0.5)]
    assert terms[1].temperature == 3.0


@pytest.mark.parametrize("loss,fragment", [("mse", "loss must be"), ([{"mse": {}}], "unknown loss term"),
                                           ([{"distill": {"tau": 1}}], "unknown setting 'tau'"),
                                           ([{"distill": {"temperature": 0}}], "temperature must be positive"),
                                           ([{"causal_lm": {"weight": "a"}}], "must be a number")])
def test_bad_loss_settings(loss, fragment):
    with pytest.raises(RecipeError, match=fragment):
        TrainConfig.parse({"loss": loss})


def test_the_loss_is_the_weighted_sum_of_the_terms():
    torch.manual_seed(0)
    model, teacher = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    ids = torch.randint(0, model.config.vocab_size, (4, 32))
    config = TrainConfig(steps=1, batch_size=2, seq_len=32)
    extra = torch.tensor(0.25)
    trainer = Trainer(model, config, TokenBatches(ids, 2, 32), teacher=teacher, progress=False,
                      terms=[LanguageModelling(weight=0.5), Distillation(weight=2.0, temperature=3.0),
                             Regularizer(fn=lambda trainer, step: extra)])
    with torch.no_grad():
        got = trainer.loss_on(ids[:2])
        logits, teacher_logits = model(input_ids=ids[:2]).logits, teacher(input_ids=ids[:2]).logits
        want = 0.5 * causal_lm_loss(logits, ids[:2]) + 2.0 * distillation_loss(logits, teacher_logits, 3.0) + extra
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_distillation_without_a_teacher_is_refused():
    ids = torch.randint(0, 100, (4, 32))
    with pytest.raises(TrainingError, match="teacher"):
        Trainer(tiny_model("llama"), TrainConfig(loss="distill"), TokenBatches(ids, 2, 32), progress=False)
    assert parse_terms("causal_lm")[0].describe() == {"term": "causal_lm", "weight": 1.0}
