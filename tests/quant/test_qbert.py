"""Q-BERT per-head groups: one scale per head's rows / columns (GQA and fused q|k|v too),
lower error than per-tensor when heads differ in range, runs and saves/loads."""

import json
import warnings

import pytest
import torch

import slimformer
from slimformer import api
from slimformer.cli import main
from slimformer.core.runner import run_transforms
from slimformer.errors import QuantConfigError
from slimformer.formats.primitives import fake_quantize_weight
from slimformer.formats.spec import WeightSpec
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.nn.quant_linear import QuantLinear
from slimformer.nn.surgery import linear_weight
from slimformer.techniques.quant.qbert import (
    QBERT,
    quantize_column_groups,
    quantize_row_groups,
)
from slimformer.techniques.quant.rtn import RTN


def _group_values(scale: torch.Tensor, groups: int, axis: str) -> list[torch.Tensor]:
    """The stored scales of each group: rows of ``[out, 1]`` or columns of ``[out, groups]``."""
    if axis == "rows":
        return list(scale.float().reshape(-1).tensor_split(groups))
    return [scale.float()[:, g] for g in range(groups)]


def _assert_one_scale_per_group(module: QuantLinear, groups: int, axis: str, weight: torch.Tensor):
    parts = _group_values(module.scale, groups, axis)
    assert len(parts) == groups
    for g, values in enumerate(parts):
        assert torch.all(values == values[0]), f"group {g} has several scales"
        # the scale covers the whole group: max |w| of the group / qmax, rounded up to float16
        block = weight.tensor_split(groups)[g] if axis == "rows" else weight.reshape(weight.shape[0], groups, -1)[:, g]
        assert values[0] >= block.abs().max() / module.weight_spec.qmax
        assert values[0] <= block.abs().max() / module.weight_spec.qmax * (1 + 2**-10)


def test_every_row_and_column_of_a_head_shares_one_scale_with_gqa():
    model, original = tiny_model("llama"), tiny_model("llama")   # 4 query heads, 2 key/value heads, head_dim 16
    run_transforms(model, [QBERT(bits=4)], progress=False)
    for i, (block, source) in enumerate(zip(model.model.layers, original.model.layers)):
        expected = {"self_attn.q_proj": (4, "rows"), "self_attn.k_proj": (2, "rows"), "self_attn.v_proj": (2, "rows"),
                    "self_attn.o_proj": (4, "columns"), "mlp.gate_proj": (4, "rows"), "mlp.up_proj": (4, "rows"),
                    "mlp.down_proj": (4, "rows")}
        for name, (groups, axis) in expected.items():
            module = block.get_submodule(name)
            assert isinstance(module, QuantLinear), name
            _assert_one_scale_per_group(module, groups, axis, source.get_submodule(name).weight.detach())
        assert block.self_attn.o_proj.weight_spec.group_size == 16
        assert block.self_attn.k_proj.out_features == 2 * 16


def test_sub_groups_and_ffn_groups():
    model, original = tiny_model("llama"), tiny_model("llama")
    run_transforms(model, [QBERT(bits=4, sub_groups=2, ffn_groups=8)], progress=False)
    block, source = model.model.layers[0], original.model.layers[0]
    for name, groups, axis in [("self_attn.q_proj", 8, "rows"), ("self_attn.v_proj", 4, "rows"),
                               ("self_attn.o_proj", 8, "columns"), ("mlp.up_proj", 8, "rows")]:
        _assert_one_scale_per_group(block.get_submodule(name), groups, axis, source.get_submodule(name).weight.detach())
    assert block.self_attn.o_proj.weight_spec.group_size == 8


def test_ffn_groups_need_not_divide_the_rows():
    model, original = tiny_model("llama"), tiny_model("llama")
    run_transforms(model, [QBERT(bits=4, ffn_groups=3)], progress=False)      # 128 rows: 43 + 43 + 42
    block, source = model.model.layers[0], original.model.layers[0]
    _assert_one_scale_per_group(block.mlp.up_proj, 3, "rows", source.mlp.up_proj.weight.detach())
    assert len(set(block.mlp.up_proj.scale.flatten().tolist())) == 3
    _, scale, _ = quantize_row_groups(torch.randn(10, 4), 4, 4, equal=False)   # sizes 3, 3, 2, 2
    assert [len(set(part.tolist())) for part in scale.flatten().tensor_split(4)] == [1, 1, 1, 1]
    with pytest.raises(QuantConfigError, match="do not divide"):
        quantize_row_groups(torch.randn(10, 4), 4, 4)


def test_fused_qkv_of_gpt2_has_one_group_per_head_of_q_k_and_v():
    model, original = tiny_model("gpt2"), tiny_model("gpt2")     # c_attn: [64 → 192], 4 heads of 16
    run_transforms(model, [QBERT(bits=4)], progress=False)
    c_attn = model.transformer.h[0].attn.c_attn
    _assert_one_scale_per_group(c_attn, 12, "rows", linear_weight(original.transformer.h[0].attn.c_attn).detach())
    _assert_one_scale_per_group(model.transformer.h[0].attn.c_proj, 4, "columns",
                                linear_weight(original.transformer.h[0].attn.c_proj).detach())


