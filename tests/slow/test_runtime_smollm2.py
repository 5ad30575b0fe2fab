"""The native runtime on the real SmolLM2-135M: greedy equals Hugging Face, the GGUF's own
blocks decode to exactly the weights transformers dequantises, and perplexity matches."""

import math

import pytest
import torch
import torch.nn.functional as F

import slimformer
from slimformer.data import eval_windows, load_text, tokenize
from slimformer.runtime.decoder import NativeDecoder, gguf_source_path
from slimformer.runtime.generate import Generator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return slimformer.load("smollm2-135m")


@pytest.fixture(scope="module")
def gguf_decoder(smollm2):
    return NativeDecoder.from_model(smollm2[0], gguf_path=gguf_source_path("smollm2-135m"))


def test_greedy_generation_identical_to_hf(smollm2):
    model, tok = smollm2
    gen = Generator.from_model(model, tok, engine="native")
    for prompt in ["The capital of France is", "def fibonacci(n):"]:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            ref = model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:]
        assert gen.generate(prompt, max_new_tokens=32)[0].token_ids == ref.tolist()  # both stop at EOS


def test_gguf_blocks_are_the_dequantised_weights(smollm2, gguf_decoder):
    model = smollm2[0]
    assert gguf_decoder.describe()["layers"] == ["int4"] and gguf_decoder.describe()["lm_head"] == "int8"
    for block, layer in zip(model.model.layers, gguf_decoder.layers):
        a = block.self_attn
        assert torch.equal(layer.qkv.dequantize(), torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        assert torch.equal(layer.o.dequantize(), a.o_proj.weight)
        assert torch.equal(layer.gate_up.dequantize(), torch.cat([block.mlp.gate_proj.weight, block.mlp.up_proj.weight]))
        assert torch.equal(layer.down.dequantize(), block.mlp.down_proj.weight)
    assert torch.equal(gguf_decoder.lm_head.dequantize(), model.lm_head.weight)
    # ~5 bits per weight in the layers, ~8.5 in the head: well under a third of fp32
    assert gguf_decoder.weight_bytes_per_token() < 0.25 * NativeDecoder.from_model(model).weight_bytes_per_token()


def _ppl(logits_of, windows) -> float:
    nll, n = 0.0, 0
    for ids, first in windows:
        logits = logits_of(ids)
        nll += F.cross_entropy(logits[first - 1:-1].float(), ids[first:], reduction="sum").item()
        n += len(ids) - first
    return math.exp(nll / n)


def test_gguf_runtime_perplexity_equals_dequantised_model(smollm2, gguf_decoder):
    model, tok = smollm2
    windows = eval_windows(tokenize(load_text("pydoc"), tok), 256, 3)
    with torch.inference_mode():
        ref = _ppl(lambda ids: model(ids[None]).logits[0], windows)
    got = _ppl(gguf_decoder.forward_logits, windows)
    assert abs(got - ref) / ref < 1e-4, (got, ref)
