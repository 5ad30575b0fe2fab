"""QAT: the fake-quant forward uses exactly the arithmetic the deployed QuantLinear holds
(codes, float16 scales, zero-points), conversion reproduces the trained model, a GPTQ start
is reproduced exactly, resume is exact, and bad input stops with a one-line error."""

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import slimformer
from slimformer.cli import main
from slimformer.core.runner import TrainingRun, run_recipe
from slimformer.data import load_text, tokenize
from slimformer.errors import QuantConfigError, TrainingError
from slimformer.formats.primitives import dequantize_weight, quantize_weight, storable_scale
from slimformer.formats.spec import ActSpec, WeightSpec
from slimformer.models.adapters import adapter_for
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.nn.fake_quant import FakeQuantLinear
from slimformer.nn.quant_linear import QuantLinear
from slimformer.plugins import load_builtin
from slimformer.techniques.quant.gptq import GPTQ
from slimformer.techniques.quant.qat import QAT, QATHook
from slimformer.train import TokenBatches, TrainConfig, Trainer
from slimformer.train.hooks import TrainHook
from slimformer.train.loop import list_checkpoints, run_fingerprint

load_builtin()

specs = st.builds(
    lambda bits, sym, gran, group: WeightSpec(bits, sym, gran, group if gran == "group" else None),
    st.integers(2, 8), st.booleans(), st.sampled_from(["tensor", "channel", "group"]), st.sampled_from([4, 8, 16, 32]),
)


@pytest.fixture(scope="module")
def tokens():
    return tokenize(load_text("pydoc", role="calib"), tiny_tokenizer())


# ------------------------------------------------------------------ the arithmetic

@settings(max_examples=80, deadline=None)
@given(spec=specs, rows=st.integers(1, 6), groups=st.integers(1, 3), seed=st.integers(0, 10_000),
       magnitude=st.floats(1e-3, 1e2))
def test_fake_quant_is_rtn_bit_for_bit(spec, rows, groups, seed, magnitude):
    cols = 32 * groups
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * magnitude
    codes, scale, zero = quantize_weight(w, spec)
    deployed = dequantize_weight(codes, scale, zero if not spec.symmetric else None, spec, w.shape)
    for learn in (False, True):
        fq = FakeQuantLinear(w, None, spec, learn_scale=learn)
        assert torch.equal(fq.fake_quant_weight().detach(), deployed)
        got_codes, got_scale, got_zero = fq.quantized()
        assert torch.equal(got_codes, codes) and torch.equal(got_scale, scale)
        assert torch.equal(got_zero, zero)
        ql = fq.to_quant_linear()
        assert torch.equal(ql.codes(), codes) and torch.equal(ql.dequantized_weight(), deployed)


@settings(max_examples=40, deadline=None)
@given(spec=specs, seed=st.integers(0, 10_000), shift=st.floats(-0.3, 0.3))
def test_learned_scale_forward_is_the_stored_float16_value(spec, seed, shift):
    """Whatever the latent scale, the forward and the deployed layer use its float16 (rounded-up)
    value, and the codes are chosen against it."""
    w = torch.randn(3, 64, generator=torch.Generator().manual_seed(seed))
    fq = FakeQuantLinear(w, None, spec, learn_scale=True, scale_lr_ratio=1.0)
    with torch.no_grad():
        fq.log_scale.add_(shift)
    latent = fq.latent_scale().detach()
    used = fq.forward_scale().detach()
    assert torch.equal(used, storable_scale(latent)) and torch.equal(used.half().float(), used)
    ql = fq.to_quant_linear()
    assert torch.equal(ql.scale.float(), used)
    assert torch.equal(ql.dequantized_weight(), fq.fake_quant_weight().detach())


