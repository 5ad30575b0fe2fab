import pytest

from slimformer.eval.planner import ModelShape, kv_cache_bytes, plan
from slimformer.models.tiny import tiny_model


def test_survey_example_500b_multihead_kv_cache_is_about_3tb_and_3x_weights():
    # Pope et al. (2022), quoted by the survey: a 500B+ model with multi-head attention
    # at batch 512 and context 2048 has ~3 TB of KV cache, ~3x its weights. The shape is
    # PaLM 540B's (118 layers, 48 heads of 256) with multi-head instead of multi-query
    # attention; the quoted figures hold with int8 cache entries and bf16 weights.
    palm_mha = ModelShape(layers=118, hidden=18432, heads=48, kv_heads=48, head_dim=256, params=540_000_000_000)
    p = plan(palm_mha, batch=512, context=2048, weight_bytes_per_param=2, kv_bytes_per_value=1)
    assert p["kv_cache_bytes"] / 1e12 == pytest.approx(3.0, rel=0.05)
    assert p["kv_to_weights"] == pytest.approx(3.0, rel=0.1)
    # multi-query attention (one KV head) shrinks it by the head count
    mqa = ModelShape(118, 18432, 48, 1, 256, 540_000_000_000)
    assert kv_cache_bytes(palm_mha, 512, 2048, 1) == 48 * kv_cache_bytes(mqa, 512, 2048, 1)


def test_shape_from_a_grouped_query_config():
    model = tiny_model("llama")
    shape = ModelShape.from_config(model.config, 1000)
    assert (shape.layers, shape.heads, shape.kv_heads, shape.head_dim) == (2, 4, 2, 16)
    assert kv_cache_bytes(shape, batch=3, context=10, bytes_per_value=2) == 2 * 2 * 2 * 16 * 3 * 10 * 2
