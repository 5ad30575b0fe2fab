"""Native decoder parity beyond Llama: Qwen3 (per-head q/k RMSNorm before RoPE) and
Mistral (sliding-window attention), in the torch prefill and the C++ decode step, fp32
and QuantLinear weights; the same tolerances as the Llama tests in test_decoder.py."""

import pytest
import torch

from slimformer.core.runner import run_transforms
from slimformer.errors import UnsupportedArchitectureError
from slimformer.models.adapters import adapter_for
from slimformer.models.tiny import tiny_model
from slimformer.nn.quant_linear import QuantLinear
from slimformer.runtime.decoder import NativeDecoder, check_supported
from slimformer.techniques.quant.rtn import RTN

ATOL = 1e-4       # fp32 (as test_decoder.py)
ATOL_QUANT = 2e-4  # QuantLinear weights against their dequantised reference (as test_decoder.py)
SEQ = 24           # longer than Mistral's window of 8


def _ids(n, seed=0, vocab=300):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _model(family, seed=0, **overrides):
    model = tiny_model(family, seed=seed, **overrides)
    with torch.no_grad():  # q/k norms start at ones: make them matter
        for block in adapter_for(model).get_blocks(model):
            for name in ("q_norm", "k_norm"):
                norm = getattr(block.self_attn, name, None)
                if norm is not None:
                    norm.weight.uniform_(0.5, 1.5)
    return model


def _check(model, dec, atol, prompt=9):
    ids = _ids(SEQ, seed=4)
    ref = _hf_logits(model, ids)
    torch.testing.assert_close(dec.forward_logits(ids), ref, atol=atol, rtol=0)
    sess = dec.new_session(1, SEQ + 4)
    torch.testing.assert_close(dec.prefill(sess, [ids[:prompt]])[0], ref[prompt - 1], atol=atol, rtol=0)
    for t in range(prompt, SEQ):  # each native decode step against the full-sequence reference
        torch.testing.assert_close(dec.decode(sess, [ids[t]])[0], ref[t], atol=atol, rtol=0, msg=f"position {t}")


CASES = {
    "qwen3": {"family": "qwen3"},
    "mistral-window": {"family": "mistral"},
    # Qwen3 with its own per-layer windows: layer 0 full, layer 1 a window of 6
    "qwen3-window-layers": {"family": "qwen3", "use_sliding_window": True, "sliding_window": 6,
                            "max_window_layers": 1, "layer_types": ["full_attention", "sliding_attention"]},
}


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_prefill_and_decode_equal_hf(case):
    kw = dict(CASES[case])
    model = _model(kw.pop("family"), **kw)
    dec = NativeDecoder.from_model(model)
    _check(model, dec, ATOL)
    # prompts longer than the window go through the windowed prefill (native mask), too
    _check(model, dec, ATOL, prompt=17)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("recipe", [RTN(bits=4, granularity="group", group_size=32, symmetric=False), RTN(bits=8)],
                         ids=lambda r: r.weight_spec().describe())
def test_quantised_prefill_and_decode_equal_the_dequantised_reference(case, recipe):
    kw = dict(CASES[case])
    model = _model(kw.pop("family"), seed=1, **kw)
    run_transforms(model, [recipe], progress=False)
    dec = NativeDecoder.from_model(model)
    for m in model.modules():  # the reference: dequantise, then F.linear
        if isinstance(m, QuantLinear):
            m.forward = m.forward_reference
    _check(model, dec, ATOL_QUANT)


def test_the_window_matters_in_hf_and_in_the_native_decoder():
    windowed = _model("mistral")
    full = _model("mistral", sliding_window=None)
    ids = _ids(SEQ, seed=4)
    a, b = _hf_logits(windowed, ids), _hf_logits(full, ids)
    assert torch.equal(a[:8], b[:8]) and not torch.allclose(a[8:], b[8:], atol=ATOL)  # the test is not vacuous
    dec = NativeDecoder.from_model(windowed)
    assert [l.window for l in dec.layers] == [8, 8]
    assert [l.window for l in NativeDecoder.from_model(full).layers] == [None, None]


def test_adapter_facts():
    spec = adapter_for(_model("qwen3")).decoder_spec(_model("qwen3"))
    assert (spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.qk_norm, spec.mlp, spec.norm) == \
        (4, 2, 16, True, "gated_silu", "rms")
    assert spec.sliding_windows == (None, None)
    mistral = adapter_for(_model("mistral")).decoder_spec(_model("mistral"))
    assert mistral.sliding_windows == (8, 8) and not mistral.qk_norm
    assert adapter_for(_model("mistral")).family == adapter_for(_model("qwen3")).family == "llama"


@pytest.mark.parametrize("overrides,feature", [
    ({"hidden_act": "gelu"}, "gated_gelu MLP"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}, "dynamic RoPE"),
])
def test_unsupported_features_are_named(overrides, feature):
    model = _model("qwen3")
    for k, v in overrides.items():
        setattr(model.config, k, v)
    with pytest.raises(UnsupportedArchitectureError, match=feature):
        check_supported(model)
