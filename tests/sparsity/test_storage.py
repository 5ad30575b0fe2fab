"""Compressed sparse storage: exact round trips, byte counts equal to the format's formula,
the forward of the pruned Linear, save/load of a tiny Llama, and the errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimformer.errors import SparsityConfigError
from slimformer.formats import packing
from slimformer.formats.masks import is_nm, magnitude_mask, nm_mask
from slimformer.models.adapters import adapter_for
from slimformer.models.compressed import (
    load_compressed,
    save_compressed,
    swapped_modules,
)
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.nn import sparse as storage
from slimformer.nn.sparse import SparseLinear, sparsify_linears

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _weight(out: int, k: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # Values representable in the storage dtype, so fp16 storage must round-trip exactly.
    return (torch.randn(out, k, generator=torch.Generator().manual_seed(seed)) * 0.1).to(dtype).float()


def _random_nm(out: int, k: int, n: int, m: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """N:M by a random (not magnitude) choice of the kept positions."""
    weight = _weight(out, k, seed, dtype)
    scores = torch.rand(out, k, generator=torch.Generator().manual_seed(seed + 1))
    return weight * nm_mask(scores, n, m)


def _random_unstructured(out: int, k: int, sparsity: float, seed: int, dtype=torch.float32) -> torch.Tensor:
    weight = _weight(out, k, seed, dtype)
    scores = torch.rand(out, k, generator=torch.Generator().manual_seed(seed + 1))
    return weight * magnitude_mask(scores, sparsity)


def _linear(weight: torch.Tensor, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias:
            layer.bias.copy_(torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(9)))
    return layer


CASES = [  # (label, builder, format, n, m)
    ("2:4", lambda d: _random_nm(24, 64, 2, 4, 0, d), "nm", 2, 4),
    ("4:8", lambda d: _random_nm(24, 64, 4, 8, 1, d), "nm", 4, 8),
    ("1:4", lambda d: _random_nm(24, 64, 1, 4, 2, d), "nm", 1, 4),
    ("2:4 as bitmap", lambda d: _random_nm(24, 64, 2, 4, 0, d), "bitmap", None, None),
    ("2:4 as csr", lambda d: _random_nm(24, 64, 2, 4, 0, d), "csr", None, None),
    ("50% bitmap", lambda d: _random_unstructured(24, 72, 0.5, 3, d), "bitmap", None, None),
    ("90% bitmap", lambda d: _random_unstructured(24, 72, 0.9, 4, d), "bitmap", None, None),
    ("50% csr", lambda d: _random_unstructured(24, 72, 0.5, 5, d), "csr", None, None),
    ("90% csr", lambda d: _random_unstructured(24, 72, 0.9, 6, d), "csr", None, None),
]


def _expected_bytes(weight, fmt, n, m, value_bytes, bias_bytes):
    rows = weight.shape[0]
    numel, nnz = weight.numel(), int((weight != 0).sum())
    if fmt == "nm":
        kept = numel * n // m
        bits = math.ceil(math.log2(m))
        return kept * value_bytes + math.ceil(kept * bits / 8) + bias_bytes
    if fmt == "bitmap":
        return math.ceil(numel / 8) + nnz * value_bytes + bias_bytes
    return 4 * (rows + 1) + nnz * (2 + value_bytes) + bias_bytes   # int16 columns (cols <= 32767)


@pytest.mark.parametrize("storage_dtype", list(DTYPES))
@pytest.mark.parametrize("label,build,fmt,n,m", CASES, ids=[c[0] for c in CASES])
def test_round_trip_forward_and_bytes(label, build, fmt, n, m, storage_dtype):
    dtype = DTYPES[storage_dtype]
    weight = build(dtype)
    layer = _linear(weight)
    sparse = SparseLinear.from_linear(layer, fmt, n, m, dtype=dtype)
    assert sparse.format == fmt and sparse.storage_dtype == dtype
    assert torch.equal(sparse.dense_weight(), weight)
    assert sparse.dense_weight().dtype == torch.float32   # compute dtype: the Linear's
    k = weight.shape[1]
    for x in (torch.randn(3, 5, k), torch.randn(1, k)):
        tokens = x.numel() // k
        if storage.use_sparse_path(sparse.density(), tokens, weight.numel(), x.dtype, x.device):
            # torch's CSR kernel: the same products, summed in another order
            torch.testing.assert_close(sparse(x), layer(x), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(sparse(x), layer(x))
    value_bytes = dtype.itemsize
    assert sparse.stored_bytes() == _expected_bytes(weight, fmt, n, m, value_bytes, 4 * weight.shape[0])
    stored = sparse.state_dict()
    assert sum(t.numel() * t.element_size() for t in stored.values()) == sparse.stored_bytes()
    assert stored["values"].dtype == dtype and stored["bias"].dtype == torch.float32


def test_2_4_fp16_bytes_formula():
    """The issue's example: 2:4 in fp16 is 0.5*numel*2 bytes of values + numel/4*2 positions of 2 bits."""
    weight = _random_nm(576, 576, 2, 4, 7, torch.float16)
    sparse = SparseLinear.from_weight(weight, None, "nm", 2, 4, dtype=torch.float16)
    numel = weight.numel()
    assert sparse.stored_bytes() == 0.5 * numel * 2 + numel / 4 * 2 * 2 / 8
    assert sparse.stored_bytes() / numel == 1.125           # bytes per weight, vs 2 dense fp16
    assert sparse.positions.numel() == numel // 4 * 2 * 2 // 8
    assert torch.equal(sparse.dense_weight(), weight)


