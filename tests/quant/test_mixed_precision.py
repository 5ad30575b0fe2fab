import copy

import pytest
import torch
import torch.nn.functional as F

from slimformer.api import compress
from slimformer.cli import main
from slimformer.core.runner import run_transforms
from slimformer.errors import QuantConfigError
from slimformer.models.adapters import adapter_for
from slimformer.models.load import load
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.nn.hidden_state import HiddenStateQuant
from slimformer.nn.peg import PEGLinear
from slimformer.techniques.quant.mixed_precision import MixedPrecisionActivations

IDS = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(1))


def _outputs(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _relative_error(got, want):
    return float((got - want).pow(2).mean() / want.pow(2).mean())


def _fake_quant(x, scale, bits):
    """Symmetric static fake quantisation, written out."""
    top = 2 ** (bits - 1)
    return torch.round(x / scale).clamp(-top, top - 1) * scale


def _input_quant(layer: PEGLinear, x):
    assert layer.groups == 1 and layer.act_zero.item() == 0
    return _fake_quant(x, layer.act_scale.item(), layer.act_grid.bits)


def test_llama_block_output_equals_the_manual_computation():
    model, original = tiny_model("llama"), tiny_model("llama")
    run_transforms(model, [MixedPrecisionActivations()], calib=CALIB, progress=False)
    block = model.model.layers[0]
    point = block.ffn_residual_quant
    assert isinstance(point, HiddenStateQuant) and point.grid.bits == 16 and point.where == "output"
    assert all(isinstance(block.get_submodule(n), PEGLinear) and block.get_submodule(n).act_grid.bits == 8
               for n in adapter_for(model).linears)

    # the residual scale: block 0's float output on the calibration data, on the int16 grid
    seen = []
    handle = original.model.layers[0].register_forward_hook(lambda _m, _a, out: seen.append(out.abs().max()))
    _outputs(original, CALIB)
    handle.remove()
    assert point.scale.item() == pytest.approx(max(seen).item() / 32767, rel=1e-6)

    captured = {}
    hooks = [block.post_attention_layernorm.register_forward_pre_hook(lambda _m, a: captured.update(h=a[0])),
             block.register_forward_hook(lambda _m, _a, out: captured.update(out=out))]
    _outputs(model)
    for h in hooks:
        h.remove()
    h, mlp = captured["h"], block.mlp
    normed = block.post_attention_layernorm(h)
    gate = _input_quant(mlp.gate_proj, normed) @ mlp.gate_proj.dequantized_weight().T
    up = _input_quant(mlp.up_proj, normed) @ mlp.up_proj.dequantized_weight().T
    down = _input_quant(mlp.down_proj, F.silu(gate) * up) @ mlp.down_proj.dequantized_weight().T
    expected = _fake_quant(h + down, point.scale.item(), 16)
    torch.testing.assert_close(captured["out"], expected, rtol=1e-5, atol=1e-6)


def test_bert_point_is_the_input_of_the_ffn_output_layernorm():
    model = tiny_model("bert")
    run_transforms(model, [MixedPrecisionActivations(keep_16bit=[])], calib=CALIB, progress=False)
    output = model.encoder.layer[1].output
    point = output.LayerNorm.ffn_residual_quant
    assert point.where == "input" and point.grid.bits == 8
    captured = {}
    hooks = [output.register_forward_pre_hook(lambda _m, a: captured.update(args=a)),
             output.register_forward_hook(lambda _m, _a, out: captured.update(out=out))]
    _outputs(model)
    for h in hooks:
        h.remove()
    hidden, residual = captured["args"]
    dense = output.dense
    summed = _input_quant(dense, hidden) @ dense.dequantized_weight().T + dense.bias + residual
    expected = F.layer_norm(_fake_quant(summed, point.scale.item(), 8), (summed.shape[-1],),
                            output.LayerNorm.weight, output.LayerNorm.bias, output.LayerNorm.eps)
    torch.testing.assert_close(captured["out"], expected, rtol=1e-5, atol=1e-5)


def _with_residual_outlier(family):
    """One residual channel far above the rest: the FFN output adds it in every block."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    with torch.no_grad():
        for block in adapter.get_blocks(model):
            ffn_out = block.get_submodule(adapter.mlp_out[0])
            if getattr(ffn_out, "bias", None) is not None:
                ffn_out.bias[7] += 40
            else:
                ffn_out.weight[7] *= 50
    return model


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_residual_kept_at_16_bits_beats_all_8_bits_with_a_residual_outlier(family):
    base = _with_residual_outlier(family)
    want = _outputs(base)

    def error(keep):
        model = copy.deepcopy(base)
        run = run_transforms(model, [MixedPrecisionActivations(keep_16bit=keep)], calib=CALIB, progress=False)
        assert run.layers[f"{adapter_for(model).blocks}.0.ffn_residual"]["act_bits"] == (16 if keep else 8)
        return _relative_error(_outputs(model), want)

    assert error(["ffn_residual"]) < 0.5 * error([])


def test_keep_16bit_names_projections_too_and_rejects_unknown_points():
    model = tiny_model("llama")
    run = run_transforms(model, [MixedPrecisionActivations(keep_16bit=[r"mlp\.down_proj"])], calib=CALIB, progress=False)
    assert model.model.layers[0].mlp.down_proj.act_grid.bits == 16
    assert model.model.layers[0].mlp.up_proj.act_grid.bits == 8
    assert run.layers["model.layers.0.ffn_residual"]["act_bits"] == 8
    with pytest.raises(QuantConfigError, match="keep_16bit: 'mlp.fc9' names no activation point"):
        run_transforms(tiny_model("llama"), [MixedPrecisionActivations(keep_16bit=["mlp.fc9"])], calib=CALIB,
                       progress=False)


@pytest.mark.parametrize("recipe", ["mixed-16-8", "w8a8-all-8"])
def test_recipes_save_load_and_generate(recipe, tmp_path, capsys):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    out = tmp_path / recipe
    result = compress((model, tok), recipe, out, calib="pydoc", calib_samples=4, seqlen=32, progress=False)
    loaded, _ = load(str(out))
    # the residual hooks come back with the modules: the loaded model computes the same
    torch.testing.assert_close(_outputs(loaded), _outputs(result.model), rtol=0, atol=0)
    expected_bits = 16 if recipe == "mixed-16-8" else 8
    assert loaded.model.layers[1].ffn_residual_quant.grid.bits == expected_bits
    with pytest.warns(RuntimeWarning, match="Hugging Face engine"):
        assert main(["generate", str(out), "--prompt", "def f(x):", "--max-new-tokens", "5", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.strip()


def test_bert_round_trip_restores_the_layernorm_input_quantisation(tmp_path):
    model, tok = _with_residual_outlier("bert"), tiny_tokenizer()
    result = compress((model, tok), "w8a8-all-8", tmp_path / "out", calib="pydoc", calib_samples=4, seqlen=32,
                      progress=False)
    loaded, _ = load(str(tmp_path / "out"))
    torch.testing.assert_close(_outputs(loaded), _outputs(result.model), rtol=0, atol=0)
    # and that quantisation matters here: without its hooks the model computes something else
    stripped = copy.deepcopy(loaded)
    for layer in stripped.encoder.layer:
        layer.output.LayerNorm._forward_pre_hooks.clear()
    assert not torch.allclose(_outputs(stripped), _outputs(loaded))