def _relative_error_per_head(approx, exact, heads, axis):
    split = (lambda w: w.reshape(heads, -1)) if axis == "rows" else (lambda w: w.T.reshape(heads, -1))
    return (split(approx) - split(exact)).norm(dim=1) / split(exact).norm(dim=1)


def test_per_head_groups_beat_per_tensor_when_head_ranges_differ():
    g = torch.Generator().manual_seed(0)
    heads, head_dim, hidden = 4, 16, 64
    ranges = torch.tensor([1.0, 10.0, 0.3, 3.0])                 # heads differ by 10× and more
    per_head_rows = (torch.randn(heads, head_dim, hidden, generator=g) * ranges[:, None, None]).reshape(-1, hidden)
    per_head_columns = (torch.randn(hidden, heads, head_dim, generator=g) * ranges[None, :, None]).reshape(hidden, -1)
    for weight, quantize, axis in [(per_head_rows, quantize_row_groups, "rows"),
                                   (per_head_columns, quantize_column_groups, "columns")]:
        codes, scale, spec = quantize(weight, 4, heads)
        per_head = QuantLinear.from_float(weight, None, spec, codes=codes, scale=scale,
                                          zero=torch.zeros_like(scale)).dequantized_weight()
        per_tensor = fake_quantize_weight(weight, WeightSpec(4, True, "tensor"))
        ours = _relative_error_per_head(per_head, weight, heads, axis)
        baseline = _relative_error_per_head(per_tensor, weight, heads, axis)
        # the widest head has the same scale either way; every other head gains
        assert torch.all(ours <= baseline * (1 + 1e-6)), axis
        assert ours.mean() < 0.5 * baseline.mean(), axis
        assert (per_head - weight).norm() < (per_tensor - weight).norm(), axis


def test_codes_are_rtn_against_the_group_scale():
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    codes, scale, _ = quantize_row_groups(weight, 3, 4)
    q = torch.round(weight / scale).clamp(-4, 3)
    assert torch.equal(codes.long() - 4, q.long())
    assert codes.max() <= 7


def test_one_row_per_sub_group_is_rtn_per_channel():
    model, reference = tiny_model("llama"), tiny_model("llama")
    run_transforms(model, [QBERT(bits=4, sub_groups=16)], progress=False)         # head_dim 16: groups of 1 row
    run_transforms(reference, [RTN(bits=4, granularity="channel")], progress=False)
    for name in ("q_proj", "k_proj", "v_proj"):
        ours, rtn = getattr(model.model.layers[1].self_attn, name), getattr(reference.model.layers[1].self_attn, name)
        assert torch.equal(ours.qweight, rtn.qweight) and torch.equal(ours.scale, rtn.scale), name


def test_saved_decoder_generates_with_the_native_engine(tmp_path):
    out = tmp_path / "model"
    api.compress((tiny_model("llama"), tiny_tokenizer()), "qbert-w4", out, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["generate", str(out), "--prompt", "def f(x):", "--max-new-tokens", "4", "--ignore-eos",
                     "--json", str(tmp_path / "g.json")]) == 0
    # (head_dim 16 is below the native int4 layout's 32-column groups: o_proj may run dequantised)
    assert not any("Hugging Face engine" in str(w.message) for w in caught)
    assert json.loads((tmp_path / "g.json").read_text())["engine"] == "native"


def test_compressed_model_runs_and_saves_loads(tmp_path):
    out = tmp_path / "model"
    result = api.compress((tiny_model("bert"), tiny_tokenizer()), "qbert-w4", out, progress=False)
    loaded, _ = slimformer.load(out)
    ids = torch.randint(4, 300, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = result.model(input_ids=ids).last_hidden_state
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, expected)
        reference = tiny_model("bert")(input_ids=ids).last_hidden_state
    assert not torch.equal(expected, reference)
    assert torch.nn.functional.cosine_similarity(expected.flatten(), reference.flatten(), dim=0) > 0.98
    assert isinstance(loaded.encoder.layer[1].attention.output.dense, QuantLinear)


def test_groups_that_do_not_divide_name_the_layer():
    with pytest.raises(QuantConfigError, match=r"model\.layers\.0\.self_attn\.q_proj: 12 row groups .* 3 sub_groups"):
        run_transforms(tiny_model("llama"), [QBERT(bits=4, sub_groups=3)], progress=False)
    with pytest.raises(QuantConfigError, match=r"model\.layers\.0\.mlp\.down_proj: 100 row groups .*ffn_groups"):
        run_transforms(tiny_model("llama"), [QBERT(bits=4, ffn_groups=100)], progress=False)   # down_proj: 64 rows
    with pytest.raises(QuantConfigError, match="bits"):
        QBERT(bits=9)
