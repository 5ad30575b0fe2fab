"""Native decoder: equal to the Hugging Face computation, in every weight format."""

import ctypes

import numpy as np
import pytest
import torch

from slimformer.core.runner import run_transforms
from slimformer.errors import UnsupportedArchitectureError
from slimformer.models.adapters import adapter_for
from slimformer.models.tiny import tiny_model
from slimformer.nn.quant_linear import QuantLinear
from slimformer.runtime import weights as W
from slimformer.runtime.decoder import (
    GenerationError,
    NativeDecoder,
    _c_linear,
    _gguf_row_order,
    native_library,
)
from slimformer.techniques.quant.rtn import RTN

ATOL = 1e-4  # fp32, different summation order from torch's GEMMs


def _ids(n, seed=0, vocab=300):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _quantised(recipe: RTN, seed=0):
    model = tiny_model("llama", seed=seed)
    run_transforms(model, [recipe], progress=False)
    return model


def test_forward_and_cached_decode_equal_hf():
    model = tiny_model("llama")
    dec = NativeDecoder.from_model(model)
    ids = _ids(24)
    ref = _hf_logits(model, ids)
    torch.testing.assert_close(dec.forward_logits(ids), ref, atol=ATOL, rtol=0)
    sess = dec.new_session(1, 32)
    torch.testing.assert_close(dec.prefill(sess, [ids[:9]])[0], ref[8], atol=ATOL, rtol=0)
    for t in range(9, 24):  # each native decode step against the full-sequence reference
        torch.testing.assert_close(dec.decode(sess, [ids[t]])[0], ref[t], atol=ATOL, rtol=0)


def test_biases_and_untied_head():
    # Qwen2-style q/k/v biases and a separate LM head.
    model = tiny_model("llama", attention_bias=True, tie_word_embeddings=False, seed=3)
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.q_proj.bias.normal_()
            block.self_attn.v_proj.bias.normal_()
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.05)
    dec = NativeDecoder.from_model(model)
    ids = _ids(12, seed=1)
    ref = _hf_logits(model, ids)
    sess = dec.new_session(1, 16)
    dec.prefill(sess, [ids[:5]])
    for t in range(5, 12):
        torch.testing.assert_close(dec.decode(sess, [ids[t]])[0], ref[t], atol=ATOL, rtol=0)


def test_padding_free_batch_equals_each_sequence_alone():
    model = tiny_model("llama")
    dec = NativeDecoder.from_model(model)
    prompts = [_ids(n, seed=n) for n in (3, 11, 7)]
    sess = dec.new_session(3, 20)
    first = dec.prefill(sess, prompts)
    nxt = [_ids(5, seed=10 + b) for b in range(3)]
    steps = [dec.decode(sess, [nxt[b][t] for b in range(3)]).clone() for t in range(5)]
    for b, p in enumerate(prompts):
        ref = _hf_logits(model, p + nxt[b])
        torch.testing.assert_close(first[b], ref[len(p) - 1], atol=ATOL, rtol=0)
        for t in range(5):
            torch.testing.assert_close(steps[t][b], ref[len(p) + t], atol=ATOL, rtol=0)


@pytest.mark.parametrize("recipe", [
    RTN(bits=4, granularity="group", group_size=32, symmetric=False),
    RTN(bits=4, granularity="group", group_size=64),
    RTN(bits=4, granularity="channel", symmetric=False),
    RTN(bits=3, granularity="group", group_size=32, symmetric=False),
    RTN(bits=8),
    RTN(bits=8, granularity="group", group_size=32, symmetric=False),
    RTN(bits=8, act_bits=8),
], ids=lambda r: r.weight_spec().describe() + ("-a8" if r.act_bits else ""))
def test_quantised_models_equal_their_dequantised_reference(recipe):
    model = _quantised(recipe)
    dec = NativeDecoder.from_model(model)
    for block, layer in zip(adapter_for(model).get_blocks(model), dec.layers):
        ref = torch.cat([block.self_attn.q_proj.dequantized_weight(), block.self_attn.k_proj.dequantized_weight(),
                         block.self_attn.v_proj.dequantized_weight()])
        assert torch.equal(layer.qkv.dequantize(), ref)  # the runtime layout loses nothing
        assert torch.equal(layer.down.dequantize(), block.mlp.down_proj.dequantized_weight())
    for m in model.modules():  # the reference: dequantise, then F.linear
        if isinstance(m, QuantLinear):
            m.forward = m.forward_reference
    ids = _ids(16, seed=2)
    ref = _hf_logits(model, ids)
    sess = dec.new_session(1, 16)
    dec.prefill(sess, [ids[:6]])
    for t in range(6, 16):
        torch.testing.assert_close(dec.decode(sess, [ids[t]])[0], ref[t], atol=2e-4, rtol=0)


def _native_vs_reference(lin: W.RtLinear, M: int, dec: NativeDecoder, seed=0):
    x = torch.randn(M, lin.K, generator=torch.Generator().manual_seed(seed))
    sess = dec.new_session(M, 4)
    return dec.native_linear(sess, lin, x), x @ lin.dequantize().t() + (0 if lin.bias is None else lin.bias), x


@pytest.mark.parametrize("kind,N,K,gs", [("q4", 37, 96, 32), ("q4", 5, 64, 64), ("q4-zero", 11, 64, 32), ("q8", 41, 48, 16),
                                         ("q8", 7, 96, 32), ("f32", 13, 40, 40)])
