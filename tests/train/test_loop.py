"""The training loop: schedules, batches, losses, gradient accumulation, checkpoint and resume."""

import math

import pytest
import torch

from slimformer.data import load_text, tokenize
from slimformer.errors import RecipeError, TrainingError
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.train import TokenBatches, TrainConfig, Trainer, TrainHook
from slimformer.train.loop import distillation_loss, list_checkpoints, run_fingerprint


@pytest.fixture(scope="module")
def tokens():
    return tokenize(load_text("pydoc", role="calib"), tiny_tokenizer())


def _trainer(tokens, tmp_path=None, hooks=(), recipe="r", model=None, teacher=None, **cfg):
    cfg = TrainConfig(**{"steps": 6, "batch_size": 2, "seq_len": 32, "lr": 3e-3, **cfg})
    model = model or tiny_model("llama")
    model.requires_grad_(True)
    return Trainer(model, cfg, TokenBatches(tokens, cfg.batch_size, cfg.seq_len, cfg.seed), hooks=list(hooks), teacher=teacher,
                   checkpoint_dir=tmp_path, fingerprint=run_fingerprint(model, recipe, "tiny"), progress=False)


def test_schedules():
    warm = TrainConfig(steps=110, lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert warm.lr_at(0) == pytest.approx(0.1) and warm.lr_at(9) == pytest.approx(1.0)
    assert warm.lr_at(10) == pytest.approx(1.0)
    assert warm.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warm.lr_at(110) == pytest.approx(0.1) and warm.lr_at(500) == pytest.approx(0.1)
    linear = TrainConfig(steps=100, lr=2.0, schedule="linear", min_lr_ratio=0.0)
    assert linear.lr_at(25) == pytest.approx(1.5)
    assert TrainConfig(steps=100, lr=2.0, schedule="constant").lr_at(77) == 2.0


@pytest.mark.parametrize("mapping,key", [({"steps": 0}, "steps"), ({"lr": -1}, "lr"), ({"lr": "fast"}, "lr"),
                                         ({"schedule": "step"}, "schedule"), ({"stepz": 3}, "stepz")])
def test_bad_train_settings(mapping, key):
    with pytest.raises(RecipeError, match=key):
        TrainConfig.parse(mapping)


def test_yaml_style_float_strings_are_read():
    assert TrainConfig.parse({"lr": "1e-3"}).lr == 1e-3


def test_batches_are_a_function_of_the_step_and_cover_the_data(tokens):
    batches = TokenBatches(tokens[: 32 * 10], batch_size=2, seq_len=32, seed=3)
    assert torch.equal(batches(7), TokenBatches(tokens[: 32 * 10], 2, 32, 3)(7))
    epoch = torch.cat([batches(i) for i in range(5)])
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, batches.windows.tolist()))


def test_data_too_short_for_one_batch(tokens):
    with pytest.raises(TrainingError, match="fewer than one batch"):
        TokenBatches(tokens[:100], batch_size=4, seq_len=32)


def test_training_lowers_the_loss(tokens):
    trainer = _trainer(tokens, steps=30)
    history = trainer.run().history
    first = sum(r["loss"] for r in history[:3]) / 3
    last = sum(r["loss"] for r in history[-3:]) / 3
    assert last < first - 0.3


class _RecordGradients(TrainHook):
    """Keeps the accumulated gradients as the optimiser would see them (before clipping)."""

    def after_backward(self, trainer, step):
        self.grads = {n: p.grad.detach().clone() for n, p in trainer.params.items() if p.grad is not None}


def test_gradient_accumulation_matches_a_larger_batch(tokens):
    # Compare the accumulated gradients, not the weights after an Adam step: Adam turns
    # summation-order noise in near-zero gradients into full-size updates (AVX2 vs AVX-512).
    torch.manual_seed(0)
    seen = {}
    for name, batch_size, grad_accum in (("big", 2, 1), ("small", 1, 2)):
        hook = _RecordGradients()
        _trainer(tokens, steps=1, batch_size=batch_size, grad_accum=grad_accum, hooks=[hook],
                 model=tiny_model("llama", seed=1)).run()
        seen[name] = hook.grads
    big, small = seen["big"], seen["small"]
    assert big.keys() == small.keys() and big
    for name, a in big.items():
        b = small[name]
        # tolerance relative to the tensor's scale: tight enough that a missing 1/grad_accum (a factor 2) fails
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4 * float(a.abs().max()) + 1e-12, msg=name)
    norm = lambda grads: torch.cat([g.flatten() for g in grads.values()]).norm()  # noqa: E731
    assert float(norm(small) / norm(big)) == pytest.approx(1.0, abs=1e-4)


def test_distillation_loss_is_zero_for_the_teacher_itself_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    assert float(distillation_loss(logits, logits, 2.0)) == pytest.approx(0, abs=1e-6)
    assert float(distillation_loss(torch.randn(2, 5, 11), logits, 2.0)) > 0


def test_distillation_training_moves_the_student_towards_the_teacher(tokens):
    teacher = tiny_model("llama", seed=5)
    trainer = _trainer(tokens, steps=15, loss="distill", distill_weight=1.0, model=tiny_model("llama", seed=1),
                       teacher=teacher)
    ids = trainer.batches(0)
    def gap():
        with torch.no_grad():
            return float(distillation_loss(trainer.model(input_ids=ids).logits, teacher(input_ids=ids).logits, 1.0))
    before = gap()
    trainer.run()
    assert gap() < 0.7 * before


def test_resume_reproduces_an_uninterrupted_run(tokens, tmp_path):
    from slimformer.core.transform import target_weights
    from slimformer.models.adapters import adapter_for
    from slimformer.techniques.sparsity.training import GMP, GMPHook

    def hooked(model, steps):
        return [GMPHook(target_weights(model, adapter_for(model), GMP().targets), GMP(every=2), steps)]

    straight_model = tiny_model("llama")
    straight = _trainer(tokens, hooks=hooked(straight_model, 6), model=straight_model, warmup_steps=2)
    straight.run()

    first_model = tiny_model("llama")
    first = _trainer(tokens, tmp_path, hooks=hooked(first_model, 6), model=first_model, warmup_steps=2, save_every=3)
    first.config.steps = 4   # interrupted after step 4: the checkpoint of step 3 survives
    first.run()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]

    second_model = tiny_model("llama", seed=9)   # different start: everything must come from the checkpoint
    second = _trainer(tokens, tmp_path, hooks=hooked(second_model, 6), model=second_model, warmup_steps=2)
    assert second.run(resume=True).resumed_from == 3
    for (name, a), b in zip(straight.model.named_parameters(), second.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert [r["loss"] for r in second.history][:3] == [r["loss"] for r in straight.history][:3]


def test_resume_refuses_another_recipe_or_model(tokens, tmp_path):
    trainer = _trainer(tokens, tmp_path, steps=2, save_every=1)
    trainer.run()
    with pytest.raises(TrainingError, match="another recipe"):
        _trainer(tokens, tmp_path, recipe="other").run(resume=True)
    with pytest.raises(TrainingError, match="another model"):
        _trainer(tokens, tmp_path, model=tiny_model("llama", hidden_size=32, intermediate_size=64)).run(resume=True)


def test_a_diverging_loss_stops_with_an_error(tokens):
    trainer = _trainer(tokens, steps=3, lr=1e6, max_grad_norm=None)
    with torch.no_grad():
        trainer.model.lm_head.weight.fill_(math.inf)
    with pytest.raises(TrainingError, match="loss became"):
        trainer.run()
