"""The native decoder reads a GGUF file's blocks only after check_gguf, and each matrix only
with exactly the shape of the layer it replaces (the kernels trust N and K): a file whose
tensor shapes disagree with the model is refused in one line naming the file and tensor."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from slimformer.errors import ModelLoadError
from slimformer.formats.gguf import BLOCK_BYTES, from_gguf_tensor
from slimformer.models.adapters import adapter_for
from slimformer.models.tiny import tiny_model
from slimformer.runtime.decoder import NativeDecoder, _gguf_row_order, native_available


def _write(path, model, override=None):
    """Q8_0 blocks for every linear of ``model`` (``override``: name -> (rows, cols))."""
    adapter = adapter_for(model)
    w = gguf.GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(0)
    tensors = {}
    for i, block in enumerate(adapter.get_blocks(model)):
        for gguf_name, module_name in adapter.gguf_linears:
            lin = block.get_submodule(module_name)
            name = f"blk.{i}.{gguf_name}.weight"
            rows, cols = (override or {}).get(name, (lin.out_features, lin.in_features))
            blocks = rng.integers(0, 256, (rows, cols // 32, BLOCK_BYTES["Q8_0"]), dtype=np.uint8)
            blocks[..., 0:2] = np.array([0.01], dtype=np.float16).view(np.uint8)
            tensors[name] = blocks.reshape(rows, -1)
            w.add_tensor(name, tensors[name], raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture
def model():
    ok, why = native_available()
    if not ok:
        pytest.skip(f"native engine unavailable: {why}")
    return tiny_model("llama")


def test_gguf_blocks_become_the_decoder_weights(model, tmp_path):
    tensors = _write(tmp_path / "m.gguf", model)
    dec = NativeDecoder.from_model(model, gguf_path=tmp_path / "m.gguf")
    # The decoder's q projection is the file's blocks, rows put back in transformers' order.
    q = dec.layers[0].qkv
    ref = from_gguf_tensor("q", "Q8_0", tensors["blk.0.attn_q.weight"], 64, 64)
    heads = model.config.num_attention_heads
    assert torch.equal(q.dequantize()[:64], ref.dequantize()[_gguf_row_order(64, heads)])


@pytest.mark.parametrize("name,shape,fragment", [
    ("blk.0.attn_q.weight", (32, 64), "is [32, 64], but the model's is [64, 64]"),
    ("blk.1.ffn_down.weight", (64, 64), "is [64, 64], but the model's is [64, 128]"),
    ("blk.0.attn_k.weight", (34, 64), "34 rows are not 2 heads"),
])
def test_gguf_shapes_must_match_the_model(model, tmp_path, name, shape, fragment):
    _write(tmp_path / "m.gguf", model, {name: shape})
    with pytest.raises(ModelLoadError) as err:
        NativeDecoder.from_model(model, gguf_path=tmp_path / "m.gguf")
    assert fragment in str(err.value) and "m.gguf" in str(err.value) and "\n" not in str(err.value)


def test_gguf_file_checked_before_reading(model, tmp_path):
    _write(tmp_path / "m.gguf", model)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "m.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="runs past the end"):
        NativeDecoder.from_model(model, gguf_path=tmp_path / "m.gguf")