@pytest.mark.parametrize("M", [1, 3, 6])
@pytest.mark.parametrize("half", [False, True], ids=["f32-scales", "f16-scales"])
def test_decode_kernels_on_odd_shapes(kind, N, K, gs, M, half, isa):
    dec = NativeDecoder.from_model(tiny_model("llama"))
    g = torch.Generator().manual_seed(N * K + M)
    G = K // gs
    dtype = torch.float16 if half else torch.float32
    scale = (torch.rand(N, G, generator=g) * 0.1 + 0.01).to(dtype)
    minv = (torch.randn(N, G, generator=g) * 0.1).to(dtype)
    bias = torch.randn(N, generator=g)
    if kind == "q4":
        lin = W.RtLinear("t", W.Q4, N, K, gs, W.pack_nibbles(torch.randint(0, 16, (N, K), generator=g)), scale, minv, bias)
    elif kind == "q4-zero":  # integer zero-points instead of offsets
        lin = W.RtLinear("t", W.Q4, N, K, gs, W.pack_nibbles(torch.randint(0, 16, (N, K), generator=g)), scale, None,
                         bias, zero=torch.randint(0, 16, (N, G), generator=g).to(torch.uint8))
    elif kind == "q8":
        lin = W.RtLinear("t", W.Q8, N, K, gs, torch.randint(-128, 128, (N, K), generator=g).to(torch.int8), scale, minv,
                         bias)
    else:
        lin = W.from_dense("t", torch.randn(N, K, generator=g), bias)
    got, ref, _ = _native_vs_reference(lin, M, dec)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
    if kind != "f32":  # the prefill path's tile dequantisation is exact
        tile = torch.empty(N - 2, K)
        native_library().sf_dequant_rows(ctypes.byref(_c_linear(lin)), 1, N - 1, tile.data_ptr(), 2)
        assert torch.equal(tile, lin.dequantize()[1:N - 1])


def _emulate_act8(lin: W.RtLinear, x: torch.Tensor) -> torch.Tensor:
    """The int8-activation path written in torch: x rounded per block of 32."""
    xb = x.reshape(x.shape[0], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(xb * torch.where(d > 0, 1 / d, 0)), 0)
    return (q * d).reshape_as(x) @ lin.dequantize().t() + (0 if lin.bias is None else lin.bias)


@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_int8_activation_path_is_exactly_the_rounded_activation_product(kind, isa):
    model = tiny_model("llama")
    exact = NativeDecoder.from_model(model)
    fast = NativeDecoder.from_model(model, activations="int8")
    N, K, gs = 29, 128, 64
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 16, (N, K), generator=g) if kind == "q4" else torch.randint(-127, 128, (N, K), generator=g)
    w = W.pack_nibbles(codes) if kind == "q4" else codes.to(torch.int8)
    lin = W.RtLinear("t", W.Q4 if kind == "q4" else W.Q8, N, K, gs, w, torch.rand(N, K // gs, generator=g) * 0.1,
                     torch.randn(N, K // gs, generator=g) * 0.1)
    for M in (1, 5):
        x = torch.randn(M, K, generator=g)
        sess = fast.new_session(M, 4)
        got = fast.native_linear(sess, lin, x)
        torch.testing.assert_close(got, _emulate_act8(lin, x), atol=1e-4, rtol=1e-5)
        ref = exact.native_linear(exact.new_session(M, 4), lin, x)
        rel = float((got - ref).norm() / ref.norm())
        assert 0 < rel < 0.02, rel  # a real, small rounding error


def test_layout_fallback_warns_and_names_the_layer():
    model = tiny_model("llama")
    run_transforms(model, [RTN(bits=4, granularity="group", group_size=16)], progress=False)
    with pytest.warns(RuntimeWarning, match=r"model\.layers\.0\.self_attn\.q_proj.*multiples of 32"):
        dec = NativeDecoder.from_model(model)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.forward = m.forward_reference
    ids = _ids(10)
    torch.testing.assert_close(dec.forward_logits(ids), _hf_logits(model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_repack_losslessly(qtype):
    import gguf

    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 96)).astype(np.float32)
    t = getattr(gguf.GGMLQuantizationType, qtype)
    raw = gguf.quants.quantize(w, t)
    lin = W.from_gguf_tensor("t", qtype, raw, 24, 96)
    assert torch.equal(lin.dequantize(), torch.from_numpy(gguf.quants.dequantize(raw, t)))


def test_gguf_row_order_undoes_llama_cpp_permutation():
    # llama.cpp's converter: w.reshape(n_head, 2, dim // n_head // 2, K).swapaxes(1, 2)
    n_head, rows = 3, 24
    w = torch.arange(rows * 2).reshape(rows, 2)
    permuted = w.reshape(n_head, 2, rows // n_head // 2, 2).swapaxes(1, 2).reshape(rows, 2)
    assert torch.equal(permuted[_gguf_row_order(rows, n_head)], w)


def test_errors():
    with pytest.raises(UnsupportedArchitectureError, match="Llama-family"):
        NativeDecoder.from_model(tiny_model("gpt2"))
    dec = NativeDecoder.from_model(tiny_model("llama"))
    with pytest.raises(GenerationError, match="context of 256"):
        dec.new_session(1, 300)
    sess = dec.new_session(1, 8)
    with pytest.raises(GenerationError, match="exceeds"):
        dec.prefill(sess, [_ids(9)])
    dec.prefill(sess, [_ids(8)])
    with pytest.raises(GenerationError, match="reached"):
        dec.decode(sess, [1])
    with pytest.raises(GenerationError, match="activations"):
        NativeDecoder.from_model(tiny_model("llama"), activations="int4")
