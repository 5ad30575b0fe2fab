"""GOBO: Lloyd never increases the error, beats RTN on Gaussian weights with outliers,
keeps outliers exactly, stores real bytes, saves/loads exactly, refuses bad settings."""

import pytest
import torch
import torch.nn.functional as F

import slimformer
from slimformer import api
from slimformer.cli import main
from slimformer.core.runner import run_transforms
from slimformer.errors import QuantConfigError, RecipeError
from slimformer.formats.primitives import fake_quantize_weight
from slimformer.formats.spec import WeightSpec
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.nn.gobo import GOBOLinear
from slimformer.recipes.schema import parse_recipe
from slimformer.techniques.quant.gobo import GOBO, gobo_linear, gobo_quantize, lloyd_1d


def _gaussian_with_outliers(out_features=64, in_features=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) * 0.02
    positions = torch.randperm(weight.numel(), generator=g)[:24]
    planted = torch.tensor([0.5, -0.375, 0.625, -0.75] * 6)    # float16-exact, ≥ 18σ
    weight.view(-1)[positions] = planted
    return weight, positions, planted


def test_lloyd_iterations_never_increase_the_squared_error():
    g = torch.Generator().manual_seed(1)
    values = torch.cat([torch.randn(6, 200, generator=g), torch.rand(6, 200, generator=g) * 3], dim=1)
    valid = torch.rand(values.shape, generator=g) > 0.1
    centroids, assignment, errors = lloyd_1d(values, valid, 8, iterations=30)
    assert len(errors) > 2 and errors[-1] < errors[0]
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(errors, errors[1:]))
    # the returned assignment is the nearest centroid, and the last error is its error
    distance = (values[:, :, None] - centroids[:, None, :]).abs()
    assert torch.equal(distance.gather(2, assignment[..., None]).squeeze(-1), distance.amin(2))
    assert errors[-1] == pytest.approx(float((((values - centroids.gather(1, assignment)) ** 2) * valid).sum()), rel=1e-5)
    assert torch.all(centroids[:, 1:] >= centroids[:, :-1])


def _direct_lloyd(values, valid, k, iterations):
    """Textbook Lloyd with a full distance matrix, from the same quantile start."""
    centroids = []
    for row, mask in zip(values, valid):
        v = row[mask].sort().values
        c = v[((torch.arange(k) + 0.5) / k * (len(v) - 1)).round().long()]
        for _ in range(iterations):
            nearest = (v[:, None] - c[None, :]).abs().argmin(1)
            c = torch.stack([v[nearest == j].mean() if (nearest == j).any() else c[j] for j in range(k)]).sort().values
        centroids.append(c)
    return torch.stack(centroids)


def test_lloyd_equals_the_direct_algorithm():
    g = torch.Generator().manual_seed(4)
    values = torch.randn(5, 300, generator=g) ** 3
    valid = torch.rand(values.shape, generator=g) > 0.2
    for iterations in (0, 1, 4, 12):
        centroids, _, _ = lloyd_1d(values, valid, 8, iterations)
        torch.testing.assert_close(centroids, _direct_lloyd(values, valid, 8, iterations), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits,granularity,group_size", [(3, "channel", None), (4, "channel", None),
                                                          (3, "group", 32), (2, "tensor", None)])
def test_error_below_rtn_and_outliers_exact(bits, granularity, group_size):
    weight, positions, planted = _gaussian_with_outliers()
    spec = WeightSpec(bits, True, granularity, group_size)
    module = gobo_linear(weight, None, spec)
    restored = module.dequantized_weight()
    assert torch.equal(restored.view(-1)[positions], planted)
    assert set(positions.tolist()) <= set(module.outlier_index.tolist())
    assert module.outlier_fraction < 0.01     # the planted ones and a few Gaussian tail weights
    error = (restored - weight).norm()
    for symmetric in (True, False):
        rtn = fake_quantize_weight(weight, WeightSpec(bits, symmetric, granularity, group_size))
        assert error < (rtn - weight).norm(), f"RTN {'sym' if symmetric else 'asym'}"


