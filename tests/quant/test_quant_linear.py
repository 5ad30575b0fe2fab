import pytest
import torch
import torch.nn.functional as F

from slimformer.formats.primitives import fake_quantize_activation, fake_quantize_weight
from slimformer.formats.spec import ActSpec, WeightSpec
from slimformer.nn.quant_linear import QuantLinear


@pytest.mark.parametrize("spec", [WeightSpec(8, True, "channel"), WeightSpec(4, True, "group", 16),
                                  WeightSpec(3, False, "group", 32), WeightSpec(2, False, "tensor"),
                                  WeightSpec(5, True, "channel")])
def test_quant_linear_equals_the_fake_quantised_reference(spec):
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(24, 64, generator=g), torch.randn(24, generator=g), torch.randn(3, 7, 64, generator=g)
    q = QuantLinear.from_float(w, b, spec)
    expected = F.linear(x, fake_quantize_weight(w, spec), b)
    torch.testing.assert_close(q.forward_reference(x), expected, atol=1e-5, rtol=1e-5)
    # the kernel path (summation order differs): within 1e-4 of the output's scale
    torch.testing.assert_close(q(x), expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4)
    # real packed bytes: bits per weight, plus scales (and zeros) per group
    assert q.qweight.numel() == 24 * 64 * spec.bits // 8


def test_w8a8_quantises_the_input_too():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(8, 32, generator=g), torch.randn(5, 32, generator=g)
    wspec, aspec = WeightSpec(8, True, "channel"), ActSpec(8, True, "token")
    q = QuantLinear.from_float(w, None, wspec, aspec)
    expected = F.linear(fake_quantize_activation(x, aspec), fake_quantize_weight(w, wspec))
    torch.testing.assert_close(q.forward_reference(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q(x), expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4)
    assert not torch.allclose(q(x), F.linear(x, fake_quantize_weight(w, wspec)), atol=1e-6)


def test_config_round_trip_rebuilds_the_same_module():
    q = QuantLinear.from_float(torch.randn(8, 32), torch.randn(8), WeightSpec(4, False, "group", 8), ActSpec(8))
    clone = QuantLinear.from_config(q.config())
    clone.load_state_dict(q.state_dict())
    x = torch.randn(2, 32)
    assert torch.equal(clone(x), q(x))


def test_asymmetric_4bit_g32_stores_five_bits_per_weight_like_q4_1():
    q = QuantLinear.from_float(torch.randn(64, 128), None, WeightSpec(4, False, "group", 32))
    stored = sum(t.numel() * t.element_size() for t in (q.qweight, q.scale, q.zero))
    assert q.scale.dtype == torch.float16 and q.zero.dtype == torch.uint8
    assert stored * 8 / (64 * 128) == pytest.approx(4 + 16 / 32 + 8 / 32)   # 4.75 bits (Q4_1: 5)


@pytest.mark.parametrize("spec,kernel", [(WeightSpec(8, True, "channel"), "int8_linear"),
                                         (WeightSpec(4, False, "group", 32), "int4_linear"),
                                         (WeightSpec(3, False, "group", 32), "int4_linear")])
def test_forward_runs_the_fast_kernel_and_repacks_after_new_weights(spec, kernel):
    from slimformer import kernels

    if not kernels.kernels_available():
        pytest.skip("no C++ kernels on this machine")
    q = QuantLinear.from_float(torch.randn(16, 64), None, spec)
    x = torch.randn(1, 64)
    q(x)
    assert q._runtime[0] is getattr(kernels, kernel)
    other = QuantLinear.from_float(torch.randn(16, 64), None, spec)
    q.load_state_dict(other.state_dict())
    torch.testing.assert_close(q(x), other.forward_reference(x), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- int2-4 on the kernels
# The int4 kernels read the Q4 layout QuantLinear stores (formats.matrix.pack_nibbles):
# a 4-bit qweight of rows a multiple of 32 is handed over as it is, never repacked.
_Q4_SPECS = [WeightSpec(4, sym, "group", g) for sym in (True, False) for g in (16, 32, 64, 128)] + \
            [WeightSpec(4, sym, "channel") for sym in (True, False)]


def _close(y, ref):
    torch.testing.assert_close(y, ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("spec", _Q4_SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("m", [1, 3, 17])   # matvec, fused small-M, dequantise + GEMM
def test_int4_kernel_reads_the_stored_q4_bytes_in_place(spec, m, isa):
    from slimformer import kernels

    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(40, 256, generator=g) * 0.05, torch.randn(40, generator=g)
    q = QuantLinear.from_float(w, b, spec)
    assert q.nibble_layout and q.qweight.shape == (40, 128)
    x = torch.randn(2, m, 256, generator=g)
    y = q(x)
    kernel, packed = q._runtime
    assert kernel is kernels.int4_linear and packed.fast and q.fallback is None
    assert packed.packed.data_ptr() == q.qweight.data_ptr()   # the stored bytes, not a copy
    _close(y, q.forward_reference(x))


@pytest.mark.parametrize("spec,k", [(WeightSpec(3, False, "group", 32), 256), (WeightSpec(2, True, "group", 64), 256),
                                    (WeightSpec(3, True, "channel"), 96), (WeightSpec(4, False, "group", 16), 48),
                                    (WeightSpec(4, True, "channel"), 80)],
                         ids=lambda v: v.describe() if isinstance(v, WeightSpec) else str(v))
@pytest.mark.parametrize("m", [1, 3, 17])
def test_bit_stream_codes_run_the_int4_kernel(spec, k, m, isa):
    """2-3-bit codes and 4-bit rows of K % 32 == 16 are stored as a bit stream: unpacked to
    the kernels' layout once (K % 32 == 16: the Q4 layout ending in a half block)."""
    from slimformer import kernels

    g = torch.Generator().manual_seed(3)
    q = QuantLinear.from_float(torch.randn(24, k, generator=g) * 0.05, None, spec)
    assert not q.nibble_layout
    x = torch.randn(m, k, generator=g)
    y = q(x)
    kernel, packed = q._runtime
    assert kernel is kernels.int4_linear and packed.fast and q.fallback is None
    assert torch.equal(packed.codes(), q.codes())
    _close(y, q.forward_reference(x))
