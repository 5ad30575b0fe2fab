"""Import of GPTQ checkpoints (AutoGPTQ / GPTQModel layout).

The checkpoints are written here, by a packer of this test's own written from the public
format description (codes of a column as one little-endian bit stream of int32 words
along the input dimension; zero-points the same along the output dimension; v1 stores
zero - 1), from known codes, scales and zero-points. The imported model must dequantise
to GPTQ's definition ``scales[g_idx[k]] * (q[k] - zeros[g_idx[k]])`` bit for bit and
compute what a dense model holding those weights computes.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import slimformer
from slimformer.errors import ModelLoadError, SlimformerError, UnsafeCheckpointError
from slimformer.models import gptq
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.nn.act_order import ActOrderLinear
from slimformer.nn.quant_linear import QuantLinear

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------- the test's own packer
def _to_int32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


def pack_stream(values: list[int], bits: int) -> list[int]:
    """Fields, low bits first, as one little-endian bit stream cut into int32 words."""
    stream = 0
    for i, v in enumerate(values):
        assert 0 <= v < 1 << bits
        stream |= v << (i * bits)
    n_words = len(values) * bits // 32
    return [_to_int32((stream >> (32 * w)) & 0xFFFFFFFF) for w in range(n_words)]


def pack_qweight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """codes ``[K, N]`` -> ``[K*bits/32, N]`` int32, each column's codes packed down the rows."""
    cols = [pack_stream([int(v) for v in q[:, n]], bits) for n in range(q.shape[1])]
    return torch.tensor(cols, dtype=torch.int32).t().contiguous()


def pack_qzeros(zeros: torch.Tensor, bits: int, v1: bool) -> torch.Tensor:
    """zero-points ``[G, N]`` -> ``[G, N*bits/32]`` int32 (v1: each stored minus one)."""
    stored = zeros - 1 if v1 else zeros
    rows = [pack_stream([int(v) for v in stored[g]], bits) for g in range(zeros.shape[0])]
    return torch.tensor(rows, dtype=torch.int32)


def gptq_weight(q, zeros, scales, g_idx) -> torch.Tensor:
    """GPTQ's definition, fp32 ``[N, K]``."""
    g = g_idx.long()
    return (scales.float()[g] * (q.float() - zeros.float()[g])).t().contiguous()


# ----------------------------------------------------------------------- hand-checkable words
def test_packer_words_by_hand():
    # 4 bits: codes k of column 0 are 0..7 in the first word, low nibble first
    q = torch.tensor([[(k + n) % 16 for n in range(8)] for k in range(32)])
    words = pack_qweight(q, 4)
    assert words.shape == (4, 8)
    assert int(words[0, 0]) == 0x76543210
    assert int(words[0, 1]) == _to_int32(0x87654321)
    assert int(words[1, 0]) == _to_int32(0xFEDCBA98)
    # 8 bits: four codes per word
    q8 = torch.tensor([[k * 7 % 256 for _ in range(4)] for k in range(32)])
    assert int(pack_qweight(q8, 8)[0, 0]) == 0x150E0700
    # 3 bits: 32 codes in 3 words; code 10 straddles words 0/1 (low two bits at 30..31)
    q3 = torch.tensor([[k % 8] for k in range(32)])
    w3 = pack_qweight(q3, 3)[:, 0].tolist()
    assert w3[0] == _to_int32(0x88FAC688)
    assert (w3[1] & 1) == (10 % 8) >> 2       # code 10's high bit
    # v1 zero-points: 8 stored as 7 in every nibble
    assert int(pack_qzeros(torch.full((1, 8), 8), 4, v1=True)[0, 0]) == 0x77777777


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_reader_inverts_the_packer(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 1 << bits, (64, 32), generator=g)
    assert torch.equal(gptq.read_codes(pack_qweight(q, bits), bits, 64), q.t().to(torch.uint8))
    zeros = torch.randint(1, 1 << bits, (2, 32), generator=g)
    for v1 in (False, True):
        got, ones = gptq.read_zeros(pack_qzeros(zeros, bits, v1), bits, 32, v1)
        assert torch.equal(got, zeros.to(torch.int16)) and ones == 0