def test_straight_through_gradients():
    spec = WeightSpec(4, True, "group", 16)
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    fq = FakeQuantLinear(w, None, spec, learn_scale=True)
    with torch.no_grad():   # push a few weights beyond the grid's end: they get no gradient
        fq.weight[0, :3] = fq.weight[0, :3].sign() * 10
    upstream = torch.randn(4, 32)
    (fq.fake_quant_weight() * upstream).sum().backward()
    q = (fq.weight.detach().reshape(4, 2, 16) / fq.forward_scale().detach().unsqueeze(-1)).round()
    inside = ((q >= spec.qmin) & (q <= spec.qmax)).reshape(4, 32)
    assert not inside[0, :3].any()
    assert torch.allclose(fq.weight.grad, upstream * inside, rtol=1e-6, atol=0)   # d(q·s)/dW = (1/s)·s
    assert fq.log_scale.grad is not None and fq.log_scale.grad.abs().sum() > 0


# ------------------------------------------------------------------ exact deployment

def _train_qat(tokens, stage, steps=4, model=None, keep_fake=None, lr=2e-2, **cfg):
    model = model or tiny_model("llama")
    config = TrainConfig(**{"steps": steps, "batch_size": 2, "seq_len": 32, "lr": lr, **cfg})
    fake = {}
    if keep_fake:
        original = QATHook.on_end

        def spy(self, trainer):
            fake["model"] = copy.deepcopy(self.model).eval()
            fake["layers"] = {k: copy.deepcopy(m) for k, m in self.layers.items()}
            original(self, trainer)

        QATHook.on_end = spy
    try:
        run = run_recipe(model, [stage], progress=False, train=TrainingRun(config, TokenBatches(tokens, 2, 32)))
    finally:
        if keep_fake:
            QATHook.on_end = original
    return model, run, fake


