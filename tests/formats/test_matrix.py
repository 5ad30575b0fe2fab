"""The compressed-matrix description: GGUF blocks both ways (bit-identical), slicing and
stacking exact, QuantLinear's stored 4-bit codes handed over without repacking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimformer.formats import gguf
from slimformer.formats.matrix import (
    F32,
    Q4,
    Q8,
    CompressedMatrix,
    UnsupportedFormat,
    concat,
    pack_nibbles,
)
from slimformer.formats.spec import WeightSpec
from slimformer.nn.quant_linear import QuantLinear

N, K = 6, 96


def _same(a: CompressedMatrix, b: CompressedMatrix) -> None:
    assert (a.kind, a.N, a.K, a.gs) == (b.kind, b.N, b.K, b.gs)
    for f in ("w", "scale", "minv", "zero", "bias", "corr"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), f


def _random_blocks(qtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (N, K // 32, gguf.BLOCK_BYTES[qtype]), dtype=np.uint8)
    halves = 2 if qtype == "Q4_1" else 1
    d = rng.uniform(0.01, 2, (N, K // 32, halves)).astype(np.float16)  # finite fp16 scales
    raw[..., : 2 * halves] = d.view(np.uint8)
    return raw.reshape(N, -1)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_round_trip_bit_identical(qtype):
    data = _random_blocks(qtype)
    m = gguf.from_gguf_tensor("t", qtype, data, N, K)
    back_type, back = gguf.to_gguf_blocks(m)
    assert back_type == qtype and np.array_equal(back, data)             # blocks -> description -> blocks
    _same(gguf.from_gguf_tensor("t", back_type, back, N, K), m)         # description -> blocks -> description


def test_f32_round_trip():
    m = gguf.from_gguf_tensor("t", "F16", np.random.default_rng(1).standard_normal((N, K)).astype(np.float16), N, K)
    assert m.kind == F32
    _same(gguf.from_gguf_tensor("t", *gguf.to_gguf_blocks(m), N, K), m)


@pytest.mark.parametrize("spec,qtype", [(WeightSpec(4, True, "group", 32), "Q4_0"),
                                        (WeightSpec(8, True, "group", 32), "Q8_0")])
def test_quant_linear_descriptions_write_as_gguf_exactly(spec, qtype):
    q = QuantLinear.from_float(torch.randn(N, K), None, spec)
    m = q.matrix("t")
    t, data = gguf.to_gguf_blocks(m)
    assert t == qtype
    again = gguf.from_gguf_tensor("t", t, data, N, K)
    assert torch.equal(again.dequantize(), m.dequantize())
    assert torch.equal(again.dequantize(), q.dequantized_weight())


def test_formats_gguf_cannot_hold_are_refused():
    q = QuantLinear.from_float(torch.randn(N, K), None, WeightSpec(4, True, "group", 96))
    with pytest.raises(UnsupportedFormat, match="blocks are 32 columns"):
        gguf.to_gguf_blocks(q.matrix("t"))


def test_quant_linear_hands_its_stored_q4_bytes_over_without_repacking():
    q = QuantLinear.from_float(torch.randn(N, K), None, WeightSpec(4, False, "group", 32))
    assert q.qweight.shape == (N, K // 2)
    m = q.matrix("t")
    assert m.kind == Q4 and m.w.data_ptr() == q.qweight.data_ptr()
    assert torch.equal(m.w, pack_nibbles(q.codes()))


def test_rows_columns_and_stacks_are_exact():
    q = QuantLinear.from_float(torch.randn(N, K), torch.randn(N), WeightSpec(4, False, "group", 32))
    m, dense = q.matrix("t"), q.dequantized_weight()
    assert torch.equal(m.select_rows(torch.tensor([4, 0])).dequantize(), dense[[4, 0]])
    assert torch.equal(m.shard(1, 3, 1).dequantize(), dense[:, 32:64])
    assert m.shard(1, 3, 1).bias is None and torch.equal(m.shard(1, 2, 0).bias, q.bias[3:])
    assert torch.equal(concat("s", [m.shard(r, 3, 0) for r in range(3)]).dequantize(), dense)
    with pytest.raises(ValueError, match="groups"):
        m.select_cols(16, 48)
    q8 = QuantLinear.from_float(torch.randn(N, K), None, WeightSpec(8, True, "channel")).matrix("u")
    assert q8.kind == Q8 and torch.equal(q8.select_cols(10, 50).dequantize(), q8.dequantize()[:, 10:50])
    mixed = concat("m", [m, q8])
    assert mixed.kind == F32 and "mixed formats" in mixed.fallback
