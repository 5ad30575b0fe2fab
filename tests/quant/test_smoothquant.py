import copy

import pytest
import torch

from slimformer.api import compress
from slimformer.cli import main
from slimformer.core.runner import run_transforms
from slimformer.core.transform import Targets
from slimformer.errors import QuantConfigError
from slimformer.models.adapters import adapter_for
from slimformer.models.load import load
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.nn.input_scaled import InputScaledLinear
from slimformer.nn.quant_linear import QuantLinear
from slimformer.nn.surgery import linear_weight
from slimformer.recipes import Recipe
from slimformer.techniques.quant.rtn import RTN
from slimformer.techniques.quant.smoothquant import (
    SmoothQuant,
    smoothing_scales,
    w8a8_error,
)

IDS = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(1))
STATIC_W8A8 = dict(bits=8, act_bits=8, act_granularity="tensor", act_dynamic=False)


def _outputs(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _relative_error(got, want):
    return float((got - want).pow(2).mean() / want.pow(2).mean())


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_smoothed_model_equals_the_original_in_full_precision(family):
    model, original = tiny_model(family), tiny_model(family)
    adapter = adapter_for(model)
    run_transforms(model, [SmoothQuant(alpha=0.5)], calib=CALIB, progress=False)
    block, before = adapter.get_blocks(model)[0], adapter.get_blocks(original)[0]
    for group in adapter.norms:   # the scales really moved into the norms and weights
        assert not torch.allclose(block.get_submodule(group.norm).weight, before.get_submodule(group.norm).weight)
        assert not torch.allclose(linear_weight(block.get_submodule(group.linears[0])),
                                  linear_weight(before.get_submodule(group.linears[0])))
    want = _outputs(original)
    torch.testing.assert_close(_outputs(model), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("family,targets", [("bert", None), ("gpt2", Targets()), ("llama", Targets())])
def test_fold_input_keeps_the_model_equal_through_an_explicit_input_multiply(family, targets):
    """BERT (post-norm) and any projection (o_proj, down_proj, GPT-2's Conv1D) smooth through
    the per-channel input multiply; then a quantiser fills the wrapper in place."""
    model, original = tiny_model(family), tiny_model(family)
    adapter = adapter_for(model)
    kwargs = {} if targets is None else {"targets": targets}
    run_transforms(model, [SmoothQuant(fold="input", **kwargs)], calib=CALIB, progress=False)
    wrapped = [n for n in adapter.linears if isinstance(adapter.get_blocks(model)[0].get_submodule(n), InputScaledLinear)]
    assert wrapped == list(adapter.linears if targets is not None else adapter.attention_in + adapter.mlp_in)
    want = _outputs(original)
    torch.testing.assert_close(_outputs(model), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())

    run_transforms(model, [RTN(**STATIC_W8A8)], calib=CALIB, progress=False)
    layer = adapter.get_blocks(model)[1].get_submodule(wrapped[0])
    assert isinstance(layer, InputScaledLinear) and isinstance(layer.inner, QuantLinear)
    # the static activation scale was calibrated on the smoothed input the inner layer reads
    seen = []
    handle = layer.inner.register_forward_pre_hook(lambda _m, args: seen.append(args[0].abs().max()))
    _outputs(model, CALIB)
    handle.remove()
    assert layer.inner.act_scale.item() == pytest.approx(max(seen).item() / 127, rel=0.05)


def test_fold_input_then_w8a8_saves_and_loads_on_bert(tmp_path):
    model, tok = tiny_model("bert"), tiny_tokenizer()
    recipe = Recipe("sq-bert", [SmoothQuant(fold="input"), RTN(**STATIC_W8A8)])
    result = compress((model, tok), recipe, tmp_path / "out", calib="pydoc", calib_samples=4, seqlen=32,
                      progress=False)
    loaded, _ = load(str(tmp_path / "out"))
    assert isinstance(loaded.encoder.layer[0].attention.self.query, InputScaledLinear)
    torch.testing.assert_close(_outputs(loaded), _outputs(result.model), rtol=0, atol=0)


def test_targets_without_a_foldable_norm_are_refused_naming_the_layer():
    with pytest.raises(QuantConfigError, match=r"encoder\.layer\.0\.attention\.self\.query: .*post-norm.*fold: input"):
        run_transforms(tiny_model("bert"), [SmoothQuant()], calib=CALIB, progress=False)
    with pytest.raises(QuantConfigError, match=r"model\.layers\.0\.self_attn\.o_proj: .*no norm precedes it"):
        run_transforms(tiny_model("llama"), [SmoothQuant(targets=Targets(include=(r"self_attn\..*",)))],
                       calib=CALIB, progress=False)
    with pytest.raises(QuantConfigError, match="post-norm"):
        run_transforms(tiny_model("opt", do_layer_norm_before=False), [SmoothQuant()], calib=CALIB, progress=False)


def test_cli_refuses_with_one_line(tmp_path, capsys):
    model, tok = tiny_model("bert"), tiny_tokenizer()
    model.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    code = main(["compress", str(tmp_path / "bert"), "--recipe", "smoothquant-w8a8-static", "--out",
                 str(tmp_path / "out"), "--calib", "pydoc", "--calib-samples", "2", "--seqlen", "16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "attention.self.query" in err[0]
    assert not (tmp_path / "out").exists()


def test_smoothing_scales_follow_the_formula_and_stay_finite():
    act, weight = torch.tensor([4.0, 0.0, 9.0, 1e-9]), torch.tensor([1.0, 2.0, 0.0, 1.0])
    s = smoothing_scales(act, weight, 0.5)
    assert s[0].item() == pytest.approx(2.0)               # 4^0.5 / 1^0.5
    assert s[1].item() == 1.0 and s[2].item() == 1.0       # nothing to balance
    assert torch.isfinite(s).all() and (s > 0).all()
    assert smoothing_scales(torch.tensor([8.0]), torch.tensor([2.0]), 0.75).item() == pytest.approx(8**0.75 / 2**0.25)


def _with_outlier_channel(family="llama"):
    model = tiny_model(family)
    adapter = adapter_for(model)
    with torch.no_grad():
        for block in adapter.get_blocks(model):
            for group in adapter.norms:
                block.get_submodule(group.norm).weight[5] *= 50
    return model


def test_smoothquant_beats_naive_static_w8a8_on_an_outlier_channel():
    base = _with_outlier_channel()
    want = _outputs(base)
    naive, smoothed = copy.deepcopy(base), copy.deepcopy(base)
    run_transforms(naive, [RTN(**STATIC_W8A8)], calib=CALIB, progress=False)
    run_transforms(smoothed, [SmoothQuant(alpha=0.5), RTN(**STATIC_W8A8)], calib=CALIB, progress=False)
    assert _relative_error(_outputs(smoothed), want) < 0.6 * _relative_error(_outputs(naive), want)


@pytest.mark.parametrize("granularity", ["tensor", "token"])
def test_alpha_grid_picks_the_alpha_of_least_w8a8_error_and_reports_it(granularity):
    base = _with_outlier_channel()
    grid = [0.2, 0.5, 0.8]
    # block 0's attention input in the untouched model: what the search sees for that group
    captured = []
    handle = base.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    _outputs(base, CALIB)
    handle.remove()
    x = torch.cat(captured)
    weights = [base.model.layers[0].get_submodule(n).weight.detach().clone() for n in adapter_for(base).attention_in]
    act_max, weight_max = x.abs().amax(0), torch.cat(weights).abs().amax(0)
    errors = {a: w8a8_error(x, weights, act_max, smoothing_scales(act_max, weight_max, a), granularity) for a in grid}
    assert len(set(errors.values())) == len(grid)

    run = run_transforms(base, [SmoothQuant(alpha_grid=grid, act_granularity=granularity)], calib=CALIB,
                         progress=False)
    chosen = run.layers["model.layers.0.self_attn.q_proj"]["smoothquant_alpha"]
    assert chosen == min(errors, key=errors.get)
    assert run.layers["model.layers.0.self_attn.v_proj"]["smoothquant_alpha"] == chosen
    assert all(run.layers[f"model.layers.{i}.mlp.up_proj"]["smoothquant_alpha"] in grid for i in range(2))


@pytest.mark.parametrize("recipe", ["smoothquant-w8a8", "smoothquant-w8a8-static"])
def test_recipe_saves_loads_and_generates(recipe, tmp_path, capsys):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    out = tmp_path / recipe
    result = compress((model, tok), recipe, out, calib="pydoc", calib_samples=4, seqlen=32, progress=False)
    assert isinstance(result.model.model.layers[1].mlp.gate_proj, QuantLinear)
    loaded, _ = load(str(out))
    torch.testing.assert_close(_outputs(loaded), _outputs(result.model), rtol=0, atol=0)
    assert main(["generate", str(out), "--prompt", "def f(x):", "--max-new-tokens", "5", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.strip()
