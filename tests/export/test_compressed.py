"""The compressed directory: compress → save → load gives bit-identical outputs; the
file is as small as the bits promise; slimformer.json records how it was made; a
failed save leaves nothing behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import slimformer
from slimformer import api
from slimformer.errors import ModelLoadError, OutputExistsError
from slimformer.models import compressed as C
from slimformer.models.adapters import adapter_for
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.nn.quant_linear import QuantLinear
from slimformer.recipes.schema import parse_recipe

SPECS = {
    "w3-g32-asym": "name: w3-g32-asym\nstages:\n  - RTN: {bits: 3, granularity: group, group_size: 32, symmetric: false}\n",
    "w8-channel": "name: w8-channel\nstages:\n  - RTN: {bits: 8, granularity: channel}\n",
    "w4-g16-sym": "name: w4-g16-sym\nstages:\n  - RTN: {bits: 4, granularity: group, group_size: 16}\n",
    "w2-tensor-asym": "name: w2-tensor-asym\nstages:\n  - RTN: {bits: 2, granularity: tensor, symmetric: false}\n",
    "w8a8-static": (
        "name: w8a8-static\n"
        "# calibrated: per-tensor activation scales observed on data\n"
        "stages:\n"
        "  - RTN: {bits: 8, granularity: channel, act_bits: 8, act_granularity: tensor, act_dynamic: false}\n"
    ),
    "w4a8-dynamic-partial": (
        "name: w4a8-dynamic-partial\n"
        "stages:\n"
        "  - RTN:\n"
        "      bits: 4\n"
        "      granularity: channel\n"
        "      symmetric: false\n"
        "      act_bits: 8\n"
        "      targets: {ignore: ['mlp.down_proj', 'mlp.c_proj', 'fc2', 'output.dense'], blocks: [1]}\n"
    ),
}
FAMILIES = ("llama", "gpt2", "bert")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path_factory.mktemp("cache")))


def _outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(4, len(tiny_tokenizer()), (2, 20), generator=torch.Generator().manual_seed(seed))


def _compress(family: str, spec: str, out: Path | None, **kwargs):
    recipe = parse_recipe(SPECS[spec], spec)
    return api.compress((tiny_model(family), tiny_tokenizer()), recipe, out, calib="pydoc", calib_samples=2,
                        seqlen=32, progress=False, **kwargs)


def _quant_modules(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_identical(family, spec, tmp_path):
    out = tmp_path / "model"
    result = _compress(family, spec, out)
    assert result.out == out
    quantised = _quant_modules(result.model)
    assert quantised, "nothing was quantised"

    loaded, tokenizer = slimformer.load(out)

    ids = _ids()
    expected = _outputs(result.model, ids)
    assert torch.equal(_outputs(loaded, ids), expected)
    assert not torch.equal(expected, _outputs(tiny_model(family), ids)), "quantisation changed nothing"
    assert type(loaded) is type(result.model)
    assert tokenizer.get_vocab() == tiny_tokenizer().get_vocab()

    reloaded = _quant_modules(loaded)
    assert reloaded.keys() == quantised.keys()
    for name, module in quantised.items():
        twin = reloaded[name]
        assert twin.weight_spec == module.weight_spec and twin.act_spec == module.act_spec, name
        for buffer, value in module.named_buffers():
            assert torch.equal(dict(twin.named_buffers())[buffer], value), f"{name}.{buffer}"
    # What was not quantised is back exactly too.
    state, twin_state = result.model.state_dict(), loaded.state_dict()
    assert state.keys() == twin_state.keys()
    for key, value in state.items():
        assert torch.equal(twin_state[key], value), key

    if family == "llama":   # tied embeddings stay tied
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    if spec == "w8a8-static":
        for module in reloaded.values():
            assert module.act_scale is not None and module.act_scale.item() != 1.0
    if spec == "w4a8-dynamic-partial":
        adapter = adapter_for(loaded)
        block0 = adapter.get_blocks(loaded)[0]
        assert not _quant_modules(block0)
        assert len(reloaded) == len(adapter.linears) - 1


def _linear_params(model) -> int:
    adapter = adapter_for(model)
    return sum(block.get_submodule(n).weight.numel() for block in adapter.get_blocks(model) for n in adapter.linears)


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_file_is_about_an_eighth(family, tmp_path):
    fp32_dir = tmp_path / "fp32"
    base = tiny_model(family)
    base.save_pretrained(fp32_dir)
    fp32_bytes = (fp32_dir / "model.safetensors").stat().st_size
    n = _linear_params(base)

    out = tmp_path / "w4"
    result = _compress(family, "w4-g16-sym", out)
    stored = C.weight_bytes(out)
    assert result.stored_bytes == stored == (out / "model.safetensors").stat().st_size

    # Tensor by tensor: packed 4-bit codes are exactly n/2 bytes; one fp16 scale per 16 weights.
    with safe_open(out / "model.safetensors", "pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    qweight = [k for k in sizes if k.endswith(".qweight")]
    assert len(qweight) == len(adapter_for(base).linears) * base.config.num_hidden_layers
    assert all(dtypes[k] == "U8" for k in qweight)
    assert sum(torch.Size(sizes[k]).numel() for k in qweight) == n // 2
    assert all(dtypes[k] == "F16" for k in sizes if k.endswith(".scale"))
    scale_bytes = sum(2 * torch.Size(sizes[k]).numel() for k in sizes if k.endswith(".scale"))
    assert scale_bytes == 2 * n // 16
    assert not any(k.endswith(".weight") and k.rsplit(".", 2)[0] in _quant_modules(result.model) for k in sizes)

    # The file: the fp32 file with each projection's 4 bytes per weight replaced by 0.5 + scales.
    expected = fp32_bytes - 4 * n + n // 2 + scale_bytes
    assert abs(stored - expected) < 0.03 * expected, (stored, expected)
    assert stored < fp32_bytes
    # Projections alone shrink by 4 / (0.5 + 2/16) = 6.4x at g16, ≈ 7.5x at g64.
    assert 6.3 < (4 * n) / (n // 2 + scale_bytes) < 6.5


def test_4bit_g64_shrinks_projections_about_7_5_fold(tmp_path):
    recipe = parse_recipe("stages:\n  - RTN: {bits: 4, granularity: group, group_size: 64}\n", "w4-g64")
    base = tiny_model("llama")
    out = tmp_path / "w4"
    api.compress((base, tiny_tokenizer()), recipe, out, progress=False)
    n = _linear_params(tiny_model("llama"))
    with safe_open(out / "model.safetensors", "pt") as f:
        quant = sum(torch.Size(f.get_slice(k).get_shape()).numel() * (1 if k.endswith("qweight") else 2)
                    for k in f.keys() if k.endswith((".qweight", ".scale", ".zero")))
    assert 7.4 < 4 * n / quant < 7.6     # 4 / (0.5 + 2/64)


def test_metadata(tmp_path):
    out = tmp_path / "model"
    result = _compress("llama", "w8a8-static", out, source_name="tiny-llama")
    meta = json.loads((out / "slimformer.json").read_text())

    assert meta["format_version"] == C.FORMAT_VERSION
    assert meta["source"] == "tiny-llama"
    assert meta["recipe"] == SPECS["w8a8-static"]          # verbatim, comment included
    assert parse_recipe(meta["recipe"]).stages == result.recipe.stages

    import transformers

    assert meta["versions"] == {"slimformer": slimformer.__version__, "torch": torch.__version__,
                                "transformers": transformers.__version__}

    adapter = adapter_for(result.model)
    expected = {f"{adapter.blocks}.{i}.{name}" for i in range(2) for name in adapter.linears}
    assert set(meta["modules"]) == expected
    q = meta["modules"]["model.layers.0.self_attn.k_proj"]
    assert q == {"type": "QuantLinear", "in_features": 64, "out_features": 32, "bias": False,
                 "weight": {"bits": 8, "symmetric": True, "granularity": "channel", "group_size": None},
                 "act": {"bits": 8, "symmetric": True, "granularity": "tensor", "dynamic": False}}

    calib = meta["calibration"]
    assert calib["name"] == "pydoc:calib" and len(calib["sha256"]) == 64
    assert (calib["samples"], calib["seqlen"], calib["seed"]) == (2, 32, None)
    # static activation scales have no kernel: every layer is recorded as a fallback
    assert len(meta["fallbacks"]) == len(expected)
    assert all("static activation scales" in line for line in meta["fallbacks"])
    assert meta["compress_seconds"] >= 0

    # The directory is also an ordinary HF directory: config and tokenizer.
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]

    loaded, _ = slimformer.load(out)
    assert loaded.slimformer_meta == meta


def test_builtin_recipe_text_is_stored_verbatim(tmp_path):
    from slimformer.recipes import builtin_recipes

    out = tmp_path / "model"
    api.compress((tiny_model("gpt2"), tiny_tokenizer()), "rtn-w4-g32", out, progress=False)
    meta = json.loads((out / "slimformer.json").read_text())
    assert meta["recipe"] == builtin_recipes()["rtn-w4-g32"]
    assert meta["calibration"] is None
    assert meta["modules"]["transformer.h.1.attn.c_attn"]["weight"]["group_size"] == 32
    assert meta["modules"]["transformer.h.1.attn.c_attn"]["out_features"] == 192


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def broken_save_model(model, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    real_save_model = C.save_model
    monkeypatch.setattr(C, "save_model", broken_save_model)
    out = tmp_path / "model"
    with pytest.raises(OSError, match="disk full"):
        _compress("llama", "w8-channel", out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "temporary directories were left behind"

    # Replacing an existing directory: a failure keeps the old one intact.
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        _compress("llama", "w8-channel", out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]

    # And once the disk is back, the overwrite succeeds and leaves no siblings.
    monkeypatch.setattr(C, "save_model", real_save_model)
    _compress("llama", "w8-channel", out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "slimformer.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_output_is_an_ordinary_directory(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    out = tmp_path / "model"
    _compress("opt", "w8-channel", out)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask, "the output kept mkdtemp's private mode"


def test_overwrite_replaces_a_file(tmp_path):
    out = tmp_path / "model"
    out.write_text("not a directory")
    with pytest.raises(OutputExistsError):
        _compress("opt", "w8-channel", out)
    assert out.read_text() == "not a directory"
    _compress("opt", "w8-channel", out, overwrite=True)
    assert (out / "slimformer.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "the replaced file was left behind"


def test_damaged_directories_fail_cleanly(tmp_path):
    out = tmp_path / "model"
    _compress("gpt2", "w4-g16-sym", out)
    meta_path = out / "slimformer.json"
    meta = json.loads(meta_path.read_text())

    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ModelLoadError, match="format"):
        slimformer.load(out)

    bad = json.loads(json.dumps(meta))
    bad["modules"]["transformer.h.0.mlp.c_fc"]["type"] = "MysteryLinear"
    meta_path.write_text(json.dumps(bad))
    with pytest.raises(ModelLoadError, match="MysteryLinear"):
        slimformer.load(out)

    meta_path.write_text(json.dumps(meta))
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors.*data_offsets"):   # the file and the field
        slimformer.load(out)
