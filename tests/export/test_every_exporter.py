"""Every exporter takes a model compressed the way the built-in 4-bit recipes compress it
(weights in groups of 32, then the QuantizeEmbeddings stage: an int8 tied table and head),
and slimformer.load of the output computes the compressed model's logits."""

from __future__ import annotations

import warnings

import pytest
import torch

import slimformer
from slimformer import api
from slimformer.core.runner import run_transforms
from slimformer.export import exporters
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.nn.quant_embedding import QuantEmbedding, QuantTiedHead
from slimformer.techniques.quant.embedding import QuantizeEmbeddings
from slimformer.techniques.quant.rtn import RTN

FORMATS = ["gguf", "compressed-tensors", "hf", "gptq", "compressed"]
# Q4_1 keeps codes and scales but rounds each offset (-zero * scale) to float16
TOLERANCE = {("gguf", False): 2e-3}


def test_the_list_covers_every_weight_exporter():
    assert set(FORMATS) == set(exporters()) - {"offload"}


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_model_computes_the_compressed_logits(tmp_path, fmt, symmetric):
    model = tiny_model("llama", seed=0)
    run_transforms(model, [RTN(bits=4, granularity="group", group_size=32, symmetric=symmetric),
                           QuantizeEmbeddings()], progress=False)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, QuantTiedHead)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    out = tmp_path / ("model.gguf" if fmt == "gguf" else "model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        api.export((model, tiny_tokenizer()), out, fmt)
        loaded, _ = slimformer.load(out)
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.allclose(got, expected, atol=TOLERANCE.get((fmt, symmetric), 1e-4), rtol=0)
