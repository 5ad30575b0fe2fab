"""QuantizeEmbeddings: int8 embedding tables and the tied LM head reading the same codes."""

from __future__ import annotations

import copy
import json
import struct

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from slimformer import api
from slimformer.errors import QuantConfigError, RecipeError
from slimformer.formats.gguf import from_gguf_tensor, to_gguf_blocks
from slimformer.models.compressed import WEIGHTS_FILE, load_compressed, save_compressed
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.nn.quant_embedding import QuantEmbedding, QuantTiedHead
from slimformer.nn.quant_linear import QuantLinear
from slimformer.plugins import load_builtin
from slimformer.recipes import apply_overrides, load_recipe
from slimformer.runtime.decoder import NativeDecoder
from slimformer.techniques.quant.embedding import QuantizeEmbeddings, quantize_embeddings

load_builtin()


def reference_rtn(w: torch.Tensor, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 RTN of ``w`` in groups of ``gs`` columns, written out independently:
    scale = absmax / 127 rounded up to the next float16 (never below the smallest fp16
    subnormal), code = round(w / scale)."""
    V, H = w.shape
    g = w.double().reshape(V, H // gs, gs)
    scale = (g.abs().amax(-1) / 127).clamp_min(1e-12).clamp_min(2.0 ** -24)
    half = scale.half().double()
    half = torch.where(half < scale, torch.nextafter(scale.half(), torch.tensor(float("inf"), dtype=torch.half))
                       .double(), half)
    codes = torch.round(g / half[..., None].float().double()).clamp(-127, 127)
    return codes.reshape(V, H).to(torch.int8), half.half()


def _table(V=96, H=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, H, generator=g) * 0.05
    w[3, 5] = 0.9   # one outlier: its row (group) gets a coarser scale
    return w


@pytest.mark.parametrize("gs", [None, 32])
def test_codes_are_bit_exact_rtn_and_lookup_dequantises_rows(gs):
    w = _table()
    emb = QuantEmbedding.from_float(w, gs)
    codes, scale = reference_rtn(w, gs or w.shape[1])
    assert emb.qweight.dtype == torch.int8 and emb.scale.dtype == torch.float16
    assert torch.equal(emb.qweight, codes)
    assert torch.equal(emb.scale, scale)
    ids = torch.tensor([[3, 0, 95], [7, 7, 1]])
    table = (codes.float().reshape(96, -1, gs or 64) * scale.float()[..., None]).reshape(96, 64)
    assert torch.equal(emb(ids), table[ids])
    assert torch.equal(emb.dequantized_weight(), table)
    # the description is the stored codes and scales themselves
    m = emb.matrix("e")
    assert m.w.data_ptr() == emb.qweight.data_ptr() and m.scale.data_ptr() == emb.scale.data_ptr()
    assert torch.equal(m.dequantize(), table)


@pytest.mark.parametrize("gs", [None, 32])
def test_the_table_is_gguf_q8_0(gs):
    emb = QuantEmbedding.from_float(_table(), gs)
    # per row: Q8_0 blocks with the row's scale repeated (asked for with group_size=32)
    m = emb.matrix("token_embd", group_size=32)
    assert m.w.data_ptr() == emb.qweight.data_ptr() and m.gs == 32
    qtype, data = to_gguf_blocks(m)
    assert qtype == "Q8_0"
    back = from_gguf_tensor("token_embd", "Q8_0", data.reshape(-1), m.N, m.K)
    assert torch.equal(back.codes(), emb.qweight)
    assert torch.equal(back.dequantize(), emb.dequantized_weight())


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 8), groups=st.integers(1, 4), scale=st.floats(1e-4, 1e3), seed=st.integers(0, 10_000),
       grouped=st.booleans())
def test_error_is_at_most_half_a_step(rows, groups, scale, seed, grouped):
    w = torch.randn(rows, 32 * groups, generator=torch.Generator().manual_seed(seed)) * scale
    emb = QuantEmbedding.from_float(w, 32 if grouped else None)
    gs = 32 if grouped else w.shape[1]
    step = emb.scale.float().repeat_interleave(gs, dim=1)
    assert emb.qweight.abs().max() <= 127
    assert bool(((emb.dequantized_weight() - w).abs() <= step / 2 + 1e-6 * step).all())
    # the scale spans the range: the largest |w| of each group is within one step of 127 * scale
    assert bool((w.abs().reshape(rows, -1, gs).amax(-1) <= 127.5 * emb.scale.float()).all())


def _ids(n=20, seed=0):
    return torch.randint(0, 300, (1, n), generator=torch.Generator().manual_seed(seed))


def test_tied_head_shares_the_codes_and_runs_the_int8_kernel():
    model = tiny_model("llama")
    facts, notes = quantize_embeddings(model)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantTiedHead) and not notes
    assert head.embedding is emb
    assert facts["model.embed_tokens"]["tied_head"] == "lm_head"
    assert facts["model.embed_tokens"]["bytes_after"] == 384 * 64 + 2 * 384
    # one storage: the head holds no tensors of its own
    names = list(model.state_dict())
    assert [n for n in names if "embed_tokens" in n] == ["model.embed_tokens.qweight", "model.embed_tokens.scale"]
    assert not [n for n in names if n.startswith("lm_head")]
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(head(x), x @ emb.dequantized_weight().t(), atol=1e-4, rtol=1e-4)
    assert head.runtime_fallback() is None   # per row: the int8 kernel on the embedding's own codes
    # a copy of the model ties its own head to its own table (compare/compress copy models)
    twin = copy.deepcopy(model)
    assert twin.lm_head.embedding is twin.model.embed_tokens and twin.lm_head.embedding is not emb


def test_grouped_head_falls_back_to_tiles_and_says_so(monkeypatch):
    from slimformer.nn import base

    monkeypatch.setattr(base, "_WARNED", set())   # warned once per process: another test may have seen it
    model = tiny_model("llama")
    quantize_embeddings(model, 32)
    x = torch.randn(2, 5, 64)
    with pytest.warns(RuntimeWarning, match="groups of 32 have no int8 kernel"):
        y = model.lm_head(x)
    torch.testing.assert_close(y, x @ model.model.embed_tokens.dequantized_weight().t(), atol=1e-4, rtol=1e-4)
    assert "tile by tile" in model.lm_head.fallback


def _header(path) -> dict:
    raw = (path / WEIGHTS_FILE).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n])


@pytest.mark.parametrize("gs", [None, 32])
def test_save_load_keeps_one_table_and_the_tie(tmp_path, gs):
    model = tiny_model("llama")
    quantize_embeddings(model, gs)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    save_compressed(model, tiny_tokenizer(), tmp_path / "m")
    header = _header(tmp_path / "m")
    table = {k: v for k, v in header.items() if "embed_tokens" in k or "lm_head" in k}
    assert set(table) == {"model.embed_tokens.qweight", "model.embed_tokens.scale"}
    assert table["model.embed_tokens.qweight"]["dtype"] == "I8"
    start, end = table["model.embed_tokens.qweight"]["data_offsets"]
    assert end - start == 384 * 64   # one byte per weight, stored once
    loaded, _ = load_compressed(tmp_path / "m")
    emb, head = loaded.model.embed_tokens, loaded.lm_head
    assert isinstance(head, QuantTiedHead) and head.embedding is emb
    assert torch.equal(emb.qweight, model.model.embed_tokens.qweight)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


@pytest.mark.parametrize("gs,tie", [(None, True), (32, True), (None, False), (32, False)])
@pytest.mark.filterwarnings("ignore:slimformer")
def test_native_decoder_reads_the_int8_table_and_agrees_with_hf(gs, tie):
    model = tiny_model("llama", tie_word_embeddings=tie, seed=1)
    quantize_embeddings(model, gs)
    if not tie:
        assert isinstance(model.lm_head, QuantLinear) and model.lm_head.weight_spec.bits == 8
    dec = NativeDecoder.from_model(model)
    assert dec.lm_head.kind == 1 and dec.embed.kind == 1   # Q8 both
    if tie:
        assert dec.embed is dec.lm_head and dec.embed.w.data_ptr() == model.model.embed_tokens.qweight.data_ptr()
    ids = _ids(24, seed=2)[0].tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(dec.forward_logits(ids), ref, atol=2e-4, rtol=0)
    sess = dec.new_session(1, 32)
    # (the session's logits buffer is reused by every step: keep copies)
    steps = [dec.prefill(sess, [ids[:8]])[0].clone()] + [dec.decode(sess, [t])[0].clone() for t in ids[8:]]
    native = torch.stack(steps)
    torch.testing.assert_close(native, ref[7:], atol=2e-4, rtol=0)
    assert torch.equal(native.argmax(-1), ref[7:].argmax(-1))


def test_encoder_word_embeddings(tmp_path):
    model = tiny_model("bert")
    tok = tiny_tokenizer()
    result = api.compress((model, tok), "rtn-w8", tmp_path / "enc", progress=False)
    emb = result.model.embeddings.word_embeddings
    assert isinstance(emb, QuantEmbedding)
    assert result.run.layers["embeddings.word_embeddings"]["tied_head"] is None
    # the other embedding tables are left as they are
    assert isinstance(result.model.embeddings.position_embeddings, nn.Embedding)
    ids = _ids(12)
    reference = api.compress((model, tok), "rtn-w8", progress=False,
                             overrides=["QuantizeEmbeddings.enabled=false"]).model
    with torch.no_grad():
        out = result.model(input_ids=ids).last_hidden_state
        ref = reference(input_ids=ids).last_hidden_state
        cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    assert cos.min() > 0.999 and not torch.equal(out, ref)
    loaded = load_compressed(tmp_path / "enc")[0].eval()   # (the loader of `slimformer.load` sets eval mode)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, out)


def test_recipes_end_with_the_stage_and_can_opt_out(tmp_path):
    pair = (tiny_model("llama"), tiny_tokenizer())
    recipe = load_recipe("rtn-w4-g32")
    assert isinstance(recipe.stages[-1], QuantizeEmbeddings) and recipe.stages[-1].granularity == "row"
    on = api.compress(pair, recipe, tmp_path / "on", progress=False)
    off = api.compress(pair, apply_overrides(recipe, ["QuantizeEmbeddings.enabled=false"]), tmp_path / "off",
                       progress=False)
    assert isinstance(on.model.model.embed_tokens, QuantEmbedding)
    assert type(off.model.model.embed_tokens) is nn.Embedding and off.model.lm_head.weight is \
        off.model.model.embed_tokens.weight
    facts = on.run.layers["model.embed_tokens"]
    assert facts["bytes_before"] - facts["bytes_after"] == 384 * 64 * 3 - 384 * 2
    # the saving is on disk: fp32 table (stored once, tied) -> int8 codes + fp16 scales
    assert off.stored_bytes - on.stored_bytes == pytest.approx(384 * 64 * 3 - 384 * 2, abs=400)
    assert "embed_tokens" not in json.dumps(off.run.layers)


def test_the_stage_refuses_what_it_cannot_do():
    with pytest.raises(RecipeError, match="bits must be 8"):
        QuantizeEmbeddings(bits=4)
    with pytest.raises(QuantConfigError, match="model.embed_tokens: group_size 48 does not divide"):
        quantize_embeddings(tiny_model("llama"), 48)


def test_a_head_without_its_embedding_is_a_load_error():
    from slimformer.errors import ModelLoadError

    head = QuantTiedHead.from_config({"embedding": "model.embed_tokens", "in_features": 64, "out_features": 384})
    with pytest.raises(ModelLoadError, match="not a QuantEmbedding"):
        head.link(tiny_model("llama"))
    with pytest.raises(ModelLoadError, match="was not linked"):
        head(torch.randn(1, 64))


def test_offload_directory_keeps_the_tie(tmp_path):
    from slimformer.runtime.offload import load_offloaded, save_offloadable

    model = tiny_model("llama")
    quantize_embeddings(model)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    save_offloadable(model, tmp_path / "off", tiny_tokenizer())
    loaded, _ = load_offloaded(tmp_path / "off", None)
    assert loaded.lm_head.embedding is loaded.model.embed_tokens
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


def test_after_gptq_the_stage_costs_no_extra_block_forward():
    """GPTQ's one-pass forward already gives each next block's inputs; the stage, which
    changes no block, must not make the runner forward every block again."""
    from slimformer.core.runner import run_transforms
    from slimformer.techniques.quant.gptq import GPTQ

    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(3))
    counts, codes = [], []
    for stages in ([GPTQ(bits=4, granularity="group", group_size=32)],
                   [GPTQ(bits=4, granularity="group", group_size=32), QuantizeEmbeddings()]):
        model = tiny_model("llama", seed=4)
        calls = [0]
        for block in model.model.layers:
            block.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        run_transforms(model, stages, calib=calib, progress=False)
        counts.append(calls[0])
        codes.append([m.qweight for m in model.modules() if isinstance(m, QuantLinear)])
    assert counts[0] == counts[1]
    assert all(torch.equal(a, b) for a, b in zip(*codes))
