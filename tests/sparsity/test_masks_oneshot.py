"""Masks (unstructured layer-wise/global, N:M) and the one-shot pruning Transforms."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimformer import api
from slimformer.core.transform import target_weights
from slimformer.errors import RecipeError, SparsityConfigError
from slimformer.formats.masks import (
    global_threshold,
    is_nm,
    kept_magnitude,
    magnitude_mask,
    nm_mask,
    threshold_mask,
)
from slimformer.models.adapters import adapter_for
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.recipes.schema import parse_recipe


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 7), extra=st.integers(1, 4), rows=st.integers(1, 5), groups=st.integers(1, 6),
       seed=st.integers(0, 10_000))
def test_nm_mask_keeps_exactly_the_n_largest_of_each_group(n, extra, rows, groups, seed):
    m = n + extra
    w = torch.randn(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    mask = nm_mask(w, n, m)
    grouped_mask = mask.view(rows, groups, m)
    assert (grouped_mask.sum(-1) == n).all()
    a = w.abs().view(rows, groups, m)
    kept_min = a.masked_fill(~grouped_mask, float("inf")).amin(-1)
    pruned_max = a.masked_fill(grouped_mask, -1).amax(-1)
    assert (kept_min >= pruned_max).all()
    assert is_nm(w * mask, n, m)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_mask_prunes_the_smallest(sparsity):
    w = torch.randn(32, 48)
    mask = magnitude_mask(w, sparsity)
    assert int((~mask).sum()) == round(sparsity * w.numel())
    if 0 < sparsity:
        assert w.abs()[mask].min() >= w.abs()[~mask].max()


def test_global_threshold_gives_the_overall_sparsity_and_favours_large_layers():
    small, large = torch.randn(64, 64) * 0.1, torch.randn(64, 64)
    t = global_threshold([small, large], 0.5)
    masks = [threshold_mask(w, t) for w in (small, large)]
    assert abs(1 - (masks[0].sum() + masks[1].sum()) / (2 * 64 * 64) - 0.5) < 1e-3
    assert masks[1].float().mean() > 0.8 > 0.2 > masks[0].float().mean()


def test_kept_magnitude():
    w = torch.tensor([[1.0, -3.0, 0.5, 0.5]])
    assert kept_magnitude(w, nm_mask(w, 2, 4)) == pytest.approx(4 / 5)


@pytest.mark.parametrize("args,fragment", [((2, 2), "N < M"), ((3, 2), "N < M"), ((0, 4), "1 <= N"),
                                           ((2, 3), "does not divide")])
def test_nm_errors(args, fragment):
    with pytest.raises(SparsityConfigError, match=fragment):
        nm_mask(torch.randn(4, 8), *args, name="layer.x")


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(RecipeError, match=r"\[0, 1\)"):
        parse_recipe(f"stages:\n  - Magnitude: {{sparsity: {sparsity}}}")


def _pruned(recipe_text, shrink: str | None = None):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    if shrink is not None:
        with torch.no_grad():
            model.get_submodule(shrink).weight.mul_(0.1)
    result = api.compress((model, tok), parse_recipe(recipe_text), progress=False)
    weights = target_weights(result.model, adapter_for(result.model), result.recipe.stages[0].targets)
    return result, weights


def test_magnitude_layerwise_prunes_each_layer_and_reports_it():
    result, weights = _pruned("stages:\n  - Magnitude: {sparsity: 0.5}")
    for name, w in weights.items():
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=1e-3), name
        assert result.run.layers[name]["sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert 0.5 < result.run.layers[name]["kept_magnitude"] < 1


def test_magnitude_global_prunes_the_total_but_not_each_layer_equally():
    small = "model.layers.0.self_attn.q_proj"
    _, weights = _pruned("stages:\n  - Magnitude: {sparsity: 0.5, scope: global}", shrink=small)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    assert zeros / total == pytest.approx(0.5, abs=1e-3)
    assert float((weights[small] == 0).float().mean()) > 0.95   # the small layer gives up most
    assert all(float((w == 0).float().mean()) < 0.5 for k, w in weights.items() if k != small)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_sparsity_makes_every_target_nm(n, m):
    result, weights = _pruned(f"stages:\n  - NMSparsity: {{n: {n}, m: {m}}}")
    for name, w in weights.items():
        assert is_nm(w, n, m), name
        assert float((w == 0).float().mean()) == pytest.approx(1 - n / m, abs=1e-3)


def test_nm_that_does_not_divide_a_layer_names_it():
    with pytest.raises(SparsityConfigError, match=r"model\.layers\.0\.self_attn\.q_proj: M=3 does not divide"):
        _pruned("stages:\n  - NMSparsity: {n: 1, m: 3}")


def test_training_recipe_is_refused_by_compress():
    with pytest.raises(RecipeError, match="slimformer train"):
        _pruned("stages:\n  - GMP: {final_sparsity: 0.5}")


def test_sparse_storage_stage_saves_fewer_bytes_and_loads_the_same_model(tmp_path):
    import slimformer
    from slimformer.models.compressed import weight_bytes

    model, tok = tiny_model("llama"), tiny_tokenizer()
    ids = torch.randint(0, 300, (1, 16))
    dense = api.compress((model, tok), "nm-2-4", out=tmp_path / "dense", progress=False)
    packed = api.compress((model, tok), parse_recipe(
        "stages:\n  - NMSparsity: {n: 2, m: 4}\n  - SparseStorage: {n: 2, m: 4}\n"), out=tmp_path / "packed",
        progress=False)
    layer = packed.run.layers["model.layers.0.mlp.down_proj"]
    assert layer["storage"] == "nm"
    # 2:4 in fp32: half the values, plus a 2-bit position per kept value (1 bit per weight) = 0.5 + 1/32
    assert layer["stored_bytes"] == layer["dense_bytes"] * (0.5 + 1 / 32)
    assert weight_bytes(packed.out) < weight_bytes(dense.out)
    loaded, _ = slimformer.load(packed.out)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, dense.model(input_ids=ids).logits)


def test_permuted_nm_keeps_more_magnitude_than_the_default_order():
    default, _ = _pruned("stages:\n  - NMSparsity: {n: 2, m: 4}")
    permuted, weights = _pruned("stages:\n  - NMSparsity: {n: 2, m: 4, permute: true}")
    for name in ("mlp.down_proj", "self_attn.o_proj"):
        for block in (0, 1):
            key = f"model.layers.{block}.{name}"
            assert permuted.run.layers[key]["kept_magnitude"] > default.run.layers[key]["kept_magnitude"], key
            assert permuted.run.layers[key]["kept_magnitude_default_order"] == \
                pytest.approx(default.run.layers[key]["kept_magnitude"], abs=1e-6)
    assert all(is_nm(w, 2, 4) for w in weights.values())
