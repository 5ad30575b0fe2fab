"""The GGUF exporter: compressed layers land in GGUF blocks bit for bit (read back with
the gguf package and undone Q/K row order), transformers' GGUF loader computes the same
logits as our model, and what does not fit is refused in one line (or requantised on
request and recorded)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import slimformer
from slimformer import api
from slimformer.core.runner import run_transforms
from slimformer.errors import ExportError, OutputExistsError
from slimformer.export.gguf import GGUFExportWarning, rotary_row_order
from slimformer.formats.gguf import from_gguf_tensor
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.nn.quant_linear import QuantLinear
from slimformer.techniques.quant.rtn import RTN

gguf = pytest.importorskip("gguf")

NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}

FITS = {   # RTN format -> the GGUF type its codes go to unchanged
    "w4-g32-sym": (RTN(bits=4, granularity="group", group_size=32), "Q4_0"),
    "w4-g32-asym": (RTN(bits=4, granularity="group", group_size=32, symmetric=False), "Q4_1"),
    "w8-g32-sym": (RTN(bits=8, granularity="group", group_size=32), "Q8_0"),
    "w8-channel-sym": (RTN(bits=8, granularity="channel"), "Q8_0"),
    "w4-g64-sym": (RTN(bits=4, granularity="group", group_size=64), "Q4_0"),
    "w4-channel-sym": (RTN(bits=4, granularity="channel"), "Q4_0"),
    "w3-g32-sym": (RTN(bits=3, granularity="group", group_size=32), "Q4_0"),
}


def quantised(stage, seed: int = 0, **overrides):
    model = tiny_model("llama", seed=seed, **overrides)
    run_transforms(model, [stage], progress=False)
    return model


def export(model, out: Path, **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GGUFExportWarning)
        return api.export((model, tiny_tokenizer()), out, "gguf", **kw)


def read(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: t for t in reader.tensors}, reader.fields


def read_matrix(t, name: str, rows_from: int | None = None):
    """A GGUF tensor as a description, Q/K rows put back in Hugging Face order."""
    K, N = int(t.shape[0]), int(t.shape[1])
    m = from_gguf_tensor(name, t.tensor_type.name, t.data, N, K)
    if rows_from is not None:
        m = m.select_rows(torch.argsort(rotary_row_order(N, rows_from)))
    return m


def field(fields, key):
    return fields[key].contents()


@pytest.mark.parametrize("fmt", list(FITS))
def test_codes_and_scales_are_written_bit_for_bit(tmp_path, fmt):
    stage, qtype = FITS[fmt]
    model = quantised(stage)
    path = export(model, tmp_path / "m.gguf", outtype="f32")
    tensors, fields = read(path)
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    asym = not stage.symmetric
    for i, block in enumerate(model.model.layers):
        for hf, short in NAMES.items():
            module = block.get_submodule(hf)
            assert isinstance(module, QuantLinear)
            t = tensors[f"blk.{i}.{short}.weight"]
            assert t.tensor_type.name == qtype
            got = read_matrix(t, hf, heads if short == "attn_q" else kv if short == "attn_k" else None)
            want = module.matrix(hf)
            G = want.K // 32
            scale = want.scale.float().repeat_interleave(want.gs // 32, dim=1)
            assert torch.equal(got.scale.float(), scale)          # the model's fp16 scales, each block
            if qtype == "Q8_0":
                assert torch.equal(got.w, want.w)                 # int8 codes as they are
            elif fmt.startswith("w3"):                           # 3-bit codes shifted onto Q4_0's zero of 8
                assert torch.equal(got.codes().long(), module.codes().long() + 4)
            else:
                assert torch.equal(got.codes(), module.codes())   # 4-bit codes as they are
            if asym:   # Q4_1: m = -zero * scale, stored as the nearest float16
                offset = want.offset().repeat_interleave(want.gs // 32, dim=1)
                assert torch.equal(got.offset(), offset.half().float())
                err = (got.dequantize() - module.dequantized_weight()).abs()
                assert float(err.max()) <= float(offset.abs().max()) * 2 ** -11
            else:      # everything else: the same weights, bit for bit
                assert torch.equal(got.dequantize(), module.dequantized_weight())
            assert got.groups == G
    # the rest: norms in F32, the tied embedding in the outtype, no separate head
    assert torch.equal(torch.from_numpy(np.array(tensors["output_norm.weight"].data)), model.model.norm.weight)
    assert torch.equal(read_matrix(tensors["token_embd.weight"], "e").w, model.model.embed_tokens.weight)
    assert "output.weight" not in tensors
    assert field(fields, "general.architecture") == "llama"
    assert field(fields, "llama.attention.head_count_kv") == kv
    assert field(fields, "llama.rope.dimension_count") == model.config.hidden_size // heads
    rounded = "slimformer.rounded_offsets" in fields
    assert rounded == asym   # recorded exactly when an offset moved


@pytest.mark.parametrize("fmt", ["w4-g32-sym", "w8-channel-sym", "w4-g32-asym"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_transformers_reads_the_same_model(tmp_path, fmt, tied):
    """transformers' GGUF loader (which undoes llama.cpp's Q/K row order) computes our
    model's logits: a wrong row permutation, tensor name or hyperparameter shows here."""
    model = quantised(FITS[fmt][0], seed=3, tie_word_embeddings=tied)
    path = export(model, tmp_path / "m.gguf", outtype="f32")
    assert ("output.weight" in read(path)[0]) == (not tied)
    loaded, tok = slimformer.load(path)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    for m in model.modules():   # the reference: the dequantised weights
        if isinstance(m, QuantLinear):
            m.forward = m.forward_reference
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    tol = 2e-3 if fmt.endswith("asym") else 1e-4      # asym: offsets rounded to float16
    assert torch.allclose(got, want, atol=tol, rtol=0), (got - want).abs().max()