def test_positions_are_packed_in_ceil_log2_m_bits():
    for n, m, bits in [(2, 4, 2), (4, 8, 3), (1, 2, 1), (3, 6, 3), (8, 16, 4)]:
        weight = _random_nm(8, 48, n, m, n + m)
        sparse = SparseLinear.from_weight(weight, None, "nm", n, m)
        kept = weight.numel() // m * n
        assert sparse.positions.numel() == math.ceil(kept / 8) * bits, (n, m)
        codes = packing.unpack(sparse.positions, bits, kept).reshape(8, 48 // m, n).long()
        assert int(codes.max()) < m
        # the stored positions point at exactly the non-zeros of the weight
        groups = weight.reshape(8, 48 // m, m)
        assert torch.equal(groups.gather(-1, codes).reshape(8, -1), sparse.values)
        assert torch.equal(sparse.dense_weight(), weight)


def test_nm_with_fewer_than_n_nonzeros_per_group():
    """A group may keep fewer than N (an already-zero weight): slots hold 0, still exact."""
    weight = _random_nm(16, 32, 2, 4, 11)
    weight[:, :8] = 0
    weight[3, 17] = 0
    sparse = SparseLinear.from_weight(weight, None, "nm", 2, 4)
    assert torch.equal(sparse.dense_weight(), weight)
    assert sparse.values.numel() == weight.numel() // 2


def test_bf16_storage_and_compute_dtype():
    weight = _random_unstructured(16, 40, 0.7, 12, torch.bfloat16)
    sparse = SparseLinear.from_weight(weight, None, "bitmap", dtype="bfloat16")
    assert sparse.values.dtype == torch.bfloat16
    assert torch.equal(sparse.dense_weight(), weight)
    half = SparseLinear.from_weight(weight.half(), None, "csr")   # storage defaults to the weight's dtype
    assert half.values.dtype == torch.float16 and half.dense_weight().dtype == torch.float16
    x = torch.randn(2, 40).half()
    assert torch.equal(half(x), F.linear(x, weight.half()))


def test_fp16_storage_rounds_an_fp32_weight():
    weight = _random_unstructured(16, 40, 0.5, 13) * (1 + 1e-5)    # not representable in fp16
    assert not torch.equal(weight.half().float(), weight)
    sparse = SparseLinear.from_weight(weight, None, "csr", dtype=torch.float16)
    assert torch.equal(sparse.dense_weight(), weight.half().float())


def test_auto_picks_nm_then_the_smaller_of_bitmap_and_csr():
    nm = _random_nm(32, 64, 2, 4, 14)
    assert SparseLinear.from_weight(nm, None, "auto", 2, 4).format == "nm"
    # without n, m (or not N:M for them) it is unstructured: at 50% the bitmap is smaller
    assert SparseLinear.from_weight(nm, None, "auto").format == "bitmap"
    assert SparseLinear.from_weight(nm, None, "auto", 1, 4).format == "bitmap"
    for sparsity, expected in [(0.5, "bitmap"), (0.8, "bitmap"), (0.95, "csr"), (0.99, "csr")]:
        weight = _random_unstructured(64, 256, sparsity, 15)
        chosen = SparseLinear.from_weight(weight, None, "auto")
        sizes = {f: SparseLinear.from_weight(weight, None, f).stored_bytes() for f in ("bitmap", "csr")}
        assert chosen.format == expected == min(sizes, key=sizes.get), sparsity
        assert chosen.stored_bytes() == min(sizes.values())


def test_int32_column_indices_beyond_int16():
    weight = torch.zeros(2, 32800)
    weight[0, 32799] = 1.5
    weight[1, 3] = -2.0
    sparse = SparseLinear.from_weight(weight, None, "csr")
    assert sparse.col_indices.dtype == torch.int32
    assert sparse.stored_bytes() == 4 * 3 + 2 * (4 + 4)
    assert torch.equal(sparse.dense_weight(), weight)
    small = SparseLinear.from_weight(weight[:, :32767], None, "csr")
    assert small.col_indices.dtype == torch.int16


def test_dense_cache_not_saved_and_refreshed():
    weight = _random_unstructured(8, 16, 0.5, 16)
    sparse = SparseLinear.from_weight(weight, torch.zeros(8), "bitmap")
    x = torch.randn(4, 16)
    sparse(x)
    assert sparse._dense is not None
    assert set(sparse.state_dict()) == {"bitmap", "values", "bias"}
    # new weights through the state dict: the cache must not serve the old ones
    other = SparseLinear.from_weight(weight * 2, torch.zeros(8), "bitmap")
    sparse.load_state_dict(other.state_dict())
    assert torch.equal(sparse(x), F.linear(x, weight * 2))
    # a dtype change of the input rebuilds the cache in that dtype
    assert torch.equal(sparse(x.double()), F.linear(x.double(), (weight * 2).double()))


def test_sparse_path_rule_and_csr_linear():
    weight = _random_unstructured(24, 40, 0.95, 17)
    bias = torch.randn(24)
    sparse = SparseLinear.from_weight(weight, bias, "csr")
    x = torch.randn(2, 7, 40)
    out = storage.csr_linear(x, sparse._runtime_csr(), bias)
    assert out.is_contiguous() and out.shape == (2, 7, 24)
    torch.testing.assert_close(out, F.linear(x, weight, bias))
    assert storage.csr_linear(x, sparse._runtime_csr(), None).is_contiguous()
    # the rule never sends fp16/bf16 (no CPU kernel) or a 50%-sparse layer with many tokens to CSR
    cpu = torch.device("cpu")
    assert not storage.use_sparse_path(0.01, 64, 10**6, torch.float16, cpu)
    assert not storage.use_sparse_path(0.5, 64, 10**6, torch.float32, cpu)
    assert storage.use_sparse_path(0.05, 64, 10**6, torch.float32, cpu)
    assert not storage.use_sparse_path(0.1, 64, 10**6, torch.float32, cpu)
    # one token: 90% anywhere, 70% only on a weight larger than L2
    assert storage.use_sparse_path(0.1, 1, 1000, torch.float32, cpu)
    assert not storage.use_sparse_path(0.3, 1, 1000, torch.float32, cpu)
    assert storage.use_sparse_path(0.3, 1, 10**6, torch.float32, cpu)
    assert not storage.use_sparse_path(0.5, 1, 10**6, torch.float32, cpu)


def test_forward_uses_the_rule(monkeypatch):
    weight = _random_unstructured(24, 40, 0.95, 18)
    sparse = SparseLinear.from_weight(weight, None, "bitmap")
    x = torch.randn(6, 40)
    monkeypatch.setattr(storage, "MANY_TOKENS_MAX_DENSITY", 0.1)
    torch.testing.assert_close(sparse(x), F.linear(x, weight))
    assert sparse._csr is not None and sparse._dense is None
    torch.testing.assert_close(sparse(x[:1]), F.linear(x[:1], weight))   # one token: torch.mv
    sparse._csr = None
    monkeypatch.setattr(storage, "MANY_TOKENS_MAX_DENSITY", 0.01)        # now denser than the limit
    torch.testing.assert_close(sparse(x), F.linear(x, weight))
    assert sparse._dense is not None and sparse._csr is None


def _prune_llama(model, adapter):
    """Prune each block's projections: attention 2:4, MLP unstructured 70% (by magnitude)."""
    names = {}
    for b, block in enumerate(adapter.get_blocks(model)):
        prefix = f"{adapter.blocks}.{b}"
        for proj in adapter.linears:
            layer = block.get_submodule(proj)
            with torch.no_grad():
                if proj.startswith("self_attn"):
                    layer.weight.mul_(nm_mask(layer.weight, 2, 4))
                else:
                    layer.weight.mul_(magnitude_mask(layer.weight, 0.7))
            names[f"{prefix}.{proj}"] = proj
    return names


def test_tiny_llama_save_load_identical(tmp_path):
    model = tiny_model("llama")
    adapter = adapter_for(model)
    names = _prune_llama(model, adapter)
    ids = torch.randint(4, len(tiny_tokenizer()), (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    sizes = sparsify_linears(model, lambda name, _: name in names, format="auto", n=2, m=4,
                             dtype=torch.float16)
    assert set(sizes) == set(names)
    formats = {n: model.get_submodule(n).format for n in names}
    assert {f for n, f in formats.items() if "self_attn" in n} == {"nm"}
    assert {f for n, f in formats.items() if "mlp" in n} == {"bitmap"}   # 70%: bitmap < csr
    for name, (dense, stored) in sizes.items():
        assert stored == model.get_submodule(name).stored_bytes() < dense / 2
    with torch.no_grad():
        swapped = model(input_ids=ids).logits
    # fp16 value storage rounds the weights: close to the fp32 model, not equal
    torch.testing.assert_close(swapped, before, atol=2e-3, rtol=1e-3)

    out = save_compressed(model, tiny_tokenizer(), tmp_path / "model")
    assert set(swapped_modules(model)) == set(names)
    loaded, _ = load_compressed(out)
    for name in names:
        a, b = model.get_submodule(name), loaded.get_submodule(name)
        assert isinstance(b, SparseLinear) and b.format == a.format and b.storage_dtype == torch.float16
        assert torch.equal(b.dense_weight(), a.dense_weight())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, swapped)


def test_sparsify_linears_by_name_and_through_conv1d():
    model = tiny_model("gpt2")
    name = "transformer.h.0.mlp.c_fc"   # GPT-2 Conv1D: weight stored [in, out]
    conv = model.get_submodule(name)
    with torch.no_grad():
        conv.weight.mul_(magnitude_mask(conv.weight, 0.9))
    x = torch.randn(3, conv.weight.shape[0])
    expected = conv(x)
    sizes = sparsify_linears(model, [name], format="csr")
    sparse = model.get_submodule(name)
    assert isinstance(sparse, SparseLinear) and sparse.format == "csr"
    assert sizes[name] == (conv.weight.numel() * 4 + conv.bias.numel() * 4, sparse.stored_bytes())
    torch.testing.assert_close(sparse(x), expected)


@pytest.mark.parametrize("kwargs,message", [
    ({"format": "nm", "n": 2, "m": 4}, "is not 2:4 sparse"),
    ({"format": "nm", "n": 2, "m": 3}, "M=3 does not divide"),
    ({"format": "nm"}, "needs n and m"),
    ({"format": "auto", "n": 2}, "give both n and m"),
    ({"format": "nm", "n": 4, "m": 4}, "N < M"),
    ({"format": "nm", "n": 2, "m": 512}, "too large"),
    ({"format": "coo"}, "unknown sparse storage format"),
    ({"format": "csr", "dtype": torch.int8}, "storage dtype"),
])
def test_errors_name_the_layer(kwargs, message):
    weight = _random_unstructured(8, 16, 0.3, 19)   # 70% dense: not 2:4
    layer = _linear(weight)
    with pytest.raises(SparsityConfigError, match=message) as info:
        SparseLinear.from_linear(layer, name="model.layers.3.mlp.up_proj", **kwargs)
    assert "model.layers.3.mlp.up_proj" in str(info.value)


def test_error_cases_detail():
    weight = _random_nm(8, 16, 2, 4, 20)
    weight[5, 9] = 1.0   # a third non-zero in row 5, group 2
    assert not is_nm(weight, 2, 4)
    with pytest.raises(SparsityConfigError, match=r"row 5, group 2 has 3 non-zeros"):
        SparseLinear.from_weight(weight, None, "nm", 2, 4, name="q")
    with pytest.raises(SparsityConfigError, match="not a linear layer"):
        SparseLinear.from_linear(nn.Embedding(4, 4), name="emb")
    with pytest.raises(SparsityConfigError, match="no such module"):
        sparsify_linears(tiny_model("llama"), ["model.layers.0.nope"])


@pytest.mark.slow
def test_smollm2_layer_bytes_and_forward():
    """A real SmolLM2-135M MLP layer pruned 2:4 and 90%: exact, and the byte counts."""
    import slimformer

    model, _ = slimformer.load("smollm2-135m")
    layer = model.model.layers[0].mlp.down_proj   # [576, 1536]
    weight = layer.weight.detach()
    x = torch.randn(4, 1536)
    for fmt, n, m, mask in [("nm", 2, 4, nm_mask(weight, 2, 4)), ("csr", None, None, magnitude_mask(weight, 0.9))]:
        pruned = weight * mask
        sparse = SparseLinear.from_weight(pruned, None, fmt, n, m, dtype=torch.float16)
        assert torch.equal(sparse.dense_weight(), pruned.half().float())
        torch.testing.assert_close(sparse(x), F.linear(x, pruned.half().float()))
        per_weight = sparse.stored_bytes() / weight.numel()
        assert per_weight == (1.125 if fmt == "nm" else pytest.approx(0.4, abs=0.01))
