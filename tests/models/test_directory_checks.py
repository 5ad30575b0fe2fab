"""Compressed and offload directories are checked against their weights before anything is
built: only registered module types, every module's sizes justified by the tensors on
disk, config.json bounded, file names inside the directory, and the offload loader binds
only tensors of the shape its modules expect (a crafted file cannot make the kernels read
past a buffer). Each refusal is one ModelLoadError line naming the file and the field."""

from __future__ import annotations

import json
import shutil
import tracemalloc

import pytest
import torch
from safetensors.torch import load_file, save_file

import slimformer
from slimformer import api
from slimformer.errors import ModelLoadError
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.runtime.offload import load_offloaded, save_offloadable

Q = "model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dirs")
    api.compress((tiny_model("llama"), tiny_tokenizer()), "rtn-w4-g32", root / "c", progress=False)
    model, tok = slimformer.load(root / "c")
    save_offloadable(model, root / "o", tok)
    ids = torch.tensor([[3, 17, 42, 9, 100]])
    with torch.no_grad():
        logits = model(ids).logits
    return root, ids, logits


@pytest.fixture
def compressed(dirs, tmp_path):
    shutil.copytree(dirs[0] / "c", tmp_path / "c")
    return tmp_path / "c"


@pytest.fixture
def offload(dirs, tmp_path):
    shutil.copytree(dirs[0] / "o", tmp_path / "o")
    return tmp_path / "o"


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _refused(fn, *fragments):
    with pytest.raises(ModelLoadError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_valid_directories_still_load_exactly(dirs, compressed, offload):
    _, ids, logits = dirs
    for load in (lambda: slimformer.load(compressed)[0], lambda: load_offloaded(offload, None)[0]):
        with torch.no_grad():
            assert torch.equal(load()(ids).logits, logits)


@pytest.mark.parametrize("kind", ["Linear", "os.system", None, 7])
def test_only_registered_module_types(compressed, kind):
    _edit_json(compressed / "slimformer.json", lambda m: m["modules"][Q].update(type=kind))
    _refused(lambda: slimformer.load(compressed), "slimformer.json", f"modules['{Q}'].type", "registered")


def test_sizes_must_match_the_stored_tensors_before_allocating(compressed):
    # 2^20 x 2^20 4-bit weights would be a 512 GiB buffer; refused from the header, on the meta device.
    _edit_json(compressed / "slimformer.json", lambda m: m["modules"][Q].update(in_features=2**20, out_features=2**20))
    tracemalloc.start()
    try:
        _refused(lambda: slimformer.load(compressed), "slimformer.json", f"{Q}.", "stored as")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


@pytest.mark.parametrize("edit,field", [
    (lambda m: m["modules"][Q]["weight"].update(bits="four"), "bits"),
    (lambda m: m["modules"][Q]["weight"].update(group_size=31), "group_size 31"),   # fuzz finding
    (lambda m: m["modules"][Q].update(in_features=1.5e300), f"modules['{Q}']"),
    (lambda m: m["modules"].update({"../../x": {"type": "QuantLinear"}}), "dotted module name"),
    (lambda m: m.update(modules=[1, 2]), "modules"),
    (lambda m: m.update(format_version=True), "format_version"),
    (lambda m: m.update(recipe={"a": 1}), "recipe"),
])
def test_slimformer_json_fields_are_typed(compressed, edit, field):
    _edit_json(compressed / "slimformer.json", edit)
    _refused(lambda: slimformer.load(compressed), "slimformer.json", field)


def test_a_module_must_keep_its_layer_shape(compressed):
    # A consistent but different module (config and tensors agree, the layer does not).
    state = load_file(str(compressed / "model.safetensors"))
    for key in [k for k in state if k.startswith(Q + ".")]:
        state[key] = state[key][:32].clone()
    save_file(state, str(compressed / "model.safetensors"))
    _edit_json(compressed / "slimformer.json", lambda m: m["modules"][Q].update(out_features=32))
    _refused(lambda: slimformer.load(compressed), "slimformer.json", "out_features", "32", "64")


@pytest.mark.parametrize("key,value", [("num_hidden_layers", 10**6), ("hidden_size", 2**40),
                                       ("max_position_embeddings", 2**33)])
def test_config_json_sizes_bounded_by_the_weights(compressed, key, value):
    _edit_json(compressed / "config.json", lambda c: c.update({key: value}))
    _refused(lambda: slimformer.load(compressed), "config.json", key)


@pytest.mark.parametrize("key,value", [("attention_dropout", None), ("attention_dropout", 64.0),
                                       ("attention_dropout", 64)])   # fuzz findings: they failed at the first forward
def test_config_json_values_typed(compressed, key, value):
    _edit_json(compressed / "config.json", lambda c: c.update({key: value}))
    _refused(lambda: slimformer.load(compressed), "config.json", key)


def test_truncated_weights_refused(compressed):
    data = (compressed / "model.safetensors").read_bytes()
    (compressed / "model.safetensors").write_bytes(data[:-100])
    _refused(lambda: slimformer.load(compressed), "model.safetensors", "data_offsets")


# ----------------------------------------------------------------------------- offload

def _shrink_block_tensor(offload, key):
    path = offload / "block_0001.safetensors"
    state = load_file(str(path))
    state[key] = state[key][: state[key].shape[0] // 2].clone()
    save_file(state, str(path), metadata={"format": "pt"})


def test_offload_refuses_a_crafted_block_tensor_at_load(offload):
    # The known hole: a shorter qweight bound under an unchanged module made the C kernels read past it.
    _shrink_block_tensor(offload, f"{Q}.qweight")
    _refused(lambda: load_offloaded(offload, None), f"{Q}.qweight", "stored as [32, 32] U8", "[64, 32]")


def test_offload_refuses_a_block_file_changed_after_load(dirs, offload):
    model, _ = load_offloaded(offload, None, prefetch=False)
    _shrink_block_tensor(offload, f"{Q}.qweight")
    try:
        with torch.no_grad():
            _refused(lambda: model(dirs[1]), f"{Q}.qweight", "file changed")
    finally:
        model.slimformer_offload.close()


@pytest.mark.parametrize("edit,field", [
    (lambda m: m.update(rest_file="../outside.safetensors"), "rest_file"),
    (lambda m: m.update(block_files=["/etc/passwd", "block_0001.safetensors"]), "block_files[0]"),
    (lambda m: m.update(num_blocks=3), "num_blocks"),
    (lambda m: m.update(dtype="int4"), "dtype"),
    (lambda m: m["modules"][Q].update(type="Embedding"), "type"),
    (lambda m: m["modules"][Q].update(in_features=4096), "stored as"),
])
def test_offload_json_fields_are_checked(offload, edit, field):
    _edit_json(offload / "offload.json", edit)
    _refused(lambda: load_offloaded(offload, None), "offload.json", field)


@pytest.mark.parametrize("field, value, message", [("attention_dropout", 3, "not a probability"),
                                                   ("return_dict", False, "return_dict: must be true"),
                                                   ("output_hidden_states", "x", "expected true or false"),
                                                   ("num_hidden_layers", 2000, "the weights hold")])
def test_imported_checkpoints_refuse_config_values_that_fail_at_the_first_forward(tmp_path, field, value, message):
    """Fuzz findings (compressed-tensors import): a config.json value that transformers
    accepts at load and that fails at the first forward is refused in one line, by every
    importer of quantised checkpoints."""
    import warnings

    from slimformer.models.compressed_tensors import load_compressed_tensors
    from slimformer.models.gptq import load_gptq

    torch.manual_seed(0)
    api.compress((tiny_model("llama", num_hidden_layers=1), tiny_tokenizer()), "rtn-w4-g32", tmp_path / "c",
                 progress=False)
    for fmt, load in (("gptq", load_gptq), ("compressed-tensors", load_compressed_tensors)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = api.export(str(tmp_path / "c"), tmp_path / fmt, format=fmt)
        config = json.loads((out / "config.json").read_text())
        config[field] = value
        (out / "config.json").write_text(json.dumps(config))
        with pytest.raises(ModelLoadError, match=message):
            load(out)
