"""QAT on the real SmolLM2-135M deploys exactly: after a few QAT steps the deployed
QuantLinear model (int4 kernels, and forward_reference) gives the fake-quant model's argmax
at every position of a 512-token WikiText-2 window, with the same codes."""

import copy
from pathlib import Path

import pytest
import torch

import slimformer
from slimformer.core.runner import TrainingRun, run_recipe
from slimformer.data import eval_windows, load_text, tokenize
from slimformer.nn.quant_linear import QuantLinear
from slimformer.plugins import load_builtin
from slimformer.techniques.quant.qat import QAT, QATHook
from slimformer.train import TokenBatches, TrainConfig

pytestmark = pytest.mark.slow

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext2"


def test_qat_deploys_with_identical_argmax_on_smollm2(monkeypatch):
    load_builtin()
    model, tok = slimformer.load("smollm2-135m")
    train_ids = tokenize(load_text(str(SHARED / "wiki.valid.tokens"), role="calib"), tok)[:4096]
    window = eval_windows(tokenize(load_text(str(SHARED / "wiki.test.raw")), tok), 512, 1)[0][0]
    kept = {}
    original = QATHook.on_end

    def spy(self, trainer):
        kept["model"] = copy.deepcopy(self.model).eval()
        kept["codes"] = {k: m.quantized()[0] for k, m in self.layers.items()}
        original(self, trainer)

    monkeypatch.setattr(QATHook, "on_end", spy)
    config = TrainConfig(steps=2, batch_size=1, seq_len=128, lr=1e-4, loss="distill")
    run_recipe(model, [QAT(bits=4, granularity="group", group_size=32)], progress=False,
               train=TrainingRun(config, TokenBatches(train_ids, 1, 128)))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 30 * 7
    for name, module in layers.items():
        assert torch.equal(module.codes(), kept["codes"][name]), name
    with torch.inference_mode():
        fake = kept["model"](input_ids=window[None]).logits[0]
        kernel = model(input_ids=window[None]).logits[0]
        for m in layers.values():
            m.forward = m.forward_reference
        reference = model(input_ids=window[None]).logits[0]
    assert torch.equal(kernel.argmax(-1), fake.argmax(-1))
    assert torch.equal(reference.argmax(-1), fake.argmax(-1))
    assert float((reference - fake).abs().max()) < 1e-3
    assert float((kernel - fake).abs().max()) < 0.05   # int4 kernels sum in another order
