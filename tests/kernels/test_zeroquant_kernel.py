"""The group-wise W8A8 kernels (ZeroQuant's format) against the definitions.

- QuantLinear.forward_reference (fake-quantise x per token, dequantise W, F.linear):
  equal up to fp32 summation order (relative error <= 1e-5), for every path: the
  fused kernel with AVX2 and with AVX-512 VNNI where the CPU has it, and the large-M
  path (tokens quantised once, one torch._int_mm per group).
- The integers: with power-of-two group scales and integer tokens whose scale is
  exactly 1, every float operation after the integer dot products is exact, so the
  output must equal an int64 computation bit for bit — any lost or saturated
  product (maddubs overflow, a wrong offset, a dropped remainder) shows.
- The kernel's activation codes equal the reference quantiser's, ties included.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from slimformer import kernels as K
from slimformer.formats.spec import ActSpec, WeightSpec
from slimformer.kernels import reference as R
from slimformer.nn.quant_linear import QuantLinear

pytestmark = pytest.mark.skipif(not K.kernels_available(), reason=f"kernels unavailable: {K.load_error()}")

TOKEN_A8 = ActSpec(8, True, "token", True)


ISAS = ["avx2", "vnni"] if K.zq_isa() == "vnni" else ["avx2"]
PATHS = [(isa, "fused") for isa in ISAS] + [("avx2", "int_mm")] + ([("vnni", "int_mm")] if "vnni" in ISAS else [])


@pytest.fixture(params=PATHS, ids=lambda p: f"{p[0]}-{p[1]}")
def path(request, monkeypatch):
    """One code path: the fused kernel for one instruction set, or per-group _int_mm."""
    isa, route = request.param
    large = 1 if route == "int_mm" else None
    monkeypatch.setattr(K, "ZQ_INT_MM_MIN_M", {"avx2": large, "vnni": large})
    return isa


def _layer(n: int, k: int, group: int, bits: int = 8, bias: bool = True, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g) * 0.05
    weight[:, 5] *= 20  # an outlier input column: its group gets a larger scale
    b = torch.randn(n, generator=g) if bias else None
    return QuantLinear.from_float(weight, b, WeightSpec(bits, True, "group", group), TOKEN_A8)


def _tokens(m: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 1, m)[:, None]  # per-token ranges differ
    x[0, 0] = 40.0
    return x


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


CASES = [(k, group) for k in (64, 576, 1536) for group in (32, 64, 128) if k % group == 0]


@pytest.mark.parametrize("k,group", CASES)
@pytest.mark.parametrize("m", [1, 3, 8, 37, 512])
def test_matches_quant_linear_reference(path, k, group, m):
    layer = _layer(97, k, group)
    packed = K.prepare_w8a8_groups(layer.codes(), layer.scale, group, isa=path)
    x = _tokens(m, k)
    ref = layer.forward_reference(x)
    y = K.w8a8_group_linear(x, packed, layer.bias)
    assert y.shape == (m, 97)
    assert _rel(y, ref) <= 1e-5


def _exact_case(n: int, k: int, group: int, m: int, isa: str, seed: int = 0):
    """Integer weights (with -128) and tokens (each holding ±127, so its scale is 1.0),
    power-of-two group scales: the expected output is an exact int64 computation."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int64)
    q[0, :8] = -128
    q[-1, -8:] = 127
    G = k // group
    scale = 2.0 ** (torch.arange(n * G).reshape(n, G) % 5 - 2)  # 0.25 .. 4
    x = torch.randint(-126, 127, (m, k), generator=g).float()
    x[:, 3] = torch.where(torch.arange(m) % 2 == 0, 127.0, -127.0)
    per_group = torch.einsum("mgk,ngk->mng", x.long().reshape(m, G, group), q.reshape(n, G, group))  # int64
    exact = (per_group.double() * scale.double()).sum(-1)
    packed = K.prepare_w8a8_groups((q + 128).to(torch.uint8), scale.half(), group, isa=isa)
    return x, packed, exact


@pytest.mark.parametrize("k,group", [(576, 64), (1536, 32), (1536, 128), (64, 64), (96, 48), (80, 16), (40, 8), (36, 6)])
@pytest.mark.parametrize("m", [1, 3, 8, 37, 512])
def test_group_integer_sums_are_exact(path, k, group, m, isa):
    if path == "vnni" and isa != "avx512":
        pytest.skip("the VNNI kernel is chosen only with the avx512 instruction set")
    x, packed, exact = _exact_case(33, k, group, m, path)
    assert exact.abs().max() < 2**22  # the float sums of these integers are exact too
    y = K.w8a8_group_linear(x, packed)
    assert torch.equal(y.double(), exact)