@pytest.mark.parametrize("fmt", [
    dict(bits=4, group_size=32),
    dict(bits=4, group_size=16, symmetric=False),
    dict(bits=3, group_size=32),
    dict(bits=8, granularity="channel", group_size=None),
    dict(bits=4, group_size=32, act_bits=8),                                                   # W4A8 dynamic
    dict(bits=8, granularity="channel", group_size=None, act_bits=8, act_granularity="tensor", act_dynamic=False),
])
def test_deployed_model_reproduces_the_fake_quant_forward(tokens, fmt):
    model, _run, fake = _train_qat(tokens, QAT(**fmt), keep_fake=True)
    ids = tokens[:96].view(2, 48)
    with torch.no_grad():
        want = fake["model"](input_ids=ids).logits
    # the codes the fake-quant forward used are those stored
    deployed = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(deployed) == set(fake["layers"])
    moved = 0
    for name, fq in fake["layers"].items():
        codes, scale, _zero = fq.quantized()
        assert torch.equal(deployed[name].codes(), codes), name
        assert torch.equal(deployed[name].scale.float(), scale), name
        moved += int((fq.log_scale.detach() != 0).sum())
        if fq.act_clip_init is not None:
            assert float(deployed[name].act_scale) == float(fq.act_scale())
    assert moved > 0   # the scales were learned
    with torch.no_grad():
        kernel = model(input_ids=ids).logits
        for m in deployed.values():
            m.forward = m.forward_reference
        reference = model(input_ids=ids).logits
    assert torch.allclose(reference, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(kernel, want, atol=2e-3, rtol=1e-3)
    assert torch.equal(kernel.argmax(-1), want.argmax(-1))


def test_qat_from_gptq_reproduces_the_gptq_model_exactly(tokens):
    model = tiny_model("llama")
    calib = tokens[:8 * 48].view(8, 48)
    run_recipe(model, [GPTQ(bits=4, granularity="group", group_size=32)], calib=calib, progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    codes = {n: m.codes().clone() for n, m in layers.items()}
    ids = tokens[:96].view(2, 48)
    with torch.no_grad():
        for m in layers.values():
            m.forward = m.forward_reference
        gptq_logits = model(input_ids=ids).logits
        for m in layers.values():
            del m.forward
    hook = QAT(bits=4, group_size=32).training_hook(model, adapter_for(model), TrainConfig())
    for name, fq in hook.layers.items():
        assert torch.equal(fq.quantized()[0], codes[name]), name
        assert torch.equal(fq.scale_init, layers[name].scale.float())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, gptq_logits)
    # a recipe [GPTQ, QAT] in one run, with distillation from the fp model
    trained = tiny_model("llama")
    config = TrainConfig(steps=2, batch_size=2, seq_len=32, lr=1e-3, loss="distill")
    run_recipe(trained, [GPTQ(bits=4, granularity="group", group_size=32), QAT(bits=4, group_size=32)],
               calib=calib, progress=False, train=TrainingRun(config, TokenBatches(tokens, 2, 32)))
    assert all(isinstance(trained.get_submodule(n), QuantLinear) for n in layers)


def test_format_mismatch_with_an_existing_quant_linear_is_refused(tokens):
    model = tiny_model("llama")
    run_recipe(model, [GPTQ(bits=4, granularity="group", group_size=32)], calib=tokens[:8 * 48].view(8, 48),
               progress=False)
    with pytest.raises(QuantConfigError, match=r"model\.layers\.0\.self_attn\.q_proj: .*w4-g32-sym already"):
        QAT(bits=3, group_size=32).training_hook(model, adapter_for(model), TrainConfig())


def test_resume_reproduces_an_uninterrupted_run(tokens, tmp_path):
    stage = QAT(bits=4, group_size=32, act_bits=8, act_granularity="tensor", act_dynamic=False)

    def trainer(model, steps, directory=None, **cfg):
        config = TrainConfig(steps=6, batch_size=2, seq_len=32, lr=1e-2, warmup_steps=2, **cfg)
        model.requires_grad_(True)
        hook = stage.training_hook(model, adapter_for(model), config)
        t = Trainer(model, config, TokenBatches(tokens, 2, 32), hooks=[hook], checkpoint_dir=directory,
                    fingerprint=run_fingerprint(model, "qat", "tiny"), progress=False)
        t.config.steps = steps
        return t

    straight = trainer(tiny_model("llama"), 6)
    straight.run()
    first = trainer(tiny_model("llama"), 4, tmp_path, save_every=3)
    first.run()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]
    second = trainer(tiny_model("llama", seed=9), 6, tmp_path)   # everything must come from the checkpoint
    assert second.run(resume=True).resumed_from == 3
    a = dict(straight.model.named_modules())
    for name, module in second.model.named_modules():
        if isinstance(module, QuantLinear):
            assert torch.equal(module.codes(), a[name].codes()), name
            assert torch.equal(module.scale, a[name].scale), name
            assert torch.allclose(module.act_scale, a[name].act_scale, rtol=1e-6), name
    assert [r["loss"] for r in second.history] == pytest.approx([r["loss"] for r in straight.history], rel=1e-6)


# ------------------------------------------------------------------ bad input

def test_undeployable_format_is_refused_before_training_naming_the_layer():
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(QuantConfigError, match=r"model\.layers\.0\.self_attn\.q_proj: group_size 48 does not divide"):
        QAT(bits=4, group_size=48).training_hook(model, adapter_for(model), TrainConfig())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # nothing swapped
    with pytest.raises(QuantConfigError, match="symmetric"):
        QAT(act_bits=8, act_granularity="tensor", act_dynamic=False, act_symmetric=False)


class _Sabotage(TrainHook):
    def __init__(self, at, what, layers):
        self.at, self.what, self.layers = at, what, layers

    def before_forward(self, trainer, step):
        if step + 1 == self.at:
            module = self.layers["model.layers.1.mlp.up_proj"]
            with torch.no_grad():
                if self.what == "nan":
                    module.weight[0, 0] = float("nan")
                else:
                    module.log_scale[2, 1] = -1e4


