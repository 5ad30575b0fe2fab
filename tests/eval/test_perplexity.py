import math

import pytest
import torch
import torch.nn.functional as F

from slimformer.data.tokens import eval_windows
from slimformer.eval.perplexity import perplexity
from slimformer.models.tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _direct_nll(model, ids, first):
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    return [F.cross_entropy(logits[t - 1:t], ids[t:t + 1]).item() for t in range(first, ids.numel())]


def test_perplexity_equals_a_direct_computation_from_logits(model):
    stream = torch.randint(0, 300, (200,), generator=torch.Generator().manual_seed(0))
    windows = eval_windows(stream, 64)
    nll = [v for ids, first in windows for v in _direct_nll(model, ids, first)]
    result = perplexity(model, windows, progress=False)
    assert result["tokens"] == len(nll) == 3 * 63
    assert result["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


def test_sliding_windows_score_every_position_once_with_more_context(model):
    stream = torch.randint(0, 300, (160,), generator=torch.Generator().manual_seed(1))
    windows = eval_windows(stream, 64, stride=32)
    scored = []
    for i, (ids, first) in enumerate(windows):
        start = i * 32
        scored.extend(range(start + first, start + 64))
    assert scored == list(range(1, 160))        # each stream position after the first, exactly once
    result = perplexity(model, windows, progress=False)
    assert result["tokens"] == 159


def test_agreement_with_itself_is_perfect(model):
    stream = torch.randint(0, 300, (130,), generator=torch.Generator().manual_seed(2))
    result = perplexity(model, eval_windows(stream, 64), reference=model, progress=False)
    assert result["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["top1_agreement"] == 1.0


def test_agreement_detects_a_different_model(model):
    stream = torch.randint(0, 300, (130,), generator=torch.Generator().manual_seed(3))
    other = tiny_model("llama", seed=5)
    result = perplexity(other, eval_windows(stream, 64), reference=model, progress=False)
    assert result["kl"] > 1e-3 and result["top1_agreement"] < 1.0
