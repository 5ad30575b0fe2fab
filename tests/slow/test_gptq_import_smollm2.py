"""GPTQ checkpoint round trip on the real SmolLM2-135M: our GPTQ w4 g32, written in the
AutoGPTQ layout, loads back to the same codes and the same perplexity, and the native
engine decodes it as the Hugging Face path does."""

import sys
from pathlib import Path

import pytest
import torch

import slimformer
from slimformer.api import export
from slimformer.nn.quant_linear import QuantLinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from test_gptq_import import pack_qweight, pack_qzeros  # noqa: E402  (the test's own packer)

pytestmark = pytest.mark.slow


def test_smollm2_gptq_checkpoint_round_trip(tmp_path, shared_data):
    wiki = str(shared_data / "wikitext2" / "wiki.test.raw")
    base = slimformer.load("smollm2-135m")
    ours = slimformer.compress(base, "gptq-w4-g32", calib="pydoc", calib_samples=4, seqlen=128,
                               progress=False).model
    out = export((ours, base[1]), tmp_path / "gptq", "gptq")
    loaded, tok = slimformer.load(out)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        name = "model.layers.0.self_attn.k_proj"          # one layer by the independent packer too
        layer = ours.get_submodule(name)
        assert torch.equal(f.get_tensor(f"{name}.qweight"), pack_qweight(layer.codes().t(), 4))
        zeros = torch.full((layer.in_features // 32, layer.out_features), 8)
        assert torch.equal(f.get_tensor(f"{name}.qzeros"), pack_qzeros(zeros, 4, v1=True))
    for name, module in ours.named_modules():
        if isinstance(module, QuantLinear):
            assert torch.equal(loaded.get_submodule(name).dequantized_weight(), module.dequantized_weight()), name
    a = slimformer.evaluate((ours, tok), wiki, seqlen=512, windows=2, progress=False)
    b = slimformer.evaluate(str(out), wiki, seqlen=512, windows=2, progress=False)
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-6)
    native = slimformer.generate((loaded, tok), ["The capital of France is"], max_new_tokens=16, engine="native")
    hf = slimformer.generate((loaded, tok), ["The capital of France is"], max_new_tokens=16, engine="hf")
    assert native[0].token_ids == hf[0].token_ids
