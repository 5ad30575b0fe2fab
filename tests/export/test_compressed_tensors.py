"""compressed-tensors export and import, and the plain Hugging Face export.

The acceptance test: transformers (with the compressed-tensors package, a test extra)
loads our export and computes our model's logits; its dense weights are our dequantised
weights bit for bit. Our reader gives back the same codes, and reads checkpoints made by
the package's own compressor into layers whose weights equal the package's decompression.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import slimformer
from slimformer import api
from slimformer.errors import ExportError, ModelLoadError, OutputExistsError
from slimformer.formats import compressed_tensors as ct
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.nn.input_scaled import InputScaledLinear
from slimformer.nn.quant_linear import QuantLinear
from slimformer.nn.surgery import set_module
from slimformer.recipes.schema import parse_recipe

ctp = pytest.importorskip("compressed_tensors")

RECIPES = {
    "w4-g32-sym": "RTN: {bits: 4, granularity: group, group_size: 32}",
    "w4-g32-asym": "RTN: {bits: 4, granularity: group, group_size: 32, symmetric: false}",
    "w4-channel-sym": "RTN: {bits: 4, granularity: channel}",
    "w4-channel-asym": "RTN: {bits: 4, granularity: channel, symmetric: false}",
    "w3-g16-asym": "RTN: {bits: 3, granularity: group, group_size: 16, symmetric: false}",
    "w8a8": "RTN: {bits: 8, granularity: channel, act_bits: 8, act_granularity: token, act_dynamic: true}",
}


def _compress(spec: str, family: str = "llama"):
    recipe = parse_recipe(f"name: {spec}\nstages:\n  - {RECIPES[spec]}\n", spec)
    return api.compress((tiny_model(family), tiny_tokenizer()), recipe, None, calib="pydoc", calib_samples=2,
                        seqlen=32, progress=False).model


def _ids() -> torch.Tensor:
    return torch.randint(4, len(tiny_tokenizer()), (2, 24), generator=torch.Generator().manual_seed(5))


def _logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=_ids() if ids is None else ids).logits


def _hf_load(path: Path, asymmetric: bool):
    """transformers' own loading of a compressed-tensors directory. transformers 5.24 with
    compressed-tensors 0.20.1 cannot load *any* asymmetric pack-quantized checkpoint the
    default way (its meta-device compression leaves zero-points unpacked, then the packed
    ones mismatch; the package's own checkpoints fail the same way): those load with
    ``dequantize=True``, which dequantises the same stored tensors at load."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asymmetric else {}
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()


def _without_activation_quant(model):
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, QuantLinear):
            module.act_spec = None
            module.drop_runtime()
    return twin