@pytest.mark.parametrize("what,message", [
    ("nan", r"step 3: model\.layers\.\d\.\S+: the gradient of \S+ is not finite"),
    ("collapse", r"step 3: model\.layers\.1\.mlp\.up_proj: a learned scale collapsed to zero"),
])
def test_nan_or_collapsing_scale_stops_naming_step_and_layer(tokens, tmp_path, what, message):
    model = tiny_model("llama")
    model.requires_grad_(True)
    config = TrainConfig(steps=5, batch_size=2, seq_len=32, lr=1e-3, save_every=2)
    hook = QAT(bits=4, group_size=32).training_hook(model, adapter_for(model), config)
    trainer = Trainer(model, config, TokenBatches(tokens, 2, 32), hooks=[_Sabotage(3, what, hook.layers), hook],
                      checkpoint_dir=tmp_path, fingerprint=run_fingerprint(model, "qat", "tiny"), progress=False)
    with pytest.raises(TrainingError, match=message):
        trainer.run()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]   # the last good one stays


# ------------------------------------------------------------------ recipes and `slimformer train`

@pytest.mark.parametrize("name", ["qat-w4-g32", "gptq-qat-w4-g32", "qat-w3-g64", "qat-w4a8"])
def test_builtin_recipes(name):
    recipe = slimformer.recipes.load_recipe(name)
    assert any(isinstance(s, QAT) for s in recipe.stages)
    assert type(recipe.stages[-1]).__name__ == "QuantizeEmbeddings"


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


def test_train_cli_qat_saves_loads_and_resumes(capsys, tmp_path, tiny_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - QAT: {bits: 4, group_size: 32}\n"
                      "train: {batch_size: 2, seq_len: 32, lr: 1.0e-3, loss: distill}\n")
    out = tmp_path / "out"
    code, _stdout, err = _train_cli(capsys, tiny_dir, "--recipe", recipe, "--data", "pydoc", "--steps", 3,
                                    "--save-every", 2, "--out", out)
    assert code == 0, err
    model, _ = slimformer.load(out)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    code, _stdout, err = _train_cli(capsys, tiny_dir, "--recipe", recipe, "--data", "pydoc", "--steps", 4,
                                    "--out", out, "--resume")
    assert code == 0, err
    assert json.loads((out / "slimformer.json").read_text())["training"]["resumed_from"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - QAT: {bits: 4, group_size: 48}\ntrain: {batch_size: 2, seq_len: 32}\n")
    code, _stdout, err = _train_cli(capsys, tiny_dir, "--recipe", bad, "--data", "pydoc", "--out", tmp_path / "b")
    lines = err.strip().splitlines()
    assert code not in (0, None) and len(lines) == 1, err
    assert "model.layers.0.self_attn.q_proj: group_size 48 does not divide" in lines[0]


@pytest.mark.parametrize("name", ["qat-w4-g32", "gptq-qat-w4-g32"])
def test_builtin_recipe_trains_end_to_end(capsys, tmp_path, tiny_dir, name):
    out = tmp_path / name
    code, _stdout, err = _train_cli(capsys, tiny_dir, "--recipe", name, "--data", "pydoc", "--steps", 2,
                                    "--batch-size", 2, "--seq-len", 32, "--out", out)
    assert code == 0, err
    model, _ = slimformer.load(out)
    assert isinstance(model.model.layers[1].self_attn.o_proj, QuantLinear)
    assert type(model.model.embed_tokens).__name__ == "QuantEmbedding"


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_other_families_convert_exactly(tokens, family):
    """GPT-2's Conv1D (``[in, out]`` weights) and OPT's biased projections."""
    model, _run, fake = _train_qat(tokens, QAT(bits=4, group_size=32), steps=2, model=tiny_model(family),
                                   keep_fake=True)
    ids = tokens[:64].view(2, 32)
    deployed = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(deployed) == len(fake["layers"]) > 0
    with torch.no_grad():
        want = fake["model"](input_ids=ids).logits
        for m in deployed:
            m.forward = m.forward_reference
        assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
