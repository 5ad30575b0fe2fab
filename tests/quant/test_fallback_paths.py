"""Slower paths than asked are cached, recorded on the module (``fallback``) and warned once
per (module type, reason)."""

from __future__ import annotations

import warnings

import pytest
import torch

from slimformer import kernels
from slimformer.formats.spec import ActSpec, WeightSpec
from slimformer.nn import base
from slimformer.nn.int8_outlier import Int8OutlierLinear
from slimformer.nn.quant_linear import QuantLinear


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(base, "_WARNED", set())


def _runtime_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_without_kernels_the_weight_is_dequantised_once_and_warned_once(monkeypatch):
    monkeypatch.setattr(kernels, "kernels_available", lambda: False)
    layers = [QuantLinear.from_float(torch.randn(16, 64), None, WeightSpec(4, True, "group", 32)) for _ in range(2)]
    calls = []
    original = QuantLinear.dequantized_weight
    monkeypatch.setattr(QuantLinear, "dequantized_weight", lambda self: calls.append(1) or original(self))
    x = torch.randn(2, 64)

    def run():
        for q in layers:
            for _ in range(3):
                assert torch.equal(q(x), q.forward_reference(x))

    messages = _runtime_warnings(run)
    assert len([m for m in messages if "kernels unavailable" in m]) == 1      # once per process
    assert all("kernels unavailable" in q.fallback for q in layers)
    assert len(calls) == 2 + 6     # once per layer for the cache; the rest is forward_reference's own
    layers[0].load_state_dict(layers[1].state_dict())                         # new weights: cache dropped
    assert layers[0]._weight is None
    assert torch.equal(layers[0](x), layers[1](x))


@pytest.mark.parametrize("spec,act,reason", [
    (WeightSpec(8, True, "channel"), ActSpec(8, True, "tensor", False), "static activation scales"),
    (WeightSpec(6, True, "group", 32), None, "6-bit group-wise weights have no kernel"),
])
def test_formats_without_a_kernel_say_so_once(spec, act, reason):
    layers = [QuantLinear.from_float(torch.randn(16, 64), None, spec, act) for _ in range(2)]
    x = torch.randn(3, 64)

    def run():
        for q in layers:
            assert torch.equal(q(x), q.forward_reference(x))
            q(x)

    messages = _runtime_warnings(run)
    assert len([m for m in messages if reason in m]) == 1, messages
    assert all(reason in q.fallback for q in layers)
    assert all(q._weight is not None for q in layers)                          # the dense weight is cached


def test_the_fast_paths_have_no_fallback():
    if not kernels.kernels_available():
        pytest.skip("no C++ kernels on this machine")
    for spec in (WeightSpec(4, True, "group", 32), WeightSpec(8, True, "channel")):
        q = QuantLinear.from_float(torch.randn(16, 64), None, spec)
        assert not _runtime_warnings(lambda: q(torch.randn(1, 64))) and q.fallback is None


def test_int8_outlier_without_kernels_says_so_once(monkeypatch):
    monkeypatch.setattr(kernels, "kernels_available", lambda: False)
    layers = [Int8OutlierLinear.from_float(torch.randn(16, 64), None, torch.tensor([2]), 6.0) for _ in range(2)]
    x = torch.randn(3, 64)

    def run():
        for m in layers:
            torch.testing.assert_close(m(x), m.forward_reference(x))

    messages = _runtime_warnings(run)
    assert len([m for m in messages if "Int8OutlierLinear" in m and "kernels unavailable" in m]) == 1
    assert all("kernels unavailable" in m.fallback for m in layers)
