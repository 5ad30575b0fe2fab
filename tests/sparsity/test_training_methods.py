"""Training-time sparsity: GMP, iterative pruning with rewinding, STE / SR-STE, Top-KAST,
masked fine-tuning, and `slimformer train` end to end (with its bad-input errors)."""

import json

import pytest
import torch

import slimformer
from slimformer.cli import main
from slimformer.core.transform import target_weights
from slimformer.data import load_text, tokenize
from slimformer.formats.masks import is_nm
from slimformer.models.adapters import adapter_for
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.techniques.sparsity.training import (
    GMP,
    SRSTE,
    STE,
    IterativePruning,
    TopKAST,
)
from slimformer.train import TokenBatches, TrainConfig, Trainer


@pytest.fixture(scope="module")
def tokens():
    return tokenize(load_text("pydoc", role="calib"), tiny_tokenizer())


def _run(tokens, spec, steps=12, seed=0, **cfg):
    model = tiny_model("llama", seed=seed)
    model.requires_grad_(True)
    config = TrainConfig(**{"steps": steps, "batch_size": 2, "seq_len": 32, "lr": 3e-3, **cfg})
    hook = spec.training_hook(model, adapter_for(model), config)
    trainer = Trainer(model, config, TokenBatches(tokens, 2, 32), hooks=[hook], progress=False)
    return trainer, hook


def _sparsity(hook):
    return 1 - sum(int((w != 0).sum()) for w in hook.weights.values()) / sum(w.numel() for w in hook.weights.values())


def test_gmp_follows_the_cubic_schedule_and_pruned_weights_stay_zero(tokens):
    spec = GMP(final_sparsity=0.6, initial_sparsity=0.0, start=0.0, end=0.5, every=2)
    trainer, hook = _run(tokens, spec, steps=16)
    assert hook.target_sparsity(0) == 0
    assert hook.target_sparsity(4) == pytest.approx(0.6 + (0 - 0.6) * (1 - 4 / 8) ** 3)
    assert hook.target_sparsity(8) == pytest.approx(0.6) == hook.target_sparsity(16)
    seen = []
    original = hook.after_step

    def spy(trainer_, step):
        original(trainer_, step)
        if hook.masks:
            assert all(not bool((w[~hook.masks[k]] != 0).any()) for k, w in hook.weights.items())
        seen.append(_sparsity(hook))

    hook.after_step = spy
    trainer.run()
    assert seen == sorted(seen)                  # sparsity only grows
    assert seen[3] == pytest.approx(hook.target_sparsity(4), abs=0.01)
    assert _sparsity(hook) == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize("retrain", ["finetune", "weight_rewind", "lr_rewind"])
def test_iterative_pruning_retraining_modes(tokens, retrain):
    spec = IterativePruning(final_sparsity=0.5, rounds=2, retrain=retrain, rewind_step=2, first_prune_step=4)
    trainer, hook = _run(tokens, spec, steps=12, warmup_steps=2)
    assert hook.prune_steps == [4, 8]
    rewound = {}
    original = hook._maybe_prune

    def spy(trainer_, step):
        before = hook.rounds_done
        original(trainer_, step)
        if hook.rounds_done > before:
            rewound[step] = ({k: w.detach().clone() for k, w in hook.weights.items()}, trainer_.schedule_step,
                             {k: v.clone() for k, v in hook.masks.items()})

    hook._maybe_prune = spy
    trainer.run()
    assert sorted(rewound) == [4, 8]
    lrs = [r["lr"] for r in trainer.history]
    weights, schedule_step, masks = rewound[8]
    assert _sparsity(hook) == pytest.approx(0.5, abs=0.01)
    assert 1 - sum(int(m.sum()) for m in rewound[4][2].values()) / sum(m.numel() for m in masks.values()) \
        == pytest.approx(1 - 0.5 ** 0.5, abs=0.01)   # round 1 prunes the same fraction as round 2
    if retrain == "finetune":
        assert lrs[4:] == [trainer.config.lr_at(trainer.config.steps)] * 8   # the schedule's final rate
    else:
        assert schedule_step == 2
        assert lrs[4] == pytest.approx(trainer.config.lr_at(2))          # the schedule replayed from step 2
    if retrain == "weight_rewind":
        for k, w in weights.items():   # the survivors are back at their step-2 values
            assert torch.equal(w, hook.snapshot[f"{k}.weight"] * masks[k]), k