def test_weights_use_only_their_own_table_and_bytes_are_real():
    weight, _, _ = _gaussian_with_outliers(16, 64)
    spec = WeightSpec(3, True, "group", 32)
    _, centroids, flat_index, _ = gobo_quantize(weight, spec, 3.0, 20)
    module = gobo_linear(weight, None, spec)
    assert centroids.shape == (16, 2, 8) and module.centroids.dtype == torch.float16
    restored = module.dequantized_weight().reshape(16, 2, 32)
    inliers = torch.ones(16 * 64, dtype=torch.bool)
    inliers[flat_index] = False
    for row, group in [(0, 0), (5, 1), (15, 1)]:
        own = set(module.centroids[row, group].float().tolist())
        mask = inliers.reshape(16, 2, 32)[row, group]
        assert set(restored[row, group][mask].tolist()) <= own
    stored = sum(b.numel() * b.element_size() for b in module.buffers())
    expected = 16 * 64 * 3 // 8 + 16 * 2 * 8 * 2 + flat_index.numel() * (4 + 2)
    assert stored == expected


def test_gobo_transform_runs_on_linear_and_conv1d_models_and_stays_close():
    model, reference = tiny_model("opt"), tiny_model("opt")
    result = run_transforms(model, [GOBO(bits=4)], progress=False)
    assert all(isinstance(m, GOBOLinear) for m in model.model.decoder.layers[0].modules()
               if type(m).__name__ in ("Linear", "GOBOLinear"))
    assert "outlier_fraction" in result.layers["model.decoder.layers.1.fc2"]
    ids = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        expected = reference(input_ids=ids).logits
    assert F.cosine_similarity(logits.flatten(), expected.flatten(), dim=0) > 0.99
    gpt2 = tiny_model("gpt2")
    run_transforms(gpt2, [GOBO(bits=3)], progress=False)
    assert isinstance(gpt2.transformer.h[0].attn.c_attn, GOBOLinear)
    assert gpt2.transformer.h[0].attn.c_attn.out_features == 3 * 64


def test_save_load_exact_and_generate(tmp_path):
    out = tmp_path / "model"
    result = api.compress((tiny_model("llama"), tiny_tokenizer()), "gobo-w3-g64", out, progress=False)
    loaded, _ = slimformer.load(out)
    modules = {n: m for n, m in result.model.named_modules() if isinstance(m, GOBOLinear)}
    assert len(modules) == 14
    for name, module in modules.items():
        twin = loaded.get_submodule(name)
        assert isinstance(twin, GOBOLinear) and twin.weight_spec == module.weight_spec
        for buffer, value in module.named_buffers():
            assert torch.equal(dict(twin.named_buffers())[buffer], value), f"{name}.{buffer}"
    ids = torch.randint(4, 300, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits)
    # weights are stored packed: a 3-bit g64 GOBO model is far below fp32 in the safetensors file
    fp32_bytes = sum(p.numel() * 4 for n, p in tiny_model("llama").named_parameters() if "layers" in n)
    packed_bytes = sum(b.numel() * b.element_size() for m in modules.values() for b in m.buffers())
    assert packed_bytes < fp32_bytes / 5
    # no native GOBO format: the native engine runs each layer's dequantised weight, saying so per layer
    with pytest.warns(RuntimeWarning, match=r"layer model\.layers\.0\.self_attn\.q_proj runs as dequantised fp32.*GOBOLinear"):
        assert main(["generate", str(out), "--prompt", "def f(x):", "--max-new-tokens", "4", "--ignore-eos"]) == 0


def test_group_size_not_dividing_a_layer_names_it():
    with pytest.raises(QuantConfigError, match=r"model\.layers\.0\.self_attn\.q_proj: group_size 48"):
        run_transforms(tiny_model("llama"), [GOBO(bits=3, granularity="group", group_size=48)], progress=False)


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_outside_2_to_8_are_refused(bits):
    with pytest.raises(QuantConfigError, match="bits"):
        GOBO(bits=bits)
    with pytest.raises(RecipeError, match="bits"):
        parse_recipe(f"stages:\n  - GOBO: {{bits: {bits}}}\n")


def test_other_bad_settings():
    with pytest.raises(QuantConfigError, match="group_size"):
        GOBO(granularity="group")
    with pytest.raises(QuantConfigError, match="outlier_sigma"):
        GOBO(outlier_sigma=0)