def test_v1_zero_point_of_zero_is_warned_about():
    # a v1 zero-point of 0 is stored as all ones; GPTQModel's writer subtracts word-wise (borrowing)
    zeros = torch.tensor([[0, 5, 3, 9, 1, 2, 4, 6]])
    stream = sum(int(z) << (4 * i) for i, z in enumerate(zeros[0]))
    word = (stream - 0x11111111) & 0xFFFFFFFF
    got, ones = gptq.read_zeros(torch.tensor([[_to_int32(word)]], dtype=torch.int32), 4, 8, v1=True)
    assert torch.equal(got, zeros.to(torch.int16)) and ones == 1


# ----------------------------------------------------------------------- checkpoints
def _layer_tensors(K, N, bits, group_size, sym, act_order, gen):
    gs = K if group_size == -1 else group_size
    G = K // gs
    q = torch.randint(0, 1 << bits, (K, N), generator=gen)
    scales = (torch.rand(G, N, generator=gen) * 0.02 + 0.002).half()
    if sym:
        zeros = torch.full((G, N), 1 << (bits - 1))
    else:
        zeros = torch.randint(1, 1 << bits, (G, N), generator=gen)   # >= 1: v1 can hold every one
    if act_order and G > 1:
        order = torch.randperm(K, generator=gen)
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[order] = (torch.arange(K) // gs).to(torch.int32)
    else:
        g_idx = (torch.arange(K) // gs).to(torch.int32)
    return q, zeros, scales, g_idx


def make_checkpoint(path: Path, bits=4, group_size=32, sym=True, fmt="gptq", act_order=False, lm_head=False,
                    seed=0, extra_config=None, with_g_idx=True, overrides=None, dense=()):
    """A GPTQ directory of a tiny random Llama; returns (dense reference model, {layer: fp32 weight}).
    ``overrides``: {projection: (bits, group_size)} for per-module formats; ``dense``:
    projections left unquantised."""
    model = tiny_model("llama", seed=seed)
    tok = tiny_tokenizer()
    gen = torch.Generator().manual_seed(seed + 100)
    tensors, reference = {}, {}
    names = [f"model.layers.{i}.{lin}" for i in range(model.config.num_hidden_layers) for lin in LINEARS]
    if lm_head:
        names.append("lm_head")
        model.config.tie_word_embeddings = False
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    names = [n for n in names if not n.endswith(tuple(dense))] if dense else names
    for name in names:
        linear = model.get_submodule(name)
        N, K = linear.weight.shape
        b, gs = next((f for proj, f in (overrides or {}).items() if name.endswith(proj)), (bits, group_size))
        q, zeros, scales, g_idx = _layer_tensors(K, N, b, gs, sym, act_order, gen)
        tensors[f"{name}.qweight"] = pack_qweight(q, b)
        tensors[f"{name}.qzeros"] = pack_qzeros(zeros, b, fmt == "gptq")
        tensors[f"{name}.scales"] = scales
        if with_g_idx:
            tensors[f"{name}.g_idx"] = g_idx
        reference[name] = gptq_weight(q, zeros, scales, g_idx)
        with torch.no_grad():
            linear.weight.copy_(reference[name])
    for name, t in model.state_dict().items():
        if name.rsplit(".", 1)[0] in reference or name == "lm_head.weight" and not lm_head:
            continue
        tensors[name] = t.half().contiguous()   # GPTQ checkpoints keep the rest in fp16
        with torch.no_grad():
            t.copy_(t.half().float())           # the reference holds what the file holds
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    tok.save_pretrained(path)
    model.config.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order, "sym": sym,
          "checkpoint_format": fmt, "true_sequential": True, "damp_percent": 0.01, "lm_head": lm_head,
          **(extra_config or {})}
    config["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(config))
    return model, reference


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(seed=1):
    return torch.randint(4, 380, (2, 20), generator=torch.Generator().manual_seed(seed))


CASES = {
    "w4-g32-sym-v1": dict(bits=4, group_size=32, sym=True, fmt="gptq"),
    "w4-g32-asym-v2": dict(bits=4, group_size=32, sym=False, fmt="gptq_v2"),
    "w4-g32-asym-v1-actorder": dict(bits=4, group_size=32, sym=False, fmt="gptq", act_order=True),
    "w4-channel-sym-v2": dict(bits=4, group_size=-1, sym=True, fmt="gptq_v2"),
    "w8-g32-sym-v1-actorder": dict(bits=8, group_size=32, sym=True, fmt="gptq", act_order=True),
    "w8-channel-asym-v1": dict(bits=8, group_size=-1, sym=False, fmt="gptq"),
    "w3-g32-asym-v2": dict(bits=3, group_size=32, sym=False, fmt="gptq_v2"),
    "w2-g32-sym-v1-actorder": dict(bits=2, group_size=32, sym=True, fmt="gptq", act_order=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_is_exact(tmp_path, case):
    kw = CASES[case]
    dense, reference = make_checkpoint(tmp_path / "ckpt", **kw)
    model, tok = slimformer.load(tmp_path / "ckpt")
    for name, weight in reference.items():
        module = model.get_submodule(name)
        act_order = kw.get("act_order", False)
        assert isinstance(module, ActOrderLinear if act_order else QuantLinear), name
        inner = module.inner if act_order else module
        assert inner.weight_spec.bits == kw["bits"]
        assert inner.weight_spec.symmetric == kw["sym"]
        assert inner.weight_spec.granularity == ("channel" if kw["group_size"] == -1 else "group")
        assert torch.equal(module.dequantized_weight(), weight), name
    assert model.slimformer_meta["imported_from"] == "gptq"
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = _ids()
    expected = _logits(dense, ids)
    torch.testing.assert_close(_logits(model, ids), expected, atol=2e-4 * float(expected.abs().max()), rtol=1e-4)


def test_act_order_permutes_columns_exactly(tmp_path):
    make_checkpoint(tmp_path / "c", **CASES["w4-g32-asym-v1-actorder"])
    model, _ = slimformer.load(tmp_path / "c")
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    perm = layer.input_perm
    assert not torch.equal(perm, torch.arange(perm.numel()))
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().t(), atol=1e-5, rtol=1e-5)
    # the inner groups are contiguous: each 32 permuted columns share one scale per row
    assert layer.inner.scale.shape == (layer.out_features, layer.in_features // 32)


def test_old_checkpoint_without_g_idx_and_quantised_head(tmp_path):
    dense, reference = make_checkpoint(tmp_path / "c", bits=4, group_size=32, sym=False, fmt="gptq",
                                       lm_head=True, with_g_idx=False)
    model, _ = slimformer.load(tmp_path / "c")
    assert isinstance(model.lm_head, QuantLinear)
    assert torch.equal(model.lm_head.dequantized_weight(), reference["lm_head"])
    assert isinstance(model.model.embed_tokens.weight, nn.Parameter)
    ids = _ids(2)
    expected = _logits(dense, ids)
    torch.testing.assert_close(_logits(model, ids), expected, atol=2e-4 * float(expected.abs().max()), rtol=1e-4)


def test_per_module_overrides_and_excluded_modules(tmp_path):
    """GPTQModel's ``dynamic``: down_proj in 8 bits per channel, o_proj left unquantised."""
    dynamic = {r"+:.*down_proj": {"bits": 8, "group_size": -1}, r"-:.*o_proj": {}}
    dense, reference = make_checkpoint(tmp_path / "c", bits=4, group_size=32, sym=False, fmt="gptq",
                                       overrides={"mlp.down_proj": (8, -1)}, dense=("self_attn.o_proj",),
                                       extra_config={"dynamic": dynamic})
    model, _ = slimformer.load(tmp_path / "c")
    down = model.get_submodule("model.layers.1.mlp.down_proj")
    assert (down.weight_spec.bits, down.weight_spec.granularity) == (8, "channel")
    up = model.get_submodule("model.layers.1.mlp.up_proj")
    assert (up.weight_spec.bits, up.weight_spec.group_size) == (4, 32)
    assert isinstance(model.get_submodule("model.layers.0.self_attn.o_proj"), nn.Linear)
    for name, weight in reference.items():
        assert torch.equal(model.get_submodule(name).dequantized_weight(), weight), name
    ids = _ids(7)
    expected = _logits(dense, ids)
    torch.testing.assert_close(_logits(model, ids), expected, atol=2e-4 * float(expected.abs().max()), rtol=1e-4)
    # a layer whose shapes fit none of the declared formats is refused naming its tensor
    _edit_config(tmp_path / "c", dynamic={r"-:.*o_proj": {}})
    with pytest.raises(ModelLoadError, match="model.layers.0.mlp.down_proj.qweight has shape"):
        slimformer.load(tmp_path / "c")


def test_our_rtn_model_packed_to_gptq_round_trips(tmp_path):
    """Our own quantiser's codes, written in the GPTQ layout by the test's packer, load back
    to the same dequantised weights and logits."""
    model, tok = tiny_model("llama", seed=3), tiny_tokenizer()
    # the int8 embedding table has no GPTQ form: the recipe's QuantizeEmbeddings stage is off here
    ours = slimformer.compress((model, tok), "rtn-w4-g64-asym", overrides=["QuantizeEmbeddings.enabled=false"]).model
    tensors = {}
    for name, module in ours.named_modules():
        if isinstance(module, QuantLinear):
            codes = module.codes().t()                                 # [K, N]
            zeros = module.zero.t()                                    # [G, N]
            tensors[f"{name}.qweight"] = pack_qweight(codes, 4)
            tensors[f"{name}.qzeros"] = pack_qzeros(zeros, 4, v1=False)
            tensors[f"{name}.scales"] = module.scale.t().contiguous()
            tensors[f"{name}.g_idx"] = (torch.arange(module.in_features) // 64).to(torch.int32)
    for name, t in ours.state_dict().items():
        if name.rsplit(".", 1)[0] + ".qweight" not in tensors and name != "lm_head.weight":
            tensors[name] = t.contiguous()
    out = tmp_path / "rtn-gptq"
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    tok.save_pretrained(out)
    ours.config.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": False,
                                     "desc_act": False, "checkpoint_format": "gptq_v2"}
    (out / "config.json").write_text(json.dumps(config))
    loaded, _ = slimformer.load(out)
    for name, module in ours.named_modules():
        if isinstance(module, QuantLinear):
            assert torch.equal(loaded.get_submodule(name).dequantized_weight(), module.dequantized_weight())
    ids = _ids(3)
    torch.testing.assert_close(_logits(loaded, ids), _logits(ours, ids), atol=0, rtol=0)


# ----------------------------------------------------------------------- what runs on an import
def test_eval_and_native_generate(tmp_path):
    dense, _ = make_checkpoint(tmp_path / "c", **CASES["w4-g32-sym-v1"])
    tok = tiny_tokenizer()
    result = slimformer.evaluate(str(tmp_path / "c"), "pydoc", seqlen=64, windows=2, progress=False)
    reference = slimformer.evaluate((dense, tok), "pydoc", seqlen=64, windows=2, progress=False)
    assert result["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-4)
    assert result["stored_bytes"] == (tmp_path / "c" / "model.safetensors").stat().st_size
    model, tok = slimformer.load(tmp_path / "c")
    prompts = ["def f(x):", "The object"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # every layer runs natively: no fallback
        native = slimformer.generate((model, tok), prompts, max_new_tokens=12, ignore_eos=True, engine="native")
    hf = slimformer.generate((model, tok), prompts, max_new_tokens=12, ignore_eos=True, engine="hf")
    assert native.engine == "native"
    assert [g.token_ids for g in native] == [g.token_ids for g in hf]


def test_act_order_runs_native_dense_with_a_warning(tmp_path):
    make_checkpoint(tmp_path / "c", **CASES["w4-g32-asym-v1-actorder"])
    model, tok = slimformer.load(tmp_path / "c")
    with pytest.warns(RuntimeWarning, match="act-order"):
        native = slimformer.generate((model, tok), ["def f(x):"], max_new_tokens=8, ignore_eos=True, engine="native")
    hf = slimformer.generate((model, tok), ["def f(x):"], max_new_tokens=8, ignore_eos=True, engine="hf")
    assert native[0].token_ids == hf[0].token_ids


def test_import_saves_and_reloads_as_compressed(tmp_path):
    make_checkpoint(tmp_path / "c", **CASES["w4-g32-asym-v1-actorder"])
    model, tok = slimformer.load(tmp_path / "c")
    from slimformer.api import export

    out = export((model, tok), tmp_path / "saved", "compressed")
    again, _ = slimformer.load(out)
    for name, module in model.named_modules():
        if isinstance(module, ActOrderLinear):
            back = again.get_submodule(name)
            assert isinstance(back, ActOrderLinear) and torch.equal(back.input_perm, module.input_perm)
            assert torch.equal(back.dequantized_weight(), module.dequantized_weight())
    ids = _ids(4)
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids), atol=0, rtol=0)


def test_a_saved_input_permutation_that_gathers_outside_the_input_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from slimformer.errors import ModelLoadError

    make_checkpoint(tmp_path / "c", **CASES["w4-g32-asym-v1-actorder"])
    from slimformer.api import export

    out = export(slimformer.load(tmp_path / "c"), tmp_path / "saved", "compressed")
    tensors = load_file(str(out / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("input_perm"))
    tensors[key] = tensors[key].clone()
    tensors[key][0] = 10**6            # same shape and dtype, an index far past the input
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ModelLoadError) as exc:
        slimformer.load(out)
    assert "permutation" in _one_line(exc)


# ----------------------------------------------------------------------- bad input
def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def _edit_config(path: Path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config["quantization_config"].pop(key, None)
        else:
            config["quantization_config"][key] = value
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture
def ckpt(tmp_path):
    make_checkpoint(tmp_path / "c", bits=4, group_size=32)
    return tmp_path / "c"


@pytest.mark.parametrize("change,field", [
    (dict(bits=5), "bits"), (dict(bits="4"), "bits"), (dict(bits=None), "bits"), (dict(group_size=None), "group_size"),
    (dict(group_size=0), "group_size"), (dict(sym="yes"), "sym"),
    (dict(checkpoint_format="marlin"), "checkpoint_format"),
    (dict(pack_dtype="int16"), "pack_dtype"), (dict(dynamic={"+:.*down": {"bits": 5}}), "dynamic"),
    (dict(dynamic={".*down": {"damp": 0.1}}), "dynamic"), (dict(dynamic=[1]), "dynamic"),
    (dict(lm_head=True), "lm_head"), (dict(group_size=48), "group_size"), (dict(bits=8), "qweight"),
])
def test_bad_config_fields(ckpt, change, field):
    _edit_config(ckpt, **change)
    with pytest.raises(ModelLoadError) as err:
        slimformer.load(ckpt)
    text = _one_line(err)
    assert field in text and str(ckpt) in text


def test_truncated_safetensors(ckpt):
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelLoadError) as err:
        slimformer.load(ckpt)
    assert "model.safetensors" in _one_line(err)


def _rewrite(ckpt: Path, edit):
    from safetensors.torch import load_file

    tensors = load_file(str(ckpt / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(ckpt / "model.safetensors"))


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.qweight", t["model.layers.0.mlp.up_proj.qweight"][:-1]),
     "model.layers.0.mlp.up_proj.qweight"),
    (lambda t: t.__setitem__("model.layers.1.self_attn.k_proj.scales",
                             t["model.layers.1.self_attn.k_proj.scales"].float()[:, :-1].contiguous()),
     "model.layers.1.self_attn.k_proj.scales"),
    (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.qzeros", t["model.layers.0.mlp.up_proj.qzeros"].long()),
     "model.layers.0.mlp.up_proj.qzeros"),
    (lambda t: t.pop("model.layers.0.self_attn.o_proj.qzeros"), "model.layers.0.self_attn.o_proj.qzeros"),
    (lambda t: t.pop("model.norm.weight"), "model.norm.weight"),
    (lambda t: t.__setitem__("model.layers.0.mlp.gate_proj.g_idx", torch.zeros(64, dtype=torch.int32)),
     "model.layers.0.mlp.gate_proj.g_idx"),
    (lambda t: t.__setitem__("model.layers.0.mlp.gate_proj.g_idx", torch.full((64,), 7, dtype=torch.int32)),
     "model.layers.0.mlp.gate_proj.g_idx"),
    (lambda t: t.__setitem__("model.layers.0.input_layernorm.qweight", torch.zeros(8, 64, dtype=torch.int32)),
     "model.layers.0.input_layernorm.qweight"),
    (lambda t: t.__setitem__("model.extra.weight", torch.zeros(3)), "model.extra.weight"),
    (lambda t: t.__setitem__("model.norm.weight", torch.zeros(65)), "model.norm.weight"),
])
def test_inconsistent_tensors(ckpt, edit, needle):
    _rewrite(ckpt, edit)
    with pytest.raises(ModelLoadError) as err:
        slimformer.load(ckpt)
    text = _one_line(err)
    assert needle in text


def test_pickle_only_checkpoint_is_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UnsafeCheckpointError) as err:
        slimformer.load(ckpt)
    assert "pickle" in _one_line(err)


def test_errors_are_slimformer_errors_and_nothing_is_written(ckpt):
    before = sorted(p.name for p in ckpt.iterdir())
    _edit_config(ckpt, bits=6)
    with pytest.raises(SlimformerError):
        slimformer.load(ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == before


# ----------------------------------------------------------------------- the gptq exporter
def test_our_gptq_exported_and_loaded_back_exactly(tmp_path):
    """Our GPTQ -> ``export --format gptq`` -> ``slimformer.load``: the same codes, scales and
    logits; the written words equal the test's own packer's."""
    from safetensors import safe_open

    from slimformer.api import export

    model, tok = tiny_model("llama", seed=4), tiny_tokenizer()
    ours = slimformer.compress((model, tok), "gptq-w4-g32", calib="pydoc", calib_samples=4, seqlen=64,
                               progress=False).model
    out = export((ours, tok), tmp_path / "gptq", "gptq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["checkpoint_format"], qc["desc_act"]) == (4, 32, "gptq", False)
    loaded, _ = slimformer.load(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for name, module in ours.named_modules():
            if not isinstance(module, QuantLinear):
                continue
            back = loaded.get_submodule(name)
            assert torch.equal(back.codes(), module.codes()) and torch.equal(back.scale, module.scale)
            assert torch.equal(back.dequantized_weight(), module.dequantized_weight())
            assert torch.equal(f.get_tensor(f"{name}.qweight"), pack_qweight(module.codes().t(), 4))
            zeros = module.zero.t() if module.zero.numel() else torch.full((module.in_features // 32,
                                                                             module.out_features), 8)
            assert torch.equal(f.get_tensor(f"{name}.qzeros"), pack_qzeros(zeros, 4, v1=True))
    ids = _ids(5)
    torch.testing.assert_close(_logits(loaded, ids), _logits(ours, ids), atol=0, rtol=0)


@pytest.mark.parametrize("case", ["w4-g32-asym-v1-actorder", "w3-g32-asym-v2", "w8-channel-asym-v1"])
def test_import_export_import_is_exact(tmp_path, case):
    from slimformer.api import export

    make_checkpoint(tmp_path / "c", **CASES[case])
    first, tok = slimformer.load(tmp_path / "c")
    out = export((first, tok), tmp_path / "again", "gptq")
    second, _ = slimformer.load(out)
    for name, module in first.named_modules():
        if isinstance(module, (QuantLinear, ActOrderLinear)):
            assert type(second.get_submodule(name)) is type(module)
            assert torch.equal(second.get_submodule(name).dequantized_weight(), module.dequantized_weight())


def test_exporter_refuses_what_gptq_cannot_hold(tmp_path):
    from slimformer.api import export
    from slimformer.errors import ExportError

    model, tok = tiny_model("llama", seed=5), tiny_tokenizer()
    w8a8 = slimformer.compress((model, tok), "rtn-w8a8").model
    with pytest.raises(ExportError, match="model.layers.0.self_attn.q_proj") as err:
        export((w8a8, tok), tmp_path / "x", "gptq")
    _one_line(err)
    with pytest.raises(ExportError, match="no quantised layer"):
        export((tiny_model("llama"), tok), tmp_path / "y", "gptq")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_compress_export_gptq_load(tmp_path, capsys):
    from slimformer.cli import main

    src = tmp_path / "tiny"
    tiny_model("llama", seed=6).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    assert main(["--quiet", "compress", str(src), "--recipe", "rtn-w4-g32", "--out", str(tmp_path / "q")]) == 0
    assert main(["--quiet", "export", str(tmp_path / "q"), "--format", "gptq", "--out", str(tmp_path / "g")]) == 0
    ours, _ = slimformer.load(tmp_path / "q")
    back, _ = slimformer.load(tmp_path / "g")
    assert back.slimformer_meta["imported_from"] == "gptq"
    ids = _ids(6)
    torch.testing.assert_close(_logits(back, ids), _logits(ours, ids), atol=0, rtol=0)
    # a bad checkpoint: one line on stderr, exit 2
    _edit_config(tmp_path / "g", bits=5)
    capsys.readouterr()
    assert main(["--quiet", "eval", str(tmp_path / "g"), "--windows", "1", "--seqlen", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "quantization_config.bits" in err


def test_sharded_checkpoint_and_its_index(tmp_path):
    from safetensors.torch import load_file

    dense, reference = make_checkpoint(tmp_path / "c", **CASES["w4-g32-sym-v1"])
    ckpt = tmp_path / "c"
    tensors = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in parts.items():
        save_file({n: tensors[n] for n in part}, str(ckpt / file))
        weight_map.update({n: file for n in part})
    index = ckpt / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model, _ = slimformer.load(ckpt)
    for name, weight in reference.items():
        assert torch.equal(model.get_submodule(name).dequantized_weight(), weight)
    # an index may only name files in the directory
    index.write_text(json.dumps({"weight_map": {**weight_map, names[0]: "../elsewhere.safetensors"}}))
    with pytest.raises(ModelLoadError, match="weight_map") as err:
        slimformer.load(ckpt)
    assert "model.safetensors.index.json" in _one_line(err)


def test_unknown_fields_are_warned_and_recorded(tmp_path):
    make_checkpoint(tmp_path / "c", extra_config={"some_new_option": 3})
    with pytest.warns(RuntimeWarning, match="some_new_option"):
        model, _ = slimformer.load(tmp_path / "c")
    assert any("some_new_option" in n for n in model.slimformer_meta["notes"])


def test_non_finite_scales_are_refused(ckpt):
    def edit(t):
        t["model.layers.0.mlp.up_proj.scales"][0, 0] = float("inf")
    _rewrite(ckpt, edit)
    with pytest.raises(ModelLoadError, match="model.layers.0.mlp.up_proj.scales") as err:
        slimformer.load(ckpt)
    _one_line(err)
