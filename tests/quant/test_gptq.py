"""GPTQ: the error-feedback algorithm against a direct reference, against RTN, and run
layer by layer over whole models (true-sequential one-pass and two-pass)."""

import json

import pytest
import torch

from slimformer.api import compress
from slimformer.cli import main
from slimformer.core.runner import capture_block_inputs, run_transforms
from slimformer.core.transform import build_transform
from slimformer.errors import DataError, QuantConfigError, RecipeError
from slimformer.formats.primitives import (
    dequantize_weight,
    fake_quantize_weight,
    quantize_weight,
)
from slimformer.formats.spec import WeightSpec
from slimformer.models.adapters import adapter_for
from slimformer.models.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer
from slimformer.nn.quant_linear import QuantLinear
from slimformer.techniques.quant.gptq import (
    GPTQ,
    GPTQWarning,
    gptq_quantize,
    layer_output_error,
    prepare_hessian,
)


def _layer(seed=0, n=48, k=128, tokens=2048):
    """A weight and correlated inputs with a few large channels, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(tokens, k, generator=g) @ mix + 0.1 * torch.randn(tokens, k, generator=g)
    x[:, :3] *= 8
    return torch.randn(n, k, generator=g), x


def _dequant(codes, scale, zero, spec, shape):
    return dequantize_weight(codes, scale, None if spec.symmetric else zero, spec, shape)


SPECS = [WeightSpec(2, False, "group", 32), WeightSpec(3, True, "group", 64), WeightSpec(4, True, "channel"),
         WeightSpec(4, False, "group", 32), WeightSpec(8, True, "channel"), WeightSpec(4, True, "tensor")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("clip_search", [False, True])
def test_single_layer_output_error_below_rtn(spec, act_order, clip_search):
    w, x = _layer()
    prepared = prepare_hessian(2 * x.T @ x / len(x), act_order, 0.01)
    gptq = _dequant(*gptq_quantize(w, prepared, spec, 32, True, clip_search), spec, w.shape)
    rtn = fake_quantize_weight(w, spec)
    assert layer_output_error(w, gptq, x) < 0.8 * layer_output_error(w, rtn, x)


def _reference_gptq(w, hessian, spec, damp=0.01):
    """The algorithm as first written (OBQ's update, no Cholesky, no lazy batches):
    quantise column q, spread its error over the rest with H⁻¹, then drop q from H⁻¹."""
    H = hessian.double() + damp * hessian.diagonal().mean() * torch.eye(len(hessian), dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    W = w.double().clone()
    _, scale, zero = quantize_weight(w, spec)   # per-channel ranges fixed up front, as GPTQ does
    s, z = scale.double()[:, 0], zero.double()[:, 0]
    codes = torch.empty(w.shape, dtype=torch.uint8)
    for q in range(w.shape[1]):
        level = (torch.round(W[:, q] / s) + z).clamp(spec.qmin, spec.qmax)
        codes[:, q] = (level + (2 ** (spec.bits - 1) if spec.symmetric else 0)).to(torch.uint8)
        err = (W[:, q] - (level - z) * s) / Hinv[q, q]
        W -= err[:, None] * Hinv[q][None, :]
        Hinv -= Hinv[:, q:q + 1] @ Hinv[q:q + 1, :] / Hinv[q, q]
    return codes


@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_equals_the_reference_algorithm(block_size):
    w, x = _layer(seed=1, n=16, k=64, tokens=1024)
    hessian = 2 * x.T @ x / len(x)
    spec = WeightSpec(4, True, "channel")
    ours, _, _ = gptq_quantize(w, prepare_hessian(hessian, False, 0.01), spec, block_size, True, clip_search=False)
    reference = _reference_gptq(w, hessian, spec)
    # float32 vs float64 arithmetic may flip a rare rounding tie
    assert (ours == reference).float().mean() > 0.995


def test_diagonal_hessian_means_no_error_feedback_so_rtn():
    w, _ = _layer(seed=2)
    spec = WeightSpec(4, True, "group", 32)
    hessian = torch.diag(torch.rand(w.shape[1]) + 0.5)
    codes, scale, zero = gptq_quantize(w, prepare_hessian(hessian, True, 0.01), spec, 32, True, clip_search=False)
    rtn_codes, rtn_scale, _ = quantize_weight(w, spec)
    assert torch.equal(codes, rtn_codes) and torch.equal(scale, rtn_scale)


def _calib(n=8, length=48, seed=0):
    return torch.randint(3, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def _outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_whole_model_quantised_and_closer_than_rtn(family):
    calib, held_out = _calib(16, 64), _calib(4, 64, seed=1)
    reference = tiny_model(family)
    errors = {}
    for name, stage in {"gptq": GPTQ(bits=3, granularity="group", group_size=32),
                        "rtn": build_transform("RTN", {"bits": 3, "granularity": "group", "group_size": 32})}.items():
        model = tiny_model(family)
        run_transforms(model, [stage], calib=calib, progress=False)
        adapter = adapter_for(model)
        assert all(isinstance(m, QuantLinear) for b in adapter.get_blocks(model) for m in adapter.block_linears(b).values())
        diff = _outputs(model, held_out) - _outputs(reference, held_out)
        errors[name] = diff.norm().item()
    assert errors["gptq"] < errors["rtn"]


def test_one_pass_and_two_pass_agree_on_the_first_layers():
    """Block 0's q/k/v see the same inputs in both modes, so they get the same codes;
    later layers differ only because one-pass feeds them already-quantised inputs."""
    calib = _calib()
    models = {}
    for sequential in (True, False):
        model = tiny_model("llama")
        run_transforms(model, [GPTQ(bits=4, granularity="group", group_size=32, true_sequential=sequential)],
                       calib=calib, progress=False)
        models[sequential] = model
    first = [m.model.layers[0].self_attn for m in models.values()]
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(first[0], proj).qweight, getattr(first[1], proj).qweight)
    assert not torch.equal(models[True].model.layers[1].mlp.down_proj.qweight,
                           models[False].model.layers[1].mlp.down_proj.qweight)


def _recording_block_1_inputs(seen: list):
    """GPTQ that also records the calibration inputs block 1 receives."""
    class Spy(GPTQ):
        def prepare(self, block, ctx):
            super().prepare(block, ctx)
            if ctx.index == 1:
                ctx.state["handles"].append(block.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone())))

    return Spy


def test_one_pass_forward_feeds_the_next_block_what_the_quantised_block_computes():
    """Block 1's calibration inputs come from the hook-driven forward of block 0 (dequantised
    weights in place); they must equal what the finished QuantLinear block 0 computes."""
    seen = []
    Spy = _recording_block_1_inputs(seen)
    model, calib = tiny_model("llama"), _calib()
    run_transforms(model, [Spy(bits=4, granularity="group", group_size=32)], calib=calib, progress=False)
    inputs, kwargs = capture_block_inputs(model, calib, len(calib))
    with torch.no_grad():
        out = model.model.layers[0](inputs[0], **kwargs)
    torch.testing.assert_close(seen[0], out[0] if isinstance(out, tuple) else out, atol=1e-4, rtol=1e-4)


def test_per_layer_bits_from_the_shared_plan():
    model = tiny_model("llama")

    class Plan(GPTQ):
        def plan_model(self, model, adapter, calib, plan):
            plan["bits"] = {"model.layers.0.mlp.down_proj": 8, "model.layers.0.self_attn.k_proj": 2}
            plan["bits_format"] = ("group", 32, True)

    run_transforms(model, [Plan(bits=4, granularity="group", group_size=32)], calib=_calib(), progress=False)
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.weight_spec.bits == 8 and layer.self_attn.k_proj.weight_spec.bits == 2
    assert layer.self_attn.q_proj.weight_spec.bits == 4 and model.model.layers[1].mlp.down_proj.weight_spec.bits == 4


def test_too_little_calibration_raises_dampening_with_a_warning():
    model = tiny_model("llama")
    with pytest.warns(GPTQWarning, match="calibration tokens for .* inputs"):
        run_transforms(model, [GPTQ(bits=4, granularity="group", group_size=32)], calib=_calib(1, 8), progress=False)
    k = 128
    indefinite = torch.eye(k) - 0.05 * torch.ones(k, k)   # one eigenvalue of 1 - 0.05 k < 0
    with pytest.warns(GPTQWarning, match="layer x: .* dampening raised from 0.01 to 10"):
        assert prepare_hessian(indefinite, False, 0.01, "layer x").dampening == pytest.approx(10)
    with pytest.raises(QuantConfigError, match="layer y: the calibration Hessian is singular"):
        prepare_hessian(-torch.eye(k), False, 0.01, "layer y")
    dead_inputs = torch.zeros(k, k)
    dead_inputs[0, 0] = 1.0
    assert prepare_hessian(dead_inputs, True, 0.01).dead.sum() == k - 1


def test_bad_input_names_the_layer():
    with pytest.raises(QuantConfigError, match=r"model.layers.0.self_attn.q_proj: group_size 48 does not divide"):
        run_transforms(tiny_model("llama"), [GPTQ(bits=4, granularity="group", group_size=48)], calib=_calib(),
                       progress=False)
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(QuantConfigError, match=r"model.layers.1.mlp.up_proj: the weight contains NaN"):
        run_transforms(model, [GPTQ()], calib=_calib(), progress=False)
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1e38)
    with pytest.raises(DataError, match=r"model.layers.0.mlp.down_proj: the calibration activations .* NaN or Inf"):
        run_transforms(model, [GPTQ()], calib=_calib(), progress=False)
    with pytest.raises(RecipeError, match="act_order with group quantisation needs static_groups"):
        build_transform("GPTQ", {"granularity": "group", "group_size": 32, "static_groups": False})
    with pytest.raises(RecipeError, match="bits must be"):
        build_transform("GPTQ", {"bits": 9})


def test_compress_save_and_generate(tmp_path, capsys):
    model, tok = tiny_model("llama", seed=1), tiny_tokenizer()
    src = tmp_path / "tiny"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return x * 2\n" * 400)
    out = tmp_path / "gptq"
    assert main(["--quiet", "compress", str(src), "--recipe", "gptq-w4-g64", "--out", str(out), "--calib", str(text),
                 "--calib-samples", "8", "--seqlen", "64"]) == 0
    saved = json.loads((out / "slimformer.json").read_text())
    quant = [m for m in saved["modules"].values() if m["type"] == "QuantLinear"]
    assert quant and all(m["weight"]["bits"] == 4 for m in quant)
    # the recipe's last stage: the tied table to int8, the head reading it
    assert {m["type"] for m in saved["modules"].values()} == {"QuantLinear", "QuantEmbedding", "QuantTiedHead"}
    result = compress((model, tok), "gptq-w4-g64", calib=str(text), calib_samples=8, seqlen=64, progress=False)
    ids = _calib(2, 16)
    from slimformer.models.load import load

    loaded, _ = load(str(out))
    torch.testing.assert_close(_outputs(loaded, ids), _outputs(result.model, ids), atol=1e-5, rtol=1e-5)
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "def f(x):", "--max-new-tokens", "4", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("dynamic", [True, False])
def test_w8a8_activations_quantised_as_the_saved_layer_does(dynamic):
    """With activation quantisation, the one-pass forward feeds each layer fake-quantised
    inputs (as the finished QuantLinear will), and static scales come from that forward."""
    seen = []
    Spy = _recording_block_1_inputs(seen)
    model, calib = tiny_model("llama"), _calib()
    first = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: first.append(a[0].abs().max()))
    stage = Spy(bits=8, act_bits=8, act_granularity="token" if dynamic else "tensor", act_dynamic=dynamic)
    run_transforms(model, [stage], calib=calib, progress=False)
    handle.remove()
    q = model.model.layers[0].self_attn.q_proj
    assert q.act_spec.dynamic == dynamic
    if not dynamic:
        assert q.act_scale.item() == pytest.approx(first[0].item() / 127, rel=1e-4)
    inputs, kwargs = capture_block_inputs(model, calib, len(calib))
    with torch.no_grad():
        out = model.model.layers[0](inputs[0], **kwargs)
    torch.testing.assert_close(seen[0], out[0] if isinstance(out, tuple) else out, atol=1e-4, rtol=1e-4)


def test_cli_bad_input_is_one_line_and_leaves_no_output(tmp_path, capsys):
    model, tok = tiny_model("llama", seed=1), tiny_tokenizer()
    src = tmp_path / "tiny"
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[3, 3] = float("inf")
    model.save_pretrained(src)
    tok.save_pretrained(src)
    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return x * 2\n" * 400)
    common = ["--quiet", "compress", str(src), "--calib", str(text), "--calib-samples", "2", "--seqlen", "16"]
    assert main([*common, "--recipe", "gptq-w4-g64", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]   # (above it: transformers' save progress)
    assert err == "slimformer: error: model.layers.1.self_attn.o_proj: the weight contains NaN or Inf"
    assert not (tmp_path / "a").exists()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[3, 3] = 0.0
    model.save_pretrained(src)
    recipe = tmp_path / "g48.yaml"
    recipe.write_text("stages:\n  - GPTQ: {bits: 4, granularity: group, group_size: 48}\n")
    assert main([*common, "--recipe", str(recipe), "--out", str(tmp_path / "b")]) == 2
    assert "model.layers.0.self_attn.q_proj: group_size 48 does not divide" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    # 2 × 16 calibration tokens for 64 inputs: a warning on one line, and the model is written
    with pytest.warns(GPTQWarning, match=r"model.layers.0.self_attn.q_proj .*rank-deficient"):
        assert main([*common, "--recipe", "gptq-w4-g64", "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "slimformer.json").exists()
    import warnings  # the CLI shows warnings as one line, like its errors

    assert warnings.formatwarning("too few tokens", GPTQWarning, "gptq.py", 1) == "slimformer: warning: too few tokens\n"


def test_per_tensor_scales_stay_per_layer_when_layers_share_an_input():
    model = tiny_model("llama")
    run_transforms(model, [GPTQ(bits=4, granularity="tensor")], calib=_calib(), progress=False)
    attn = model.model.layers[0].self_attn
    scales = [getattr(attn, p).scale.item() for p in ("q_proj", "k_proj", "v_proj")]
    assert len(set(scales)) == 3   # one range per layer, not one over the stacked q|k|v
