"""Tensor parallelism: shards reproduce the unsharded layers, 2 processes on loopback
reproduce the single-process model (fp32 logits within 1e-5, identical greedy tokens),
and splits that cannot work fail with one clear line."""

import pytest
import torch
import torch.nn.functional as F

from slimformer.errors import ParallelConfigError
from slimformer.formats.spec import ActSpec, WeightSpec
from slimformer.models.adapters.base import adapter_for
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.nn.quant_linear import QuantLinear
from slimformer.nn.surgery import linear_weight, set_module
from slimformer.runtime.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    greedy_generate,
    plan_tensor_parallel,
    run_tensor_parallel,
    tensor_parallel,
    tp_forward,
    tp_generate_greedy,
)

ATOL = 1e-5   # fp32; the all-reduce only reorders sums

QUANT_CASES = {
    "w4-g16-asym": (WeightSpec(4, False, "group", 16), None),
    "w8-channel-a8-token": (WeightSpec(8, True, "channel"), ActSpec(8, True, "token")),
    "w8-channel-a8-tensor-asym": (WeightSpec(8, True, "channel"), ActSpec(8, False, "tensor")),
    "w3-tensor": (WeightSpec(3, True, "tensor"), None),
}


def quantize(model, wspec, aspec=None):
    """Every block projection as a QuantLinear (RTN), as `slimformer compress` leaves them."""
    adapter = adapter_for(model)
    for block in adapter.get_blocks(model):
        for name in adapter.linears:
            m = block.get_submodule(name)
            set_module(block, name, QuantLinear.from_float(linear_weight(m), m.bias, wspec, aspec))
    return model


def build(family="llama", quant=None, **overrides):
    """Deterministic tiny model (same weights in every process)."""
    model = tiny_model(family, seed=0, **overrides)
    return quantize(model, *QUANT_CASES[quant]) if quant else model


def outputs(model, ids):
    with torch.inference_mode():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _ids(batch=2, seq=12, seed=0):
    return torch.randint(4, 300, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ shards, one process
@pytest.mark.parametrize("quant", [None, *QUANT_CASES])
def test_column_shards_concatenate_to_the_full_layer(quant):
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(48, 64, generator=g), torch.randn(48, generator=g), torch.randn(3, 5, 64, generator=g)
    full = torch.nn.Linear(64, 48)
    full.weight.data, full.bias.data = w, b
    if quant:
        full = QuantLinear.from_float(w, b, *QUANT_CASES[quant])
    ref = full.forward_reference(x) if quant else full(x)
    shards = [ColumnParallelLinear.from_linear(full, r, 3) for r in range(3)]
    assert [s.out_features for s in shards] == [16, 16, 16]
    if quant:   # codes, scales and zero-points sliced: the very same dequantised rows
        whole = torch.cat([s.local.dequantized_weight() for s in shards])
        assert torch.equal(whole, full.dequantized_weight())
        out = torch.cat([s.local.forward_reference(x) for s in shards], dim=-1)
    else:
        out = torch.cat([s(x) for s in shards], dim=-1)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("quant", [None, "w4-g16-asym", "w3-tensor"])
def test_row_shard_partials_sum_to_the_full_layer(quant):
    g = torch.Generator().manual_seed(1)
    w, b, x = torch.randn(24, 64, generator=g), torch.randn(24, generator=g), torch.randn(3, 5, 64, generator=g)
    full = QuantLinear.from_float(w, b, *QUANT_CASES[quant]) if quant else _linear(w, b)
    ref = full.forward_reference(x) if quant else F.linear(x, w, b)
    shards = [RowParallelLinear.from_linear(full, r, 2) for r in range(2)]
    if quant:
        whole = torch.cat([s.local.dequantized_weight() for s in shards], dim=1)
        assert torch.equal(whole, full.dequantized_weight())
    partial = sum(s.local.forward_reference(x[..., 32 * r: 32 * (r + 1)]) if quant else s.partial(x[..., 32 * r: 32 * (r + 1)])
                  for r, s in enumerate(shards))
    # bias added once, after the (here simulated) reduce
    torch.testing.assert_close(partial + shards[0].bias, ref, atol=ATOL, rtol=0)


def _linear(w, b):
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    lin.weight.data, lin.bias.data = w.clone(), b.clone()
    return lin


def test_gqa_split_gives_each_rank_whole_heads_and_their_kv_heads():
    model = build()   # 4 query heads, 2 KV heads, head_dim 16
    plan = plan_tensor_parallel(model, 2)
    assert (plan.local_heads, plan.local_kv_heads, plan.kv_replicated) == (2, 1, False)
    assert plan.query_rows(1).tolist() == list(range(32, 64))
    assert plan.kv_rows(1).tolist() == list(range(16, 32))
    wide = plan_tensor_parallel(model, 4)   # more ranks than KV heads: each keeps its group's KV head
    assert wide.kv_replicated and [wide.kv_rows(r)[0].item() for r in range(4)] == [0, 0, 16, 16]

    q_full = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    tensor_parallel(model, rank=1, world_size=2)
    attn = model.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.local.weight, q_full[32:64])
    assert attn.k_proj.out_features == 16 and attn.o_proj.in_features == 32
    assert attn.num_key_value_groups == 2
    assert model.model.layers[1].mlp.down_proj.in_features == 64
    with pytest.raises(ParallelConfigError, match="already split"):
        tensor_parallel(model, rank=0, world_size=2)