def test_activation_codes_equal_the_reference_quantiser():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 100, generator=g) * torch.logspace(-8, 4, 40)[:, None]
    x[1] = 0.0                                   # zero token: scale clamps to 1e-12, codes 0
    x[2] = torch.arange(100) - 49.5              # absmax 50.5
    x[3, :] = 127.0
    x[3, 1:60] = torch.arange(59) + 0.5          # exact ties: x / 1.0 = k + 0.5, half to even
    x[4] = 1e-13                                 # below the scale floor
    codes, scales = K.quantize_tokens_int8(x)
    ref_codes, ref_scales = R.quantize_activation_per_token(x)
    assert torch.equal(codes.long(), ref_codes.long())
    assert torch.equal(scales, ref_scales.reshape(-1))
    assert codes[3, 1:6].tolist() == [0, 2, 2, 4, 4]  # 0.5, 1.5, 2.5, 3.5, 4.5: ties to even


def test_zero_tokens_give_bias_and_nan_tokens_give_nan_rows(path):
    layer = _layer(19, 128, 32)
    packed = K.prepare_w8a8_groups(layer.codes(), layer.scale, 32, isa=path)
    x = _tokens(6, 128)
    x[2] = 0.0
    x[4, 7] = float("nan")
    x[5, 9] = float("inf")
    y = K.w8a8_group_linear(x, packed, layer.bias)
    ref = layer.forward_reference(x)
    assert torch.equal(y[2], layer.bias)
    assert torch.isnan(y[4]).all() and torch.isnan(y[5]).all()
    assert torch.isnan(ref[4]).all() and torch.isnan(ref[5]).all()
    finite = [0, 1, 2, 3]
    assert _rel(y[finite], ref[finite]) <= 1e-5


@pytest.mark.parametrize("bits", [4, 6])
def test_lower_bit_symmetric_weights(path, bits):
    layer = _layer(65, 192, 64, bits=bits)
    packed = K.prepare_w8a8_groups(layer.codes(), layer.scale, 64, bits=bits, isa=path)
    assert torch.equal(packed.codes(), layer.codes())  # VNNI: the interleaved layout, read back
    assert (packed.q is None) == (path == "vnni")       # one copy of the weights
    for m in (1, 9, 70):
        x = _tokens(m, 192)
        assert _rel(K.w8a8_group_linear(x, packed, layer.bias), layer.forward_reference(x)) <= 1e-5


def test_batched_input_dtypes_and_non_contiguous():
    layer = _layer(31, 256, 64)
    packed = K.prepare_w8a8_groups(layer.codes(), layer.scale, 64)
    x = torch.randn(2, 5, 256)
    y = K.w8a8_group_linear(x, packed, layer.bias)
    assert y.shape == (2, 5, 31)
    assert _rel(y, layer.forward_reference(x)) <= 1e-5
    xt = torch.randn(256, 3).t()
    assert _rel(K.w8a8_group_linear(xt, packed), layer.forward_reference(xt) - layer.bias) <= 1e-5
    yb = K.w8a8_group_linear(x.bfloat16(), packed, layer.bias)
    assert yb.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        K.w8a8_group_linear(torch.randn(2, 128), packed)


def test_quant_linear_runs_this_kernel():
    layer = _layer(40, 128, 32)
    x = _tokens(5, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        y = layer(x)
    kernel, packed = layer._runtime
    assert kernel is K.w8a8_group_linear and isinstance(packed, K.PackedInt8Groups)
    assert _rel(y, layer.forward_reference(x)) <= 1e-5
    assert torch.equal(packed.dequantize(), layer.dequantized_weight())


def test_without_int_mm_large_m_uses_the_fused_kernel(monkeypatch):
    monkeypatch.setattr(K, "ZQ_INT_MM_MIN_M", {"avx2": 1, "vnni": 1})
    monkeypatch.setattr(K, "_INT_MM_OK", False)  # as on a torch without a CPU _int_mm
    layer = _layer(50, 192, 64)
    packed = K.prepare_w8a8_groups(layer.codes(), layer.scale, 64)
    x = _tokens(300, 192)
    assert _rel(K.w8a8_group_linear(x, packed, layer.bias), layer.forward_reference(x)) <= 1e-5


def test_reference_fallback_when_kernels_unavailable(monkeypatch):
    layer = _layer(7, 96, 32)
    packed = K.prepare_w8a8_groups(layer.codes(), layer.scale, 32)
    x = _tokens(4, 96)
    monkeypatch.setattr(K, "get_lib", lambda: None)
    with pytest.warns(RuntimeWarning, match=r"\(7, 96\)"):
        y = K.w8a8_group_linear(x, packed, layer.bias)
    assert _rel(y, layer.forward_reference(x)) <= 1e-6


def test_prepare_rejects_bad_shapes():
    layer = _layer(8, 64, 32)
    with pytest.raises(ValueError, match="does not divide"):
        K.prepare_w8a8_groups(layer.codes(), layer.scale, 48)
    with pytest.raises(ValueError, match="group scales"):
        K.prepare_w8a8_groups(layer.codes(), layer.scale[:, :1], 32)