# ------------------------------------------------------------------ format pieces
@pytest.mark.parametrize("bits", range(2, 9))
def test_packing_matches_the_package(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    gen = torch.Generator().manual_seed(bits)
    for cols in (7, 32, 50, 96):
        codes = torch.randint(0, 1 << bits, (6, cols), generator=gen, dtype=torch.int64).to(torch.uint8)
        signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
        ours = ct.pack_int32(codes, bits)
        assert torch.equal(ours, pack_to_int32(signed, bits))
        assert torch.equal(ct.unpack_int32(ours, bits, cols), codes)
        assert torch.equal(unpack_from_int32(ours, bits, torch.Size((6, cols))), signed)
        assert torch.equal(ct.pack_columns(codes.t().contiguous(), bits), pack_to_int32(signed.t().contiguous(), bits,
                                                                                        packed_dim=0))


# ------------------------------------------------------------------ export → transformers
@pytest.mark.parametrize("spec", ["w4-g32-sym", "w4-g32-asym", "w4-channel-sym", "w4-channel-asym", "w8a8"])
def test_transformers_loads_our_export(spec, tmp_path):
    model = _compress(spec)
    out = api.export((model, tiny_tokenizer()), tmp_path / "ct", "compressed-tensors")
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert group["format"] == ("int-quantized" if spec == "w8a8" else "pack-quantized")
    assert group["targets"] == ["Linear"] and qc["ignore"] == ["lm_head"]
    assert group["weights"]["symmetric"] == ("asym" not in spec)
    assert group["weights"]["strategy"] == ("group" if "g32" in spec else "channel")
    if spec == "w8a8":
        assert group["input_activations"] == {"dynamic": True, "group_size": None, "num_bits": 8,
                                              "strategy": "token", "symmetric": True, "type": "int"}
    prov = json.loads((out / "slimformer_export.json").read_text())
    assert prov["format"] == "compressed-tensors"
    assert prov["modules"]["model.layers.1.mlp.down_proj"]["weights"] == group["weights"]

    hf = _hf_load(out, "asym" in spec)
    ids = _ids()
    ours = _logits(model, ids)
    theirs = _logits(hf, ids)   # the first forward decompresses
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            assert torch.equal(hf.get_submodule(name).weight, module.dequantized_weight()), name
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    if spec != "w8a8":
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    else:
        # the weights are the same integers; the package's Python reference quantises each
        # token by absmax/127.5 where vLLM's kernels and ours divide by 127
        for module in hf.modules():
            if hasattr(module, "quantization_scheme"):
                module.quantization_enabled = False
        torch.testing.assert_close(_logits(hf, ids), _logits(_without_activation_quant(model), ids),
                                   rtol=1e-4, atol=1e-5)
        assert (theirs - ours).abs().max() < 0.02 * ours.abs().max()
    assert not torch.allclose(ours, _logits(tiny_model("llama"), ids), atol=1e-3), "quantisation changed nothing"


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    model = _compress("w4-g32-sym")
    name = "model.layers.0.self_attn.q_proj"
    # an input scale in front of a quantised layer: no compressed-tensors form
    layer = model.get_submodule(name)
    set_module(model, name, InputScaledLinear(layer, torch.full((layer.in_features,), 2.0)))
    with pytest.raises(ExportError, match=rf"^{name}: an input scale in front of a QuantLinear"):
        api.export((model, tiny_tokenizer()), tmp_path / "x", "compressed-tensors")
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())

    static = parse_recipe("name: s\nstages:\n  - RTN: {bits: 8, granularity: channel, act_bits: 8, "
                          "act_granularity: tensor, act_dynamic: false}\n", "s")
    model = api.compress((tiny_model("llama"), tiny_tokenizer()), static, None, calib="pydoc", calib_samples=2,
                         seqlen=32, progress=False).model
    with pytest.raises(ExportError, match=r"^model\.layers\.0\.self_attn\.q_proj: static activation"):
        api.export((model, tiny_tokenizer()), tmp_path / "x", "compressed-tensors")
    assert not list(tmp_path.iterdir())

    gpt2 = _compress("w4-g32-sym", family="gpt2")
    with pytest.raises(ExportError, match=r"^transformer\.h\.0\.attn\.c_attn: transformers' model has a Conv1D there"):
        api.export((gpt2, tiny_tokenizer()), tmp_path / "x", "compressed-tensors")
    assert not list(tmp_path.iterdir())

    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        api.export((_compress("w4-g32-sym"), tiny_tokenizer()), tmp_path / "exists", "compressed-tensors")