def test_ste_forwards_pruned_weights_and_updates_the_dense_ones(tokens):
    trainer, hook = _run(tokens, STE(n=2, m=4), steps=1, max_grad_norm=None)
    model = trainer.model
    name, weight = next(iter(hook.weights.items()))
    dense = weight.detach().clone()
    trainer.model.train()
    hook.before_forward(trainer, 0)
    assert is_nm(weight, 2, 4) and not is_nm(dense, 2, 4)
    trainer.loss_on(trainer.batches(0)).backward()
    hook.after_backward(trainer, 0)
    assert torch.equal(weight, dense)               # dense weights back, before the update
    assert (weight.grad[~hook.masks[name]] != 0).any()   # pruned weights get the straight-through gradient
    model.zero_grad()
    trainer, hook = _run(tokens, STE(n=2, m=4), steps=6)
    trainer.run()
    assert all(is_nm(w, 2, 4) for w in hook.weights.values())


def test_srste_decays_the_pruned_weights_and_settles_the_mask(tokens):
    results = {}
    for name, spec in (("ste", STE(n=2, m=4)), ("srste", SRSTE(n=2, m=4, decay=0.5))):
        trainer, hook = _run(tokens, spec, steps=20, lr=1e-2)
        pruned_size = []
        original = hook.before_forward

        def spy(trainer_, step, hook=hook, original=original, pruned_size=pruned_size):
            original(trainer_, step)
            pruned_size.append(sum(float((hook.dense[k] * ~hook.masks[k]).abs().sum()) for k in hook.weights))

        hook.before_forward = spy
        trainer.run()
        results[name] = (pruned_size[-1], sum(r["mask_flips"] for r in trainer.history[-10:]))
    assert results["srste"][0] < 0.8 * results["ste"][0]
    assert results["srste"][1] <= results["ste"][1]


def test_topkast_updates_only_set_b_and_forwards_set_a(tokens):
    spec = TopKAST(sparsity=0.6, backward_sparsity=0.3, exploration=0.0)
    trainer, hook = _run(tokens, spec, steps=1, max_grad_norm=None)
    before = {k: w.detach().clone() for k, w in hook.weights.items()}
    original = hook.after_backward
    captured = {}

    def spy(trainer_, step):
        original(trainer_, step)
        captured.update({k: m.clone() for k, m in hook.backward_masks.items()})
        captured["A"] = {k: m.clone() for k, m in hook.masks.items()}

    hook.after_backward = spy
    trainer.train_step()
    for k, w in hook.weights.items():
        outside_b = ~captured[k]
        assert torch.equal(w[outside_b], before[k][outside_b]), k     # no update outside B
        assert (w[captured[k]] != before[k][captured[k]]).any()
        a = captured["A"][k]
        assert float(a.float().mean()) == pytest.approx(0.4, abs=0.01)
        assert float(captured[k].float().mean()) == pytest.approx(0.7, abs=0.01)
        assert bool((captured[k] | ~a).all())                          # A ⊆ B
    hook.on_end(trainer)
    assert _sparsity(hook) == pytest.approx(0.6, abs=0.01)


def test_topkast_exploration_penalises_b_outside_a_more(tokens):
    spec = TopKAST(sparsity=0.5, backward_sparsity=0.0, exploration=1.0)
    trainer, hook = _run(tokens, spec, steps=1, max_grad_norm=None)
    trainer.model.train()
    hook.before_forward(trainer, 0)
    trainer.model.zero_grad()   # no loss gradient: what remains is the regulariser's
    for w in hook.weights.values():
        w.grad = torch.zeros_like(w)
    hook.after_backward(trainer, 0)
    name, w = next(iter(hook.weights.items()))
    a = hook.masks[name]
    ratio = (w.grad[~a] / w.detach()[~a]).mean()
    assert float(ratio) == pytest.approx(2.0, rel=1e-4)                 # 1 / D with D = 0.5
    assert float((w.grad[a] / w.detach()[a]).mean()) == pytest.approx(1.0, rel=1e-4)


