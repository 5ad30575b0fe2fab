"""Compressed directories of format version 1 (4-bit codes as a flat bit stream) still load,
converted once to the Q4 layout, and compute exactly what they did."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

import slimformer
from slimformer import api
from slimformer.formats import packing
from slimformer.formats.matrix import unpack_nibbles
from slimformer.models import compressed as C
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.nn.quant_linear import QuantLinear
from slimformer.recipes.schema import parse_recipe
from slimformer.runtime.offload import load_offloaded


def _write_v1(v2, v1) -> int:
    """A copy of directory ``v2`` as version 1 wrote it; returns how many qweights changed."""
    import shutil

    shutil.copytree(v2, v1)
    state = load_file(str(v1 / C.WEIGHTS_FILE))
    changed = 0
    for key, t in list(state.items()):
        if key.endswith(".qweight") and t.dim() == 2:
            n, half = t.shape
            state[key] = packing.pack(unpack_nibbles(t, n, 2 * half), 4)     # the old flat bit stream
            changed += 1
    save_file(state, str(v1 / C.WEIGHTS_FILE), metadata={"format": "pt"})
    meta = json.loads((v1 / "slimformer.json").read_text())
    meta["format_version"] = 1
    (v1 / "slimformer.json").write_text(json.dumps(meta))
    return changed


def test_version_1_directory_loads_and_computes_the_same(tmp_path):
    recipe = parse_recipe("stages:\n  - RTN: {bits: 4, granularity: group, group_size: 32, symmetric: false}\n", "w4")
    api.compress((tiny_model("llama"), tiny_tokenizer()), recipe, tmp_path / "v2", progress=False)
    assert json.loads((tmp_path / "v2" / "slimformer.json").read_text())["format_version"] == C.FORMAT_VERSION == 2
    assert _write_v1(tmp_path / "v2", tmp_path / "v1") == 14
    new, _ = slimformer.load(tmp_path / "v2")
    old, _ = slimformer.load(tmp_path / "v1")
    for name, m in old.named_modules():
        if isinstance(m, QuantLinear):
            assert m.qweight.dim() == 2 and torch.equal(m.qweight, new.get_submodule(name).qweight), name
    ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = new(input_ids=ids).logits
        assert torch.equal(old(input_ids=ids).logits, expected)
        # streamed as stored (no state-dict load): the flat v1 codes are still read right
        off, _ = load_offloaded(tmp_path / "v1", None)
        assert torch.equal(off(input_ids=ids).logits, expected)