def test_folded_input_scale_on_a_float_layer_is_exported_exactly(tmp_path):
    model = _compress("w4-g32-sym")
    name = "model.layers.1.mlp.down_proj"
    dense = nn.Linear(128, 64, bias=False)
    dense.weight.data = model.get_submodule(name).dequantized_weight().clone()
    scale = torch.linspace(0.5, 2.0, 128)
    set_module(model, name, InputScaledLinear(dense, scale))
    out = api.export((model, tiny_tokenizer()), tmp_path / "ct", "compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert name in qc["ignore"]
    hf = _hf_load(out, asymmetric=False)
    torch.testing.assert_close(_logits(hf), _logits(model), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ import
@pytest.mark.parametrize("spec", ["w4-g32-asym", "w4-channel-sym", "w3-g16-asym", "w8a8"])
def test_our_export_reads_back_bit_identical(spec, tmp_path):
    recipe = parse_recipe(f"name: {spec}\nstages:\n  - {RECIPES[spec]}\n", spec)
    api.compress((tiny_model("llama"), tiny_tokenizer()), recipe, tmp_path / "ours", calib="pydoc", calib_samples=2,
                 seqlen=32, progress=False)
    model, _ = slimformer.load(tmp_path / "ours")   # the CLI's path: export a compressed directory
    out = api.export(str(tmp_path / "ours"), tmp_path / "ct", "compressed-tensors")
    prov = json.loads((out / "slimformer_export.json").read_text())
    assert RECIPES[spec] in prov["recipe"]
    loaded, tokenizer = slimformer.load(out)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    back = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert layers.keys() == back.keys()
    for name, module in layers.items():
        twin = back[name]
        assert twin.weight_spec == module.weight_spec and twin.act_spec == module.act_spec
        assert torch.equal(twin.codes(), module.codes()), name
        assert twin.scale.dtype == torch.float16 and torch.equal(twin.scale, module.scale), name
        assert torch.equal(twin.zero, module.zero), name
    assert torch.equal(_logits(loaded), _logits(model))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert tokenizer.get_vocab() == tiny_tokenizer().get_vocab()


def _package_checkpoint(path: Path, scheme_kwargs: dict, fmt: str):
    """A checkpoint written by compressed-tensors' own compressor (min/max qparams)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model = tiny_model("llama", seed=3, tie_word_embeddings=False)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**scheme_kwargs["weights"]),
                                input_activations=(QuantizationArgs(**scheme_kwargs["acts"])
                                                   if "acts" in scheme_kwargs else None))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]),
                              show_progress=False)
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            w, args = module.weight.data, module.quantization_scheme.weights
            grouped = w.reshape(w.shape[0], -1, args.group_size) if args.strategy == "group" else w.unsqueeze(1)
            scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, fmt)
    compressor.compress_model(model)
    model.save_pretrained(str(path))
    compressor.update_config(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    compressor.decompress_model(model)   # the package's own dequantisation, as reference
    for module in model.modules():
        if hasattr(module, "quantization_scheme"):
            module.quantization_enabled = False
    return model


@pytest.mark.parametrize("kind", ["w4-g32-sym", "w4-g16-asym", "w4-channel-asym", "w8a8"])
def test_reads_checkpoints_of_the_package_itself(kind, tmp_path):
    schemes = {
        "w4-g32-sym": ({"weights": dict(num_bits=4, symmetric=True, strategy="group", group_size=32)},
                       "pack-quantized"),
        "w4-g16-asym": ({"weights": dict(num_bits=4, symmetric=False, strategy="group", group_size=16)},
                        "pack-quantized"),
        "w4-channel-asym": ({"weights": dict(num_bits=4, symmetric=False, strategy="channel")}, "pack-quantized"),
        "w8a8": ({"weights": dict(num_bits=8, symmetric=True, strategy="channel"),
                  "acts": dict(num_bits=8, symmetric=True, strategy="token", dynamic=True)}, "int-quantized"),
    }
    scheme, fmt = schemes[kind]
    reference = _package_checkpoint(tmp_path / "pkg", scheme, fmt)
    loaded, _ = slimformer.load(tmp_path / "pkg")
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14   # 7 linears per block; lm_head ignored
    for name, module in layers.items():
        assert torch.equal(module.dequantized_weight(), reference.get_submodule(name).weight), name
    assert (kind == "w8a8") == all(m.act_spec is not None for m in layers.values())
    ids = _ids()
    torch.testing.assert_close(_logits(_without_activation_quant(loaded), ids), _logits(reference, ids),
                               rtol=1e-4, atol=1e-5)


def test_import_refuses_bad_files_in_one_line(tmp_path):
    model = _compress("w4-g32-asym")
    good = api.export((model, tiny_tokenizer()), tmp_path / "good", "compressed-tensors")

    def variant(name, edit_config=None, edit_file=None):
        import shutil

        path = tmp_path / name
        shutil.copytree(good, path)
        if edit_config:
            cfg = json.loads((path / "config.json").read_text())
            edit_config(cfg["quantization_config"])
            (path / "config.json").write_text(json.dumps(cfg))
        if edit_file:
            edit_file(path / "model.safetensors")
        return path

    def set_bits(qc):
        qc["config_groups"]["group_0"]["weights"]["num_bits"] = 16

    def set_float(qc):
        qc["config_groups"]["group_0"]["format"] = "float-quantized"

    def set_static(qc):
        qc["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "strategy": "tensor",
                                                               "dynamic": False, "symmetric": True}

    def set_group(qc):
        qc["config_groups"]["group_0"]["weights"]["group_size"] = 16

    def truncate(file):
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2])

    def drop_norm(file):
        from safetensors.torch import load_file, save_file

        state = load_file(str(file))
        del state["model.norm.weight"]
        state["model.layers.0.self_attn.q_proj.input_scale"] = torch.ones(1)
        save_file(state, str(file))

    def drop_only_norm(file):
        from safetensors.torch import load_file, save_file

        state = load_file(str(file))
        del state["model.norm.weight"]
        save_file(state, str(file))

    cases = [
        (variant("extra", edit_file=drop_norm), r"model\.safetensors: tensor model\.layers\.0\.self_attn\.q_proj\."
                                                r"input_scale is not part of a pack-quantized layer"),
        (variant("missing", edit_file=drop_only_norm), r"model\.safetensors: tensor model\.norm\.weight is missing"),
        (variant("bits", set_bits), r"config\.json: .*weights\.num_bits: 16 is not read"),
        (variant("float", set_float), r"config\.json: .*format: 'float-quantized' is not read"),
        (variant("static", set_static), r"config\.json: .*input_activations: only dynamic"),
        (variant("group", set_group), r"model\.safetensors: tensor model\.layers\.0\.self_attn\.q_proj\.weight_scale "
                                      r"has shape \[64, 2\], expected \[64, 4\]"),
        (variant("truncated", edit_file=truncate), r"model\.safetensors: not a readable safetensors file"),
    ]
    for path, message in cases:
        with pytest.raises(ModelLoadError, match=message) as info:
            slimformer.load(path)
        assert "\n" not in str(info.value)
        assert str(path) in str(info.value)


# ------------------------------------------------------------------ plain Hugging Face
_LOAD_WITHOUT_SLIMFORMER = r"""
import sys
sys.modules["slimformer"] = None   # any import of slimformer now fails
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    logits = model(input_ids=ids).logits
tied = model.lm_head.weight is model.model.embed_tokens.weight
save_file({"logits": logits.contiguous(), "tied": torch.tensor(tied)}, sys.argv[3])
"""


def test_hf_export_loads_with_transformers_alone(tmp_path):
    model = _compress("w4-g32-asym")
    out = api.export((model, tiny_tokenizer()), tmp_path / "hf", "hf")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and not any("slimformer" in key for key in config)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()   # tied: stored once
        assert all(f.get_slice(k).get_dtype() == "F32" for k in f.keys())
    torch.save(_ids(), tmp_path / "ids.pt")
    result = tmp_path / "logits.safetensors"
    subprocess.run([sys.executable, "-I", "-c", _LOAD_WITHOUT_SLIMFORMER, str(out), str(tmp_path / "ids.pt"),
                    str(result)], check=True, cwd=tmp_path, capture_output=True, timeout=300)
    with safe_open(str(result), "pt") as f:
        torch.testing.assert_close(f.get_tensor("logits"), _logits(model), rtol=1e-4, atol=1e-5)
        assert bool(f.get_tensor("tied"))


def test_hf_export_outtype_and_encoders(tmp_path):
    from transformers import AutoModel

    model = _compress("w4-g32-sym")
    out = api.export((model, tiny_tokenizer()), tmp_path / "hf16", "hf", outtype="float16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    with pytest.raises(ExportError, match="--outtype 'int8' is not a type of the hf format"):
        api.export((model, tiny_tokenizer()), tmp_path / "bad", "hf", outtype="int8")

    from transformers import AutoModelForCausalLM

    gpt2 = _compress("w4-g32-sym", family="gpt2")   # Conv1D layers: [in, out] weights
    out = api.export((gpt2, tiny_tokenizer()), tmp_path / "gpt2", "hf")
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(str(out)).eval()), _logits(gpt2),
                               rtol=1e-4, atol=1e-5)

    bert = _compress("w4-g32-sym", family="bert")
    out = api.export((bert, tiny_tokenizer()), tmp_path / "bert", "hf")
    plain = AutoModel.from_pretrained(str(out)).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).last_hidden_state, bert(input_ids=ids).last_hidden_state,
                                   rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ real model
@pytest.mark.slow
def test_smollm2_compressed_tensors_round_trip(tmp_path):
    recipe = parse_recipe("name: w4-g64\nstages:\n  - RTN: {bits: 4, granularity: group, group_size: 64}\n", "w4")
    model, tokenizer = slimformer.load("smollm2-135m")
    model = api.compress((model, tokenizer), recipe, None, progress=False).model
    out = api.export((model, tokenizer), tmp_path / "ct", "compressed-tensors")
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt").input_ids
    ours = _logits(model, ids)
    torch.testing.assert_close(_logits(_hf_load(out, asymmetric=False), ids), ours, rtol=1e-3, atol=1e-3)
    back, _ = slimformer.load(out)
    assert torch.equal(_logits(back, ids), ours)


def test_cli_export_then_eval_and_native_generate_on_the_import(tmp_path):
    """The CLI writes both formats from a compressed directory; the imported checkpoint
    runs in eval and in the native engine with the same greedy tokens as the HF engine."""
    from slimformer.cli import main

    recipe = parse_recipe(f"name: w4\nstages:\n  - {RECIPES['w4-g32-asym']}\n", "w4")
    api.compress((tiny_model("llama"), tiny_tokenizer()), recipe, tmp_path / "ours", progress=False)
    for fmt in ("compressed-tensors", "hf"):
        out = tmp_path / fmt
        assert main(["--quiet", "export", str(tmp_path / "ours"), "--format", fmt, "--out", str(out)]) == 0
        assert main(["--quiet", "export", str(tmp_path / "ours"), "--format", fmt, "--out", str(out)]) == 2
    report = api.evaluate(str(tmp_path / "compressed-tensors"), "pydoc", seqlen=32, windows=2, progress=False)
    ours = api.evaluate(str(tmp_path / "ours"), "pydoc", seqlen=32, windows=2, progress=False)
    assert report["perplexity"] == pytest.approx(ours["perplexity"], rel=1e-5)
    pair = slimformer.load(tmp_path / "compressed-tensors")
    native = api.generate(pair, "The module", max_new_tokens=8, engine="native", ignore_eos=True)
    hf = api.generate(pair, "The module", max_new_tokens=8, engine="hf", ignore_eos=True)
    assert native.engine == "native" and hf.engine == "hf"
    assert native[0].token_ids == hf[0].token_ids and len(native[0].token_ids) == 8


def test_mixed_formats_name_their_layers(tmp_path):
    """Layers of different formats (a HAWQ-like mix, per-tensor scales, 8-bit weight-only)
    become one config group each, targeting its layers by name; transformers and our reader
    both compute the same model."""
    from slimformer.formats.spec import WeightSpec

    model = tiny_model("llama")
    specs = {"self_attn.q_proj": WeightSpec(4, True, "group", 16), "self_attn.o_proj": WeightSpec(8, True, "channel"),
             "mlp.up_proj": WeightSpec(4, True, "tensor"), "mlp.down_proj": WeightSpec(3, True, "group", 32)}
    for block in range(2):
        for suffix, spec in specs.items():
            name = f"model.layers.{block}.{suffix}"
            linear = model.get_submodule(name)
            set_module(model, name, QuantLinear.from_float(linear.weight.data, None, spec))
    out = api.export((model, tiny_tokenizer()), tmp_path / "ct", "compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and len(qc["config_groups"]) == 4
    targets = sorted(t for g in qc["config_groups"].values() for t in g["targets"])
    assert targets == sorted(f"model.layers.{b}.{s}" for b in range(2) for s in specs)
    assert "model.layers.0.self_attn.k_proj" in qc["ignore"] and "lm_head" in qc["ignore"]
    ids = _ids()
    torch.testing.assert_close(_logits(_hf_load(out, asymmetric=False), ids), _logits(model, ids),
                               rtol=1e-4, atol=1e-5)
    back, _ = slimformer.load(out)
    for block in range(2):
        for suffix, spec in specs.items():
            layer = back.get_submodule(f"model.layers.{block}.{suffix}")
            assert isinstance(layer, QuantLinear) and layer.weight_spec == spec
    assert isinstance(back.model.layers[0].self_attn.k_proj, nn.Linear)
    assert torch.equal(_logits(back, ids), _logits(model, ids))


@pytest.mark.parametrize("recipe", ["magnitude-50", "nm-2-4"])
def test_hf_export_of_a_pruned_model(recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    model = api.compress((tiny_model("llama"), tiny_tokenizer()), recipe, None, calib="pydoc", calib_samples=2,
                         seqlen=32, progress=False).model
    out = api.export((model, tiny_tokenizer()), tmp_path / "hf", "hf")
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    q = plain.model.layers[0].self_attn.q_proj.weight
    assert 0.45 < (q == 0).float().mean() < 0.55   # the zeros are kept
    torch.testing.assert_close(_logits(plain), _logits(model), rtol=1e-4, atol=1e-5)
    with pytest.raises(ExportError, match="no quantised layer"):
        api.export((model, tiny_tokenizer()), tmp_path / "ct", "compressed-tensors")