def test_tokenizer_metadata_from_the_fast_tokenizer(tmp_path):
    tok = tiny_tokenizer()
    path = export(tiny_model("llama"), tmp_path / "m.gguf")
    _, fields = read(path)
    assert field(fields, "tokenizer.ggml.model") == "gpt2"
    assert field(fields, "tokenizer.ggml.pre") == "gpt-2"    # a plain byte-level pre-tokenizer
    tokens = field(fields, "tokenizer.ggml.tokens")
    assert tokens == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    assert field(fields, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field(fields, "slimformer.tokenizer") == "built from the Hugging Face tokenizer"
    _, loaded = slimformer.load(path)
    text = "def f(x):\n    return x + 1  # the same ids"
    assert loaded(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids


def test_an_unknown_pre_tokenizer_is_guessed_warned_and_recorded(tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tiny_tokenizer().backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    with pytest.warns(GGUFExportWarning, match="pre-tokenizer"):
        path = api.export((tiny_model("llama"), tok), tmp_path / "m.gguf", "gguf")
    _, fields = read(path)
    assert field(fields, "slimformer.tokenizer_pre_guessed") is True
    assert field(fields, "tokenizer.ggml.pre") == "gpt-2"


class _QuantTable(torch.nn.Embedding):
    """Stands in for a quantised embedding module (one with ``matrix()``): int8 codes per
    row; the model computes with their dequantised values."""

    def matrix(self, name: str = ""):
        return self.table.matrix(name)


def test_a_quantised_tied_embedding_is_written_as_its_blocks(tmp_path):
    from slimformer.formats.spec import WeightSpec

    model = quantised(FITS["w4-g32-sym"][0], seed=5)
    emb = model.model.embed_tokens
    table = QuantLinear.from_float(emb.weight.detach(), None, WeightSpec(bits=8, granularity="channel"))
    quant = _QuantTable(emb.num_embeddings, emb.embedding_dim)
    quant.weight = torch.nn.Parameter(table.dequantized_weight(), requires_grad=False)
    quant.table = table
    model.model.embed_tokens = quant
    model.lm_head.weight = quant.weight          # tied: the head multiplies with the same table
    path = export(model, tmp_path / "m.gguf", outtype="f32")
    tensors, _ = read(path)
    assert "output.weight" not in tensors
    t = tensors["token_embd.weight"]
    assert t.tensor_type.name == "Q8_0"
    got = read_matrix(t, "embed")
    assert torch.equal(got.w, table.matrix().w)   # the int8 codes, each row's scale in every block
    assert torch.equal(got.dequantize(), table.dequantized_weight())
    loaded, _ = slimformer.load(path)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.forward = m.forward_reference
    ids = torch.arange(30).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


def test_dense_layers_in_the_outtype(tmp_path):
    model = tiny_model("llama")
    path = export(model, tmp_path / "m.gguf", outtype="q8_0")
    tensors, fields = read(path)
    w = model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    t = tensors["blk.1.ffn_down.weight"]
    assert t.tensor_type.name == "Q8_0"
    assert np.array_equal(np.asarray(t.data), gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0))
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert field(fields, "general.file_type") == 7
    assert field(fields, "slimformer.outtype") == "q8_0"
    with pytest.raises(ExportError, match="outtype 'q5_k'"):
        export(model, tmp_path / "x.gguf", outtype="q5_k")


def test_what_does_not_fit_is_refused_in_one_line(tmp_path):
    model = quantised(RTN(bits=4, granularity="group", group_size=16))
    out = tmp_path / "m.gguf"
    with pytest.raises(ExportError) as exc:
        export(model, out)
    message = str(exc.value)
    assert "\n" not in message
    for part in ("model.layers.0.self_attn.q_proj", "w4-g16-sym", "Q4_0", "--requantize"):
        assert part in message
    assert list(tmp_path.iterdir()) == []   # nothing written, no temporary left

    w8a8 = quantised(RTN(bits=8, granularity="channel", act_bits=8, act_granularity="token"))
    with pytest.raises(ExportError, match="activations"):
        export(w8a8, out)
    asym8 = quantised(RTN(bits=8, granularity="group", group_size=32, symmetric=False))
    with pytest.raises(ExportError, match="w8-g32-asym"):
        export(asym8, out)


def test_requantize_writes_gguf_rounding_and_records_it(tmp_path):
    model = quantised(RTN(bits=4, granularity="group", group_size=16))
    with pytest.warns(GGUFExportWarning, match="14 layer"):
        path = api.export((model, tiny_tokenizer()), tmp_path / "m.gguf", "gguf", requantize=True)
    tensors, fields = read(path)
    records = field(fields, "slimformer.requantized")
    assert len(records) == 14
    assert records[0].startswith("model.layers.0.self_attn.q_proj: QuantLinear w4-g16-sym -> Q4_0")
    module = model.model.layers[0].mlp.up_proj
    t = tensors["blk.0.ffn_up.weight"]
    want = gguf.quants.quantize(module.dequantized_weight().numpy(), gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(np.asarray(t.data), want)     # llama.cpp's reference rounding of our weights


def test_refusals_before_writing(tmp_path):
    with pytest.raises(ExportError, match="architecture 'gpt2'"):
        export(tiny_model("gpt2"), tmp_path / "g.gguf")
    with pytest.raises(ExportError, match="sliding-window"):
        export(tiny_model("mistral"), tmp_path / "g.gguf")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="output file .* exists; pass --overwrite"):
        export(tiny_model("llama"), out)
    assert out.read_bytes() == b"keep me"
    assert list(tmp_path.iterdir()) == [out]


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")

    def broken(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(ExportError, match="disk full"):
        export(tiny_model("llama"), out, overwrite=True)
    assert out.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [out]


def test_cli_round_trip(tmp_path, capsys):
    from slimformer.cli import main

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "src")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    out = tmp_path / "m.gguf"
    argv = ["export", str(tmp_path / "src"), "--format", "gguf", "--out", str(out), "--outtype", "f32"]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    loaded, _ = slimformer.load(out)
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
    assert main(argv) != 0        # exists: refused in one line
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--overwrite" in err


@pytest.mark.slow
def test_smollm2_q4_0_export_decodes_the_same_tokens(tmp_path):
    """SmolLM2 at 4-bit g32 (symmetric) -> Q4_0 file -> the native decoder reading that
    file's blocks gives the greedy tokens of the native decoder on our model; the
    tokenizer keys are the built-in GGUF's, copied verbatim."""
    from slimformer.models.builtin import builtin_path
    from slimformer.recipes.schema import parse_recipe
    from slimformer.runtime.decoder import NativeDecoder, native_available
    from slimformer.runtime.loop import generate_ids

    if not native_available()[0]:
        pytest.skip("native decoder unavailable")
    model, tok = slimformer.load("smollm2-135m")
    recipe = parse_recipe("name: w4g32\nstages:\n  - RTN: {bits: 4, granularity: group, group_size: 32}\n")
    compressed = tmp_path / "c"
    api.compress((model, tok), recipe, compressed, progress=False, inplace=True, source_name="smollm2-135m")
    loaded, tok2 = slimformer.load(compressed)
    out = api.export((loaded, tok2), tmp_path / "m.gguf", "gguf", outtype="f32")   # the head exact
    tensors, fields = read(out)
    assert {t.tensor_type.name for n, t in tensors.items() if n.startswith("blk.") and len(t.shape) == 2} == {"Q4_0"}
    source = gguf.GGUFReader(str(builtin_path("smollm2-135m"))).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        assert fields[key].contents() == source[key].contents()
    assert field(fields, "slimformer.source") == "smollm2-135m"
    ids = tok("The capital of France is", add_special_tokens=False).input_ids
    mine = generate_ids(NativeDecoder.from_model(loaded), [ids], 24)[0]
    from_file = generate_ids(NativeDecoder.from_model(loaded, gguf_path=out), [ids], 24)[0]
    assert from_file == mine
