"""Fast kernels against the reference (dequantise + F.linear, or exact int64 for W8A8).

Tolerance: weight-only kernels reorder fp32 sums, so we ask for
``|y - ref| / |ref| <= 1e-4`` (Frobenius norms over the whole output); W8A8 must
equal an exact integer computation up to the final fp32 rescale (1e-6).
The session's cache dir is empty (conftest), so the first test also covers the
one-time g++ build (~3 s).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from slimformer import kernels as K
from slimformer.formats.primitives import fake_quantize_activation, quantize_weight
from slimformer.formats.spec import ActSpec, WeightSpec
from slimformer.kernels import reference as R

RTOL = 1e-4


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def quant(n: int, k: int, bits: int, symmetric: bool, group: int | None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    spec = (WeightSpec(bits, symmetric, "group", group) if group else WeightSpec(bits, symmetric, "channel"))
    codes, scale, zero = quantize_weight(w, spec)
    return codes, scale, (None if symmetric else zero)


def test_kernels_build_here():
    if "CPU lacks" in (K.unavailable_reason() or ""):
        pytest.skip("CPU lacks AVX2/FMA: reference path only")
    assert K.available(), K.unavailable_reason()


INT8_SHAPES = [(576, 576), (192, 576), (1, 64), (7, 96), (33, 100), (5, 3)]


@pytest.mark.parametrize("n,k", INT8_SHAPES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", [1, 3, 6, 9])  # 6: fused 4+2 token chunks; 9: dequant+GEMM
def test_int8_matches_reference(n, k, symmetric, m, isa):
    codes, scale, zero = quant(n, k, 8, symmetric, None)
    packed = K.prepare_int8(codes, scale, zero, 8, symmetric)
    x = torch.randn(m, k)
    bias = torch.randn(n)
    for b in (None, bias):
        ref = R.int8_linear(x, codes, scale, zero, 8, symmetric, b)
        assert rel_err(K.int8_linear(x, packed, b), ref) <= RTOL


@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_prefill_and_batched_input(symmetric, isa):
    codes, scale, zero = quant(1536, 576, 8, symmetric, None)
    packed = K.prepare_int8(codes, scale, zero, 8, symmetric)
    x = torch.randn(2, 256, 576)  # M = 512 → dequantise + fp32 GEMM
    y = K.int8_linear(x, packed)
    assert y.shape == (2, 256, 1536)
    assert rel_err(y, R.int8_linear(x, codes, scale, zero, 8, symmetric)) <= RTOL


def test_int8_lower_bits_and_tiling():
    # 6-bit codes through the int8 kernels; N large enough for several GEMM tiles.
    codes, scale, zero = quant(4096, 576, 6, False, None)
    packed = K.prepare_int8(codes, scale, zero, 6, False)
    for m in (1, 64):
        x = torch.randn(m, 576)
        assert rel_err(K.int8_linear(x, packed), R.int8_linear(x, codes, scale, zero, 6, False)) <= RTOL


INT4_CASES = [  # (n, k, group)
    (576, 576, 32), (576, 576, 64), (192, 768, 128), (576, 576, None),
    (192, 576, 32), (576, 1536, 128), (7, 96, 32), (1, 64, 64), (3, 48, 16), (5, 160, None),
    (5, 192, 48), (4, 144, 48), (9, 112, 16),  # groups of 16 mod 32; rows of K % 32 == 16 (a half block)
]


@pytest.mark.parametrize("n,k,group", INT4_CASES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", [1, 3, 6, 17])
def test_int4_matches_reference(n, k, group, symmetric, m, isa):
    codes, scale, zero = quant(n, k, 4, symmetric, group)
    packed = K.prepare_int4(codes, scale, zero, group, symmetric)
    assert packed.fast
    assert torch.equal(packed.codes(), codes)
    x = torch.randn(m, k)
    bias = torch.randn(n)
    for b in (None, bias):
        ref = R.int4_linear(x, codes, scale, zero, group, symmetric, b)
        assert rel_err(K.int4_linear(x, packed, b), ref) <= RTOL


@pytest.mark.parametrize("group", [32, 64, None])
def test_int4_prefill(group, isa):
    codes, scale, zero = quant(1536, 576, 4, False, group)
    packed = K.prepare_int4(codes, scale, zero, group, False)
    x = torch.randn(512, 576)
    assert rel_err(K.int4_linear(x, packed), R.int4_linear(x, codes, scale, zero, group, False)) <= RTOL


@pytest.mark.parametrize("n,k", [(576, 576), (7, 96), (1, 64), (33, 100), (576, 1536)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", [1, 3, 64])
@pytest.mark.parametrize("int_mm_min_m", [1, 10**9])  # torch._int_mm GEMM / our AVX2 maddubs kernel
def test_w8a8_exact(n, k, symmetric, m, int_mm_min_m, monkeypatch, isa):
    monkeypatch.setattr(K, "W8A8_INT_MM_MIN_M", int_mm_min_m)
    codes, scale, zero = quant(n, k, 8, symmetric, None)
    packed = K.prepare_int8(codes, scale, zero, 8, symmetric)
    x = torch.randn(m, k) * 3
    x[0, 0] = 40.0  # an outlier so per-token scales differ
    bias = torch.randn(n)
    for b in (None, bias):
        exact = R.w8a8_linear(x, codes, scale, zero, 8, symmetric, b)  # int64 accumulation
        y = K.w8a8_linear(x, packed, b)
        torch.testing.assert_close(y, exact, rtol=1e-6, atol=1e-6 * exact.abs().max().item())


def test_w8a8_matches_project_fake_quant():
    """Same activation rounding as the QuantLinear reference (fake-quant + F.linear)."""
    codes, scale, zero = quant(192, 576, 8, True, None)
    packed = K.prepare_int8(codes, scale, zero)
    x = torch.randn(5, 576)
    xq = fake_quantize_activation(x, ActSpec(8, True, "token", True))
    ref = F.linear(xq, R.int8_weight(codes, scale, zero))
    assert rel_err(K.w8a8_linear(x, packed), ref) <= 1e-5


def test_w8a8_zero_input_row():
    codes, scale, zero = quant(16, 64, 8, True, None)
    packed = K.prepare_int8(codes, scale, zero)
    x = torch.zeros(2, 64)
    x[1] = torch.randn(64)
    y = K.w8a8_linear(x, packed)
    assert torch.all(y[0] == 0)
    torch.testing.assert_close(y, R.w8a8_linear(x, codes, scale, zero))


@pytest.mark.parametrize("n,k,group", [(8, 72, 24), (4, 40, None), (3, 20, 10)])
def test_int4_unsupported_shape_warns_and_falls_back(n, k, group):
    codes, scale, zero = quant(n, k, 4, False, group)
    with pytest.warns(RuntimeWarning, match=rf"\({n}, {k}\)"):
        packed = K.prepare_int4(codes, scale, zero, group, False)
    assert not packed.fast
    x = torch.randn(3, k)
    assert rel_err(K.int4_linear(x, packed), R.int4_linear(x, codes, scale, zero, group, False)) <= 1e-6


def test_supported_shapes_do_not_warn():
    codes, scale, zero = quant(7, 96, 4, True, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        packed = K.prepare_int4(codes, scale, zero, 32, True)
        K.int4_linear(torch.randn(1, 96), packed)
        c8, s8, _ = quant(7, 96, 8, True, None)
        K.int8_linear(torch.randn(1, 96), K.prepare_int8(c8, s8, None))


def test_dtype_and_input_checks():
    codes, scale, zero = quant(64, 128, 4, True, 32)
    packed = K.prepare_int4(codes, scale, zero, 32, True)
    x = torch.randn(2, 128)
    y = K.int4_linear(x.bfloat16(), packed)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, R.int4_linear(x.bfloat16(), codes, scale, zero, 32, True)) <= 1e-2
    with pytest.raises(ValueError):
        K.int4_linear(torch.randn(2, 64), packed)
    # Non-contiguous input.
    xt = torch.randn(128, 3).t()
    assert rel_err(K.int4_linear(xt, packed), R.int4_linear(xt, codes, scale, zero, 32, True)) <= RTOL


def test_reference_fallback_when_kernels_unavailable(monkeypatch):
    codes, scale, zero = quant(7, 96, 8, False, None)
    packed = K.prepare_int8(codes, scale, zero, 8, False)
    x = torch.randn(2, 96)
    monkeypatch.setattr(K, "get_lib", lambda: None)
    with pytest.warns(RuntimeWarning, match=r"\(7, 96\)"):
        y = K.int8_linear(x, packed)
    assert rel_err(y, R.int8_linear(x, codes, scale, zero, 8, False)) <= 1e-6
    with pytest.warns(RuntimeWarning):
        y = K.w8a8_linear(x, packed)
    torch.testing.assert_close(y, R.w8a8_linear(x, codes, scale, zero, 8, False))


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("symmetric", [True, False])
def test_low_bit_group_codes_through_int4(bits, symmetric):
    codes, scale, zero = quant(64, 192, bits, symmetric, 32)
    packed = K.prepare_int4(codes, scale, zero, 32, symmetric, bits=bits)
    for m in (1, 5, 20):
        x = torch.randn(m, 192)
        ref = R.int4_linear(x, codes, scale, zero, 32, symmetric, bits=bits)
        assert rel_err(K.int4_linear(x, packed), ref) <= RTOL


def test_int4_rejects_wide_codes():
    codes, scale, zero = quant(4, 64, 8, True, 32)
    with pytest.raises(ValueError, match="unpacked"):
        K.prepare_int4(codes, scale, None, 32, True)


def _fast_forward(module, x):
    """The integration QuantLinear should use (see the kernels' hand-over note);
    in QuantLinear the ``prepare_*`` call belongs in load/from_float, done once."""
    spec, zero = module.weight_spec, (None if module.weight_spec.symmetric else module.zero)
    group = spec.group_size if spec.granularity == "group" else None
    if module.act_spec is not None and module.act_spec.dynamic and module.act_spec.bits == 8 and group is None:
        packed = K.prepare_int8(module.codes(), module.scale, zero, spec.bits, spec.symmetric)
        return K.w8a8_linear(x, packed, module.bias)  # dynamic per-token int8 activations
    if module.act_spec is None and spec.bits <= 4:
        packed = K.prepare_int4(module.codes(), module.scale, zero, group, spec.symmetric, bits=spec.bits)
        return K.int4_linear(x, packed, module.bias)
    if module.act_spec is None and group is None:
        packed = K.prepare_int8(module.codes(), module.scale, zero, spec.bits, spec.symmetric)
        return K.int8_linear(x, packed, module.bias)
    return module(x)  # other formats (8-bit groups, static activations, ...): reference


@pytest.mark.parametrize("spec,act", [
    (WeightSpec(8, True, "channel"), None),
    (WeightSpec(8, False, "channel"), None),
    (WeightSpec(4, False, "group", 32), None),
    (WeightSpec(4, True, "group", 64), None),
    (WeightSpec(4, True, "channel"), None),
    (WeightSpec(8, True, "tensor"), None),
    (WeightSpec(4, False, "tensor"), None),
    (WeightSpec(3, True, "group", 32), None),
    (WeightSpec(6, False, "channel"), None),
    (WeightSpec(8, True, "channel"), ActSpec(8, True, "token", True)),
    (WeightSpec(8, False, "channel"), ActSpec(8, True, "token", True)),
])
def test_matches_quantlinear(spec, act):
    from slimformer.nn.quant_linear import QuantLinear

    lin = torch.nn.Linear(192, 40, bias=True)
    module = QuantLinear.from_float(lin.weight.data, lin.bias.data, spec, act)
    for m in (1, 7, 33):
        x = torch.randn(2, m, 192)
        ref = module(x)
        y = _fast_forward(module, x)
        assert y.shape == ref.shape
        assert rel_err(y, ref) <= (1e-5 if act else RTOL)


def test_w8a8_nan_token_gives_nan_row_like_reference():
    codes, scale, zero = quant(16, 64, 8, True, None)
    packed = K.prepare_int8(codes, scale, zero)
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    y = K.w8a8_linear(x, packed)
    ref = R.w8a8_linear(x, codes, scale, zero)
    assert torch.isnan(ref[1]).all() and torch.isnan(y[1]).all()
    torch.testing.assert_close(y[[0, 2]], ref[[0, 2]])


@pytest.mark.parametrize("n,k,group", [(576, 576, 32), (192, 768, 128), (7, 96, None), (3, 64, 16), (5, 160, 32)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_prepare_int4_q4_takes_the_stored_bytes(n, k, group, symmetric, isa):
    from slimformer.formats.matrix import pack_nibbles

    codes, scale, zero = quant(n, k, 4, symmetric, group)
    stored = pack_nibbles(codes)
    packed = K.prepare_int4_q4(stored, scale, zero, group, symmetric, 4, n, k)
    assert packed.fast and packed.packed.data_ptr() == stored.data_ptr()
    assert torch.equal(K.prepare_int4(codes, scale, zero, group, symmetric).packed, stored)  # one layout
    assert torch.equal(packed.codes(), codes)
    for m in (1, 5, 20):
        x = torch.randn(m, k)
        ref = R.int4_linear(x, codes, scale, zero, group, symmetric)
        assert rel_err(K.int4_linear(x, packed), ref) <= RTOL


def test_prepare_int4_q4_checks_and_falls_back():
    from slimformer.formats.matrix import pack_nibbles

    codes, scale, zero = quant(8, 96, 4, False, 24)
    stored = pack_nibbles(codes)
    with pytest.raises(ValueError, match="Q4 layout"):
        K.prepare_int4_q4(stored, scale, zero, 24, False, 4, 8, 64)
    with pytest.raises(ValueError, match="exceed"):
        K.prepare_int4_q4(stored, scale, zero, 24, False, 2, 8, 96)
    with pytest.warns(RuntimeWarning, match=r"\(8, 96\)"):
        packed = K.prepare_int4_q4(stored, scale, zero, 24, False, 4, 8, 96)
    assert not packed.fast
    x = torch.randn(3, 96)
    assert rel_err(K.int4_linear(x, packed), R.int4_linear(x, codes, scale, zero, 24, False)) <= 1e-6
