"""LLM.int8(): equals per-token W8A8 without outliers, the outlier part is floating point,
threshold 0 is the fp layer, beats naive W8A8 on an outlier channel, saves, generates."""

import json

import pytest
import torch
import torch.nn.functional as F

import slimformer
from slimformer import api
from slimformer.cli import main
from slimformer.core.runner import run_transforms
from slimformer.formats.primitives import storable_scale
from slimformer.formats.spec import ActSpec, WeightSpec
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.nn.int8_outlier import Int8OutlierLinear
from slimformer.nn.quant_linear import QuantLinear
from slimformer.recipes.schema import parse_recipe
from slimformer.techniques.quant.llm_int8 import LLMInt8

W8A8 = (WeightSpec(8, True, "channel"), ActSpec(8, True, "token", True))


def _layer(out_features=24, in_features=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g) * 0.1, torch.randn(out_features, generator=g) * 0.01


def _input(seed=1, shape=(2, 5, 32)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _calibrated(weight, bias, x, threshold):
    """The module LLMInt8 builds for a layer that saw ``x`` on calibration."""
    amax = x.abs().reshape(-1, x.shape[-1]).amax(0)
    return Int8OutlierLinear.from_float(weight, bias, (amax >= threshold).nonzero().flatten(), threshold)


def test_without_outliers_it_is_per_token_w8a8():
    weight, bias = _layer()
    x = _input()
    module = _calibrated(weight, bias, x, threshold=1e6)
    assert module.outlier_index.numel() == 0
    reference = QuantLinear.from_float(weight, bias, *W8A8)
    with torch.no_grad():
        assert torch.equal(module(x), reference(x))      # the same kernel on the same codes and scales
        torch.testing.assert_close(module.forward_reference(x), reference.forward_reference(x))


def test_outlier_column_is_floating_point_and_the_rest_int8():
    weight, bias = _layer(8, 16)
    x = _input(shape=(3, 16)) * 0.5
    x[:, 5] = torch.tensor([10.0, -7.5, 12.25])             # the only column ≥ 6
    module = _calibrated(weight, bias, x, threshold=6.0)
    assert module.outlier_index.tolist() == [5]
    assert torch.equal(module.outlier_weight, weight[:, 5:6])

    # By hand: fp on column 5; int8 (per-token / per-row absmax scales) on the others.
    rest, w_rest = x.clone(), weight.clone()
    rest[:, 5], w_rest[:, 5] = 0, 0
    s_x = rest.abs().amax(1, keepdim=True) / 127
    s_w = storable_scale(w_rest.abs().amax(1, keepdim=True) / 127)
    q_x, q_w = torch.round(rest / s_x), torch.round(w_rest / s_w).clamp(-128, 127)
    expected = x[:, 5:6] @ weight[:, 5:6].T + (q_x @ q_w.T) * (s_x * s_w.T) + bias
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(module.forward_reference(x), expected, atol=1e-5, rtol=1e-5)


def test_new_outlier_column_at_inference_uses_dequantised_int8_weights_in_fp():
    weight, bias = _layer(8, 16)
    calib = _input(shape=(4, 16)) * 0.5
    module = _calibrated(weight, bias, calib, threshold=6.0)
    assert module.outlier_index.numel() == 0
    x = _input(2, (3, 16)) * 0.5
    x[1, 9] = 40.0
    rest = x.clone()
    rest[:, 9] = 0
    s_x = rest.abs().amax(1, keepdim=True) / 127
    int8_w = module.int8_weight()
    expected = x[:, 9:10] @ int8_w[:, 9:10].T + (torch.round(rest / s_x) * s_x) @ int8_w.T + bias
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)


def test_threshold_zero_is_the_fp_layer():
    weight, bias = _layer()
    x = _input()
    module = _calibrated(weight, bias, x, threshold=0.0)
    assert module.outlier_fraction == 1.0
    with torch.no_grad():
        torch.testing.assert_close(module(x), F.linear(x, weight, bias), atol=1e-6, rtol=1e-6)


def test_error_below_naive_w8a8_on_an_outlier_channel():
    weight, bias = _layer(64, 128)
    x = _input(shape=(4, 16, 128))
    x[..., 7] *= 40   # an emergent feature: one dimension far larger in every token
    exact = F.linear(x, weight, bias)
    with torch.no_grad():
        ours = (_calibrated(weight, bias, x, 6.0)(x) - exact).norm()
        naive = (QuantLinear.from_float(weight, bias, *W8A8)(x) - exact).norm()
    assert ours < naive / 5


def test_transform_reports_outlier_fraction_per_layer():
    model = tiny_model("gpt2")   # Conv1D projections
    calib = torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    result = run_transforms(model, [LLMInt8(threshold=2.0)], calib=calib, progress=False)
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"):
        facts = result.layers[name]
        module = model.get_submodule(name)
        assert isinstance(module, Int8OutlierLinear)
        assert facts["outlier_fraction"] == module.outlier_fraction
        assert facts["outlier_dims"] == module.outlier_index.tolist()
    assert any(f["outlier_fraction"] > 0 for f in result.layers.values())


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    out = tmp_path_factory.mktemp("llm-int8") / "model"
    # A low threshold: the tiny random model has no activation as large as 6.
    recipe = parse_recipe("stages:\n  - LLMInt8: {threshold: 1.5}\n", "llm-int8-low")
    result = api.compress((tiny_model("llama"), tiny_tokenizer()), recipe, out, calib="pydoc", calib_samples=2,
                          seqlen=32, progress=False)
    return result, out


def test_save_load_identical(saved_llama):
    result, out = saved_llama
    loaded, _ = slimformer.load(out)
    ids = torch.randint(4, 300, (2, 20), generator=torch.Generator().manual_seed(3))
    modules = {n: m for n, m in result.model.named_modules() if isinstance(m, Int8OutlierLinear)}
    assert len(modules) == 14 and any(m.outlier_index.numel() for m in modules.values())
    for name, module in modules.items():
        twin = loaded.get_submodule(name)
        assert isinstance(twin, Int8OutlierLinear) and twin.threshold == module.threshold
        for buffer, value in module.named_buffers():
            assert torch.equal(dict(twin.named_buffers())[buffer], value), f"{name}.{buffer}"
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits)
    layers = json.loads((out / "slimformer.json").read_text())["layers"]
    assert "outlier_fraction" in layers["model.layers.0.self_attn.q_proj"]


def test_cli_generate_runs_the_saved_model(saved_llama, tmp_path):
    _, out = saved_llama
    out_json = tmp_path / "g.json"
    with pytest.warns(RuntimeWarning, match="Hugging Face engine"):
        code = main(["generate", str(out), "--prompt", "def f(x):", "--max-new-tokens", "5", "--ignore-eos",
                     "--json", str(out_json)])
    assert code == 0
    assert len(json.loads(out_json.read_text())["generations"][0]["token_ids"]) == 5


def test_bad_threshold():
    from slimformer.errors import QuantConfigError, RecipeError

    with pytest.raises(QuantConfigError):
        LLMInt8(threshold=-1.0)
    with pytest.raises(RecipeError, match="threshold"):
        parse_recipe("stages:\n  - LLMInt8: {threshold: fast}\n")
