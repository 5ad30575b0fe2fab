import copy

import pytest
import torch
import torch.nn.functional as F

from slimformer.api import compress
from slimformer.cli import main
from slimformer.core.runner import run_transforms
from slimformer.errors import QuantConfigError, RecipeError
from slimformer.formats.primitives import fake_quantize_weight
from slimformer.formats.spec import WeightSpec
from slimformer.models.adapters import adapter_for
from slimformer.models.load import load
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.nn.peg import ActGrid, PEGLinear
from slimformer.recipes.schema import parse_recipe
from slimformer.techniques.quant.peg import PEG, group_assignment
from slimformer.techniques.quant.rtn import RTN

IDS = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(1))


def _outputs(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _relative_error(got, want):
    return float((got - want).pow(2).mean() / want.pow(2).mean())


@pytest.mark.parametrize("family,symmetric", [("llama", True), ("llama", False), ("bert", True)])
def test_one_group_is_exactly_per_tensor_static_rtn_w8a8(family, symmetric):
    peg, rtn = tiny_model(family), tiny_model(family)
    run_transforms(peg, [PEG(groups=1, act_symmetric=symmetric)], calib=CALIB, progress=False)
    run_transforms(rtn, [RTN(bits=8, act_bits=8, act_granularity="tensor", act_dynamic=False,
                             act_symmetric=symmetric)], calib=CALIB, progress=False)
    assert isinstance(adapter_for(peg).get_blocks(peg)[1].get_submodule(adapter_for(peg).mlp_out[0]), PEGLinear)
    assert torch.equal(_outputs(peg), _outputs(rtn))


def test_groups_follow_the_calibrated_range():
    hi = torch.tensor([1.0, 9.0, 2.0, 8.0, 3.0, 7.0])
    lo = -hi / 2
    assert group_assignment(lo, hi, 3, permute=False, symmetric=True).tolist() == [0, 0, 1, 1, 2, 2]
    # sorted by range, outliers (9, 8) share the last group
    assert group_assignment(lo, hi, 3, permute=True, symmetric=True).tolist() == [0, 2, 0, 2, 1, 1]


def test_peg_linear_quantises_each_group_on_its_own_grid():
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(12, 8, generator=g), torch.randn(12, generator=g), torch.randn(5, 8, generator=g)
    x[:, 3] *= 40
    group_of = torch.tensor([0, 0, 0, 1, 0, 0, 0, 1])
    lo, hi = x.amin(0), x.amax(0)
    layer = PEGLinear.from_float(w, b, group_of, lo, hi, ActGrid(8, False))
    expected_x = torch.empty_like(x)
    for group in (0, 1):
        dims = group_of == group
        g_lo, g_hi = min(lo[dims].min().item(), 0.0), max(hi[dims].max().item(), 0.0)
        scale = (g_hi - g_lo) / 255
        zero = round(-g_lo / scale)
        expected_x[:, dims] = ((torch.round(x[:, dims] / scale) + zero).clamp(0, 255) - zero) * scale
    expected = F.linear(expected_x, fake_quantize_weight(w, WeightSpec(8, True, "channel")), b)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_permuted_groups_beat_contiguous_groups_beat_one_group_on_a_layer():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(256, 64, generator=g), torch.randn(32, 64, generator=g)
    x[:, [5, 40]] *= 50   # two outlier dimensions, in different contiguous groups
    lo, hi = x.amin(0), x.amax(0)

    def error(groups, permute):
        layer = PEGLinear.from_float(w, None, group_assignment(lo, hi, groups, permute, True), lo, hi, ActGrid())
        return _relative_error(layer(x), x @ w.T)

    assert error(4, True) < 0.75 * error(4, False) and error(4, False) < 0.75 * error(1, True)


def test_permuted_groups_beat_contiguous_groups_beat_one_group_on_a_model():
    base = tiny_model("llama")
    adapter = adapter_for(base)
    with torch.no_grad():
        for block in adapter.get_blocks(base):
            for group in adapter.norms:
                block.get_submodule(group.norm).weight[[5, 40]] *= 50
    want = _outputs(base)

    def error(transform):
        model = copy.deepcopy(base)
        run_transforms(model, [transform], calib=CALIB, progress=False)
        return _relative_error(_outputs(model), want)

    permuted, contiguous, one = error(PEG(groups=4)), error(PEG(groups=4, permute=False)), error(PEG(groups=1))
    assert permuted < contiguous < one


def test_group_count_must_divide_the_layer():
    with pytest.raises(QuantConfigError, match=r"model\.layers\.0\.self_attn\.q_proj: PEG groups 6 does not divide its 64"):
        run_transforms(tiny_model("llama"), [PEG(groups=6)], calib=CALIB, progress=False)
    with pytest.raises(QuantConfigError, match=r"model\.layers\.0\.self_attn\.q_proj: needs a float layer"):
        run_transforms(tiny_model("llama"), [RTN(bits=8), PEG(groups=4)], calib=CALIB, progress=False)
    with pytest.raises(RecipeError, match="groups must be a positive integer"):
        parse_recipe("stages: [{PEG: {groups: 0}}]")


def test_builtin_recipe_saves_loads_and_generates(tmp_path, capsys):
    # hidden 96 and FFN 192: six groups divide both, as they do SmolLM2's 576 and 1536
    model, tok = tiny_model("llama", hidden_size=96, intermediate_size=192, head_dim=24), tiny_tokenizer()
    out = tmp_path / "peg"
    result = compress((model, tok), "peg-w8a8", out, calib="pydoc", calib_samples=4, seqlen=32, progress=False)
    layer = result.model.model.layers[0].mlp.down_proj
    assert isinstance(layer, PEGLinear) and layer.groups == 6 and layer.act_scale.unique().numel() == 6
    assert "peg_scale_ratio" in result.run.layers["model.layers.0.mlp.down_proj"]
    loaded, _ = load(str(out))
    assert torch.equal(loaded.model.layers[0].mlp.down_proj.act_group, layer.act_group)
    torch.testing.assert_close(_outputs(loaded), _outputs(result.model), rtol=0, atol=0)
    with pytest.warns(RuntimeWarning, match="Hugging Face engine"):
        assert main(["generate", str(out), "--prompt", "def f(x):", "--max-new-tokens", "5", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.strip()