def test_nm_training_needs_m_to_divide_every_layer():
    from slimformer.errors import SparsityConfigError

    model = tiny_model("llama")
    with pytest.raises(SparsityConfigError, match=r"model\.layers\.0\.self_attn\.q_proj: M=6"):
        STE(n=2, m=6).training_hook(model, adapter_for(model), TrainConfig())


# ------------------------------------------------------------------ slimformer train

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def _train_cli(capsys, *argv):
    code = main(["--quiet", "train", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _recipe(tmp_path, stages, name="r.yaml"):
    path = tmp_path / name
    path.write_text(f"stages:\n{stages}\ntrain: {{batch_size: 2, seq_len: 32, lr: 3.0e-3}}\n")
    return path


def test_train_cli_writes_a_loadable_pruned_model_and_resumes(capsys, tmp_path, tiny_dir):
    recipe = _recipe(tmp_path, "  - Magnitude: {sparsity: 0.5}\n  - MaskedFineTune: {}")
    out = tmp_path / "out"
    code, stdout, err = _train_cli(capsys, tiny_dir, "--recipe", recipe, "--data", "pydoc", "--steps", 4,
                                   "--save-every", 2, "--out", out)
    assert code == 0, err
    assert "sparsity 50.0%" in stdout
    model, _ = slimformer.load(out)
    weights = target_weights(model, adapter_for(model), slimformer.recipes.load_recipe(str(recipe)).stages[0].targets)
    assert all(float((w == 0).float().mean()) == pytest.approx(0.5, abs=1e-3) for w in weights.values())
    meta = json.loads((out / "slimformer.json").read_text())
    assert meta["training"]["steps"] == 4 and len(meta["training"]["history"]) == 4
    assert (out / "checkpoint-2").is_dir()
    # More steps from the checkpoint of step 2 (the final model is replaced, the marker last).
    code, stdout, err = _train_cli(capsys, tiny_dir, "--recipe", recipe, "--data", "pydoc", "--steps", 6,
                                   "--out", out, "--resume")
    assert code == 0, err
    meta = json.loads((out / "slimformer.json").read_text())
    assert meta["training"]["resumed_from"] == 2 and meta["training"]["steps"] == 6


def _one_line_error(code, err, *fragments):
    assert code not in (0, None)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimformer: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_train_cli_bad_input(capsys, tmp_path, tiny_dir):
    out = tmp_path / "out"
    short = tmp_path / "short.txt"
    short.write_text("too short")
    ok = _recipe(tmp_path, "  - STE: {n: 2, m: 4}")
    _one_line_error(*_train_cli(capsys, tiny_dir, "--recipe", ok, "--data", short, "--out", out)[::2],
                    "fewer than one batch")
    assert not out.exists()
    _one_line_error(*_train_cli(capsys, tiny_dir, "--recipe", _recipe(tmp_path, "  - STE: {n: 4, m: 4}", "b.yaml"),
                                "--data", "pydoc", "--out", out)[::2], "N < M")
    _one_line_error(*_train_cli(capsys, tiny_dir, "--recipe", _recipe(tmp_path, "  - STE: {n: 1, m: 5}", "c.yaml"),
                                "--data", "pydoc", "--out", out)[::2], "M=5 does not divide")
    _one_line_error(*_train_cli(capsys, tiny_dir, "--recipe", _recipe(tmp_path, "  - Magnitude: {sparsity: 1.0}",
                                                                      "d.yaml"),
                                "--data", "pydoc", "--out", out)[::2], "[0, 1)")
    _one_line_error(*_train_cli(capsys, tiny_dir, "--recipe", "magnitude-50", "--data", "pydoc", "--out", out)[::2],
                    "no training stage")
    assert not out.exists()
    # A checkpoint of another recipe is refused on resume.
    assert _train_cli(capsys, tiny_dir, "--recipe", ok, "--data", "pydoc", "--steps", 2, "--save-every", 1,
                      "--out", out)[0] == 0
    other = _recipe(tmp_path, "  - SRSTE: {n: 2, m: 4}", "e.yaml")
    _one_line_error(*_train_cli(capsys, tiny_dir, "--recipe", other, "--data", "pydoc", "--steps", 3,
                                "--out", out, "--resume")[::2], "another recipe")
    _one_line_error(*_train_cli(capsys, tiny_dir, "--recipe", ok, "--data", "pydoc", "--out", out)[::2], "exists")
