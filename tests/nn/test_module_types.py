"""Every registered module type either converts to the native format description (and the
description computes what the module computes) or is refused naming the layer and the reason.

The test iterates the registry: a new type without an example here, or without ``matrix()``
(or a refusal), fails it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from slimformer.formats.spec import ActSpec, WeightSpec
from slimformer.nn import base
from slimformer.nn.base import CompressedLinear, CompressedModule
from slimformer.nn.registry import MODULE_TYPES
from slimformer.plugins import load_builtin
from slimformer.runtime import weights as W

load_builtin()

N, K = 48, 64


def _w(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g), torch.randn(N, generator=g)


def _quant(spec: WeightSpec, act: ActSpec | None = None):
    from slimformer.nn.quant_linear import QuantLinear

    w, b = _w()
    q = QuantLinear.from_float(w, b, spec, act)
    if act is not None and not act.dynamic:
        q.act_scale, q.act_zero = torch.tensor(0.05), torch.tensor(0.0)
    return q


def _sparse():
    from slimformer.nn.sparse import SparseLinear

    w, b = _w(1)
    w[w.abs() < 0.8] = 0
    return SparseLinear.from_weight(w, b, "csr")


def _gobo():
    from slimformer.nn.gobo import GOBOLinear

    g = torch.Generator().manual_seed(2)
    spec = WeightSpec(3, True, "group", 32)
    idx = torch.randint(0, 8, (N, K), generator=g, dtype=torch.uint8)
    cent = torch.randn(N, K // 32, 8, generator=g)
    return GOBOLinear.from_codes(idx, cent, torch.tensor([3, 70]), torch.tensor([5.0, -4.0]), _w()[1], spec)


def _int8_outlier():
    from slimformer.nn.int8_outlier import Int8OutlierLinear

    w, b = _w(3)
    return Int8OutlierLinear.from_float(w, b, torch.tensor([1, 9]), threshold=6.0)


def _peg():
    from slimformer.nn.peg import ActGrid, PEGLinear

    w, b = _w(4)
    group_of = torch.arange(K) % 4
    return PEGLinear.from_float(w, b, group_of, -torch.ones(K) * 3, torch.ones(K) * 3, ActGrid(8))


def _input_scaled(inner: str):
    from slimformer.nn.input_scaled import InputScaledLinear

    w, b = _w(5)
    scale = torch.rand(K, generator=torch.Generator().manual_seed(6)) + 0.5
    if inner == "linear":
        lin = nn.Linear(K, N)
        lin.weight.data, lin.bias.data = w, b
    else:
        lin = _quant(WeightSpec(4, True, "group", 32))
    return InputScaledLinear(lin, scale)


def _act_order():
    from slimformer.nn.act_order import ActOrderLinear

    perm = torch.randperm(K, generator=torch.Generator().manual_seed(7))
    return ActOrderLinear(_quant(WeightSpec(4, False, "group", 32)), perm)


def _hidden_state():
    from slimformer.nn.hidden_state import HiddenStateQuant
    from slimformer.nn.peg import ActGrid

    return HiddenStateQuant(ActGrid(8), "output")


def _embedding(group_size=None):
    from slimformer.nn.quant_embedding import QuantEmbedding

    return QuantEmbedding.from_float(_w(7)[0], group_size)


def _tied_head(group_size=None):
    from slimformer.nn.quant_embedding import QuantTiedHead

    return QuantTiedHead.tie(_embedding(group_size), "model.embed_tokens")


# Small instances of every type, several formats each where the native conversion differs.
EXAMPLES = {
    "QuantLinear": {
        "w4-g32-sym": lambda: _quant(WeightSpec(4, True, "group", 32)),
        "w4-g32-asym": lambda: _quant(WeightSpec(4, False, "group", 32)),
        "w3-g32-asym": lambda: _quant(WeightSpec(3, False, "group", 32)),
        "w4-g16": lambda: _quant(WeightSpec(4, True, "group", 16)),          # dense fallback (gs % 32)
        "w8-channel": lambda: _quant(WeightSpec(8, True, "channel")),
        "w6-g32-asym": lambda: _quant(WeightSpec(6, False, "group", 32)),
        "w8a8": lambda: _quant(WeightSpec(8, True, "channel"), ActSpec(8, True, "token")),
        "w8a8-group": lambda: _quant(WeightSpec(8, True, "group", 32), ActSpec(8, True, "token")),
        "w8a8-static": lambda: _quant(WeightSpec(8, True, "channel"), ActSpec(8, True, "tensor", False)),
    },
    "SparseLinear": {"csr": _sparse},
    "GOBOLinear": {"w3-g32": _gobo},
    "Int8OutlierLinear": {"int8": _int8_outlier},
    "PEGLinear": {"a8-groups": _peg},
    "InputScaledLinear": {"linear": lambda: _input_scaled("linear"), "w4": lambda: _input_scaled("w4")},
    "HiddenStateQuant": {"a8": _hidden_state},
    "ActOrderLinear": {"w4-g32-asym": _act_order},   # dense fallback: no native input permutation
    "QuantEmbedding": {"int8-row": _embedding},
    "QuantTiedHead": {"int8-row": _tied_head, "int8-g32": lambda: _tied_head(32)},
}


def check_native_or_refused(name: str, module: nn.Module) -> str:
    """The contract every registered type keeps with the runtime; returns what happened."""
    assert isinstance(module, CompressedModule), f"{type(module).__name__} does not subclass CompressedModule"
    if not isinstance(module, CompressedLinear):
        with pytest.raises(W.UnsupportedFormat) as err:
            W.from_module(name, module)
        assert name in str(err.value) and module.not_native in str(err.value)
        return "refused"
    x = torch.randn(5, module.in_features, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = module(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            desc = W.from_module(name, module)
        except W.UnsupportedFormat as exc:
            # refused: the message names the layer and why; running it dense would change its results
            assert name in str(exc) and type(module).__name__ in str(exc), str(exc)
            assert not module.dense_equivalent
            with pytest.raises(base.NotNative) as why:
                module.matrix(name)
            assert why.value.reason in str(exc)
            return "refused"
    assert (desc.N, desc.K) == (module.out_features, module.in_features)
    tol = 1e-4 * float(expected.abs().max())
    if desc.fallback is not None:
        # the dense fallback: warned naming the layer and the reason, which the description records
        messages = [str(w.message) for w in caught]
        assert any(name in m and desc.fallback in m for m in messages), messages
        assert module.dense_equivalent
        assert torch.equal(desc.dequantize(), module.dequantized_weight().float())
        torch.testing.assert_close(desc.matmul(x), expected.float(), atol=tol, rtol=1e-4)
        return "dense"
    assert not caught, [str(w.message) for w in caught]
    torch.testing.assert_close(desc.dequantize(), module.dequantized_weight().float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(desc.matmul(x), expected.float(), atol=tol, rtol=1e-4)
    return "native"


CASES = [(t, f) for t in sorted(MODULE_TYPES) for f in (EXAMPLES.get(t) or {None: None})]


@pytest.mark.parametrize("type_name,fmt", CASES)
def test_every_module_type_is_native_or_refused(type_name, fmt):
    if fmt is None:
        pytest.fail(f"module type {type_name} is registered but has no example in EXAMPLES: add one")
    module = EXAMPLES[type_name][fmt]()
    assert type(module) is MODULE_TYPES[type_name]
    check_native_or_refused(f"model.layers.0.{type_name}.{fmt}", module)


def test_what_each_example_becomes():
    got = {f"{t}/{f}": check_native_or_refused(f"layer.{t}.{f}", build())
           for t, fmts in EXAMPLES.items() for f, build in fmts.items()}
    assert got == {
        "QuantLinear/w4-g32-sym": "native", "QuantLinear/w4-g32-asym": "native", "QuantLinear/w3-g32-asym": "native",
        "QuantLinear/w4-g16": "dense", "QuantLinear/w8-channel": "native", "QuantLinear/w6-g32-asym": "native",
        "QuantLinear/w8a8": "native", "QuantLinear/w8a8-group": "native", "QuantLinear/w8a8-static": "refused",
        "SparseLinear/csr": "dense", "GOBOLinear/w3-g32": "dense", "Int8OutlierLinear/int8": "refused",
        "PEGLinear/a8-groups": "refused", "InputScaledLinear/linear": "native", "InputScaledLinear/w4": "dense",
        "HiddenStateQuant/a8": "refused", "ActOrderLinear/w4-g32-asym": "dense",
        "QuantEmbedding/int8-row": "refused",
        "QuantTiedHead/int8-row": "native", "QuantTiedHead/int8-g32": "native",
    }


def test_a_type_without_a_description_fails_the_check():
    class Undescribed(CompressedLinear):
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = K, N
            self.weight = torch.randn(N, K)

        def dequantized_weight(self):
            return self.weight

        def forward(self, x):
            return x @ self.weight.t()

    with pytest.raises(NotImplementedError, match="neither describes itself"):
        check_native_or_refused("layer.undescribed", Undescribed())
    # and registering it without an example fails the registry-wide test
    MODULE_TYPES["Undescribed"] = Undescribed
    try:
        cases = [(t, f) for t in sorted(MODULE_TYPES) for f in (EXAMPLES.get(t) or {None: None})]
        assert ("Undescribed", None) in cases
        with pytest.raises(pytest.fail.Exception, match="Undescribed is registered but has no example"):
            test_every_module_type_is_native_or_refused("Undescribed", None)
    finally:
        del MODULE_TYPES["Undescribed"]


@pytest.mark.parametrize("type_name,fmt", [(t, f) for t, fmts in EXAMPLES.items() for f in fmts
                                           if t not in ("HiddenStateQuant", "QuantEmbedding")])
def test_shards_add_up_or_are_refused(type_name, fmt):
    module = EXAMPLES[type_name][fmt]()
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(11))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            expected = module(x)
            act = getattr(module, "act_spec", None)
            if not module.dense_equivalent and act is None:
                with pytest.raises(base.NotNative):
                    module.shard(0, 2, 0, name="layer")
                return
            rows = torch.cat([module.shard(r, 2, 0)(x) for r in range(2)], dim=-1)
            tol = 1e-4 * float(expected.abs().max())
            torch.testing.assert_close(rows, expected, atol=tol, rtol=1e-4)
            if act is not None and act.dynamic:
                # a per-token scale over half the input is another function: refused
                with pytest.raises(base.NotNative, match="whole input"):
                    module.shard(0, 2, 1, name="layer")
                return
            cols = sum(module.shard(r, 2, 1)(x[:, r * K // 2:(r + 1) * K // 2]) for r in range(2))
    bias = getattr(module, "bias", None)
    torch.testing.assert_close(cols + (0 if bias is None else bias), expected, atol=tol, rtol=1e-4)