@pytest.mark.parametrize("overrides, world_size, match", [
    ({}, 3, r"world size 3 does not divide the 4 attention heads \(llama, self_attn.q_proj\)"),
    ({"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 3}, 2,
     r"world size 2 does not divide the 3 key/value heads"),
    ({"intermediate_size": 129}, 2, r"world size 2 does not divide the MLP intermediate size 129"),
])
def test_world_size_that_does_not_divide_is_a_clear_error(overrides, world_size, match):
    with pytest.raises(ParallelConfigError, match=match) as info:
        tensor_parallel(build(**overrides), rank=0, world_size=world_size)
    assert "\n" not in str(info.value)


def test_quant_group_crossing_the_split_is_a_clear_error():
    model = quantize(build(), WeightSpec(4, True, "group", 64))   # o_proj: 64 inputs, split at 32
    with pytest.raises(ParallelConfigError, match=r"model.layers.0.self_attn.o_proj: .*64-column quantisation groups"):
        tensor_parallel(model, rank=0, world_size=2)


def test_without_a_process_group_the_rank_must_be_given():
    with pytest.raises(ParallelConfigError, match="not initialised"):
        tensor_parallel(build())


# ------------------------------------------------------------------ 2 processes, loopback
def _rank_checks(ids: torch.Tensor, new_tokens: int) -> dict:
    """In each rank: every family and quantised format split over the process group."""
    import torch.distributed as dist

    cases = {"llama": {}, "llama-bias": {"attention_bias": True, "mlp_bias": True},
             "opt": {"family": "opt"}, "gpt2": {"family": "gpt2"}, "bert": {"family": "bert"},
             **{q: {"quant": q} for q in QUANT_CASES}}
    out = {k: outputs(tensor_parallel(build(**kw)), ids) for k, kw in cases.items()}
    out["tokens"] = greedy_generate(tensor_parallel(build()), ids[:1, :6], new_tokens)
    out["threads"] = torch.get_num_threads()
    out["world"] = dist.get_world_size()
    return out


@pytest.fixture(scope="module")
def tp_results():
    ids = _ids()
    return ids, run_tensor_parallel(_rank_checks, 2, ids, 10)


def test_two_processes_match_one_for_every_family(tp_results):
    ids, res = tp_results
    assert res["world"] == 2 and res["threads"] == max(1, torch.get_num_threads() // 2)
    for family in ("llama", "opt", "gpt2", "bert"):
        torch.testing.assert_close(res[family], outputs(build(family), ids), atol=ATOL, rtol=0, msg=family)
    torch.testing.assert_close(res["llama-bias"], outputs(build(attention_bias=True, mlp_bias=True), ids),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("quant", list(QUANT_CASES))
def test_two_processes_match_one_for_quantised_models(tp_results, quant):
    ids, res = tp_results
    ref = build(quant=quant)
    # the definition (dequantise, fake-quantise activations, F.linear) in every layer
    for m in ref.modules():
        if isinstance(m, QuantLinear):
            m.forward = m.forward_reference
    torch.testing.assert_close(res[quant], outputs(ref, ids), atol=1e-4, rtol=0)


def test_two_processes_generate_the_same_greedy_tokens(tp_results):
    ids, res = tp_results
    model = build()
    model.generation_config.eos_token_id = None   # fixed length, like greedy_generate
    with torch.inference_mode():
        ref = model.generate(ids[:1, :6], max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert res["tokens"].shape == (1, 16)
    assert torch.equal(res["tokens"], ref)


def test_tp_forward_and_generate_load_a_saved_model(tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    ids = _ids(seed=3)
    torch.testing.assert_close(tp_forward(str(tmp_path), ids, 2), outputs(model, ids), atol=ATOL, rtol=0)
    assert torch.equal(tp_generate_greedy(str(tmp_path), ids[:, :5], 4, 2), greedy_generate(model, ids[:, :5], 4))


def _fails_in_rank() -> None:
    tensor_parallel(build())   # 4 heads over 3 ranks


def test_an_error_in_a_rank_reaches_the_caller():
    with pytest.raises(ParallelConfigError, match="world size 3 does not divide the 4 attention heads"):
        run_tensor_parallel(_fails_in_rank, 3)


# ------------------------------------------------------------------ real model
@pytest.mark.slow
def test_smollm2_splits_over_three_processes_not_two(tmp_path):
    from safetensors.torch import save_model

    from slimformer.models.load import load

    model, tokenizer = load("smollm2-135m")
    with pytest.raises(ParallelConfigError, match="world size 2 does not divide the 9 attention heads"):
        tensor_parallel(model, rank=0, world_size=2)   # checked before anything is replaced
    ids = tokenizer("Tensor parallelism splits every block across processes.", return_tensors="pt").input_ids
    ref = outputs(model, ids)
    # a safetensors directory is far faster for three ranks to read than the GGUF
    # (and save_pretrained refuses a GGUF-loaded model)
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    save_model(model, str(tmp_path / "model.safetensors"))
    del model
    got = tp_forward(str(tmp_path), ids, 3)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=0)
    assert torch.equal(got[0, -1].argmax(), ref[0, -1].argmax())
