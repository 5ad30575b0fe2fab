"""QuantizeEmbeddings on the real SmolLM2-135M: the tied 49152 x 576 table becomes one int8
copy that the Hugging Face forward (int8 kernel head) and the native decoder both read, and
both generate the same greedy tokens."""

import pytest
import torch

import slimformer
from slimformer.nn.quant_embedding import QuantEmbedding, QuantTiedHead
from slimformer.runtime.generate import Generator

pytestmark = pytest.mark.slow


def test_int8_table_is_shared_saved_once_and_native_equals_hf(tmp_path):
    model, tok = slimformer.load("smollm2-135m")
    recipe = "name: table\nstages:\n  - QuantizeEmbeddings: {granularity: row}\n"
    (tmp_path / "r.yaml").write_text(recipe)
    result = slimformer.compress((model, tok), str(tmp_path / "r.yaml"), out=tmp_path / "m", progress=False)
    q = result.model
    assert isinstance(q.model.embed_tokens, QuantEmbedding) and isinstance(q.lm_head, QuantTiedHead)
    facts = result.run.layers["model.embed_tokens"]
    assert facts["bytes_before"] == 49152 * 576 * 4 and facts["bytes_after"] == 49152 * 576 + 2 * 49152
    loaded, _ = slimformer.load(tmp_path / "m")
    assert loaded.lm_head.embedding is loaded.model.embed_tokens
    gen = Generator.from_model(loaded, tok, engine="native")
    assert gen.engine.describe()["lm_head"] == "int8"
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        ref = loaded.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
    assert gen.generate(prompt, max_new_tokens=16)[0].token_ids == ref.tolist()
