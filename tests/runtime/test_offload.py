"""Offloading: blocks streamed from memory-mapped safetensors give exactly the outputs of
the model held in memory (forward, greedy generate with KV cache, perplexity), never
hold more blocks than the budget allows, really run on the mapped file pages and let
them go afterwards."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import slimformer
from slimformer import api
from slimformer.errors import (
    MemoryBudgetError,
    ModelLoadError,
    OutputExistsError,
    SlimformerError,
)
from slimformer.eval.perplexity import perplexity
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.recipes.schema import parse_recipe
from slimformer.runtime.offload import load_offloaded, parse_bytes, save_offloadable

LAYERS = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: a second OpenMP thread only adds waiting on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 4-block tiny llama and its offloadable directory."""
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    out = tmp_path_factory.mktemp("offload") / "llama"
    save_offloadable(model, out, tiny_tokenizer())
    meta = json.loads((out / "offload.json").read_text())
    return model, out, meta


def _budget(meta: dict, blocks: int) -> int:
    return meta["non_block_bytes"] + blocks * max(meta["block_bytes"])


def _ids(batch: int = 3, length: int = 19, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, len(tiny_tokenizer()), (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, n: int = 12):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)


def _watch_resident(model) -> list[int]:
    """Resident block count seen as each block starts (hooks after the offloader's)."""
    seen: list[int] = []
    offloader = model.slimformer_offload
    for block in model.model.layers:
        block.register_forward_pre_hook(lambda m, a: seen.append(offloader.resident_blocks))
    return seen


def test_layout(saved):
    model, out, meta = saved
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["config.json", "offload.json", "rest.safetensors", "tokenizer.json",
                            "tokenizer_config.json"] + [f"block_{i:04d}.safetensors" for i in range(LAYERS)])
    assert meta["num_blocks"] == LAYERS and meta["blocks"] == "model.layers"
    assert meta["block_bytes"] == [sum(t.nbytes for t in b.state_dict().values()) for b in model.model.layers]
    # Tied LM head stored once: embeddings + final norm.
    assert meta["non_block_bytes"] == model.model.embed_tokens.weight.nbytes + model.model.norm.weight.nbytes
    assert [p.name for p in out.parent.iterdir()] == ["llama"]   # no temporary left behind
    with pytest.raises(OutputExistsError):
        save_offloadable(model, out)


@pytest.mark.parametrize("prefetch", [True, False])
def test_outputs_identical_within_budget(saved, prefetch):
    model, out, meta = saved
    off, tokenizer = load_offloaded(out, _budget(meta, 2), prefetch=prefetch)
    assert tokenizer.get_vocab() == tiny_tokenizer().get_vocab()
    offloader = off.slimformer_offload
    assert offloader.capacity == 2 and offloader.prefetch == prefetch
    seen = _watch_resident(off)
    ids = _ids()
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        got = off(input_ids=ids).logits
    assert torch.equal(got, expected)
    # Weights were really streamed: each block read at least once, released after use.
    assert offloader.loads >= LAYERS
    assert all(p.is_meta for p in off.model.layers[1].parameters())
    assert off.lm_head.weight is off.model.embed_tokens.weight   # tie kept
    with torch.inference_mode():
        assert torch.equal(_generate(off, ids[:1]), _generate(model, ids[:1]))
    assert seen and max(seen) <= 2 and offloader.max_resident_blocks <= 2
    assert len(seen) == LAYERS * (1 + 12)   # the forward, then generate's prefill + 11 decode steps
    # 2 slots < 4 blocks: with prefetch both stream (every pass a read, plus the next
    # forward's first block prefetched); without, block 0 is pinned and read once.
    assert offloader.loads == (len(seen) + 1 if prefetch else 1 + len(seen) * 3 // 4)


def test_prefetch_on_and_off_agree(saved):
    _, out, meta = saved
    ids = _ids(batch=2, seed=7)
    results = []
    for prefetch in (True, False):
        off, _ = load_offloaded(out, _budget(meta, 3), prefetch=prefetch)
        with torch.inference_mode():
            results.append((off(input_ids=ids).logits, _generate(off, ids[:1])))
        off.slimformer_offload.close()
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_budget_pins_blocks(saved):
    """Slots beyond the streaming window pin the first blocks: read once, kept."""
    _, out, meta = saved
    off, _ = load_offloaded(out, _budget(meta, 3), prefetch=True)
    offloader = off.slimformer_offload
    assert (offloader.capacity, offloader.pinned, offloader.window) == (3, 1, 2)
    seen = _watch_resident(off)
    with torch.inference_mode():
        for _ in range(3):
            off(input_ids=_ids(batch=1))
    assert max(seen) <= 3 and offloader.max_resident_blocks == 3
    assert not any(p.is_meta for p in off.model.layers[0].parameters())     # pinned
    assert all(p.is_meta for p in off.model.layers[2].parameters())         # streamed
    # Block 0 read once, blocks 1-3 every pass, plus the next pass's block 1 prefetched.
    assert offloader.loads == 1 + 3 * 3 + 1

    unlimited, _ = load_offloaded(out, None)
    with torch.inference_mode():
        for _ in range(2):
            unlimited(input_ids=_ids(batch=1))
    assert unlimited.slimformer_offload.loads == LAYERS   # everything fits: each block read once


def test_weights_are_the_mapped_file_and_are_released(saved, tmp_path):
    out = tmp_path / "own"   # a directory no other test's model maps
    save_offloadable(saved[0], out)
    meta = saved[2]
    off, _ = load_offloaded(out, _budget(meta, 2), prefetch=False)
    mapped: list[tuple[str, bool]] = []

    def where(address: int) -> str:
        for line in Path("/proc/self/maps").read_text().splitlines():
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= address < hi:
                return parts[-1] if len(parts) >= 6 else ""
        return ""

    for i, block in enumerate(off.model.layers):
        def check(module, args, i=i):
            w = module.mlp.down_proj.weight
            mapped.append((where(w.data_ptr()), str(out / f"block_{i:04d}.safetensors")))
        block.register_forward_pre_hook(check)
    with torch.inference_mode():
        off(input_ids=_ids(batch=1))
    assert len(mapped) == LAYERS
    for path, expected in mapped:
        assert Path(path).resolve() == Path(expected).resolve()
    # Released: once the forward is done only the pinned block 0 (2 slots, no prefetch:
    # 1 pinned + 1 streaming) and the non-block weights are still mapped.
    maps = Path("/proc/self/maps").read_text()
    assert [i for i in range(LAYERS) if str(out / f"block_{i:04d}") in maps] == [0]
    assert str(out / "rest.safetensors") in maps
    assert off.slimformer_offload.resident_blocks == 1 and off.slimformer_offload.pinned == 1


def test_budget_too_small(saved):
    _, out, meta = saved
    with pytest.raises(MemoryBudgetError, match="cannot hold the non-block weights"):
        load_offloaded(out, _budget(meta, 1) - 1)
    with pytest.raises(MemoryBudgetError):
        load_offloaded(out, "1KB")
    # Exactly one block: works, without prefetch (nowhere to put the next block).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        off, _ = load_offloaded(out, _budget(meta, 1), prefetch=True)
    assert any("prefetch is off" in str(w.message) for w in caught)
    assert off.slimformer_offload.capacity == 1 and not off.slimformer_offload.prefetch
    model = saved[0]
    with torch.inference_mode():
        assert torch.equal(off(input_ids=_ids()).logits, model(input_ids=_ids()).logits)
    assert off.slimformer_offload.max_resident_blocks == 1


def test_parse_bytes():
    assert parse_bytes("300MB") == 300_000_000
    assert parse_bytes("300 mib") == 300 * 2**20
    assert parse_bytes("1.5GiB") == 3 * 2**29
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("4KiB") == 4096 and parse_bytes("7KB") == 7000
    assert parse_bytes("123") == 123 and parse_bytes("10B") == 10 and parse_bytes(42) == 42
    for bad in ("", "MB", "12 parsecs", "-5MB", "0", "1e3MB", "3 4MB", 0, -1):
        with pytest.raises(MemoryBudgetError, match="memory size"):
            parse_bytes(bad)
    assert issubclass(MemoryBudgetError, SlimformerError)


def test_bad_budget_string_on_load(saved):
    with pytest.raises(MemoryBudgetError, match="'lots'"):
        load_offloaded(saved[1], "lots")


def test_perplexity_identical(saved):
    model, out, meta = saved
    off, _ = load_offloaded(out, _budget(meta, 2))
    windows = [(ids, 1) for ids in _ids(batch=3, length=40, seed=5)]
    assert perplexity(off, windows, progress=False) == perplexity(model, windows, progress=False)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_other_decoders(family, tmp_path):
    model = tiny_model(family)
    save_offloadable(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "offload.json").read_text())
    off, tokenizer = load_offloaded(tmp_path / "m", _budget(meta, 1), prefetch=False)
    assert tokenizer is None
    ids = _ids()
    with torch.inference_mode():
        assert torch.equal(off(input_ids=ids).logits, model(input_ids=ids).logits)
        assert torch.equal(_generate(off, ids[:1]), _generate(model, ids[:1]))


def test_quantised_model_and_compressed_directory(tmp_path):
    recipe = parse_recipe("stages:\n  - RTN: {bits: 4, granularity: group, group_size: 16, symmetric: false}\n", "w4")
    compressed = tmp_path / "w4"
    api.compress((tiny_model("llama", num_hidden_layers=3), tiny_tokenizer()), recipe, compressed, progress=False)
    reference, _ = slimformer.load(compressed)
    ids = _ids()
    with torch.inference_mode():
        expected = reference(input_ids=ids).logits
        expected_gen = _generate(reference, ids[:1])

    # A `slimformer compress` directory streams as it is (its single safetensors file).
    probe, _ = load_offloaded(compressed, None)
    sizes = probe.slimformer_offload
    direct, _ = load_offloaded(compressed, sizes.non_block_bytes + 2 * sizes.block_bytes, prefetch=True)

    # And save_offloadable keeps the packed buffers.
    save_offloadable(reference, tmp_path / "off")
    meta = json.loads((tmp_path / "off" / "offload.json").read_text())
    assert set(meta["modules"]) == set(json.loads((compressed / "slimformer.json").read_text())["modules"])
    resaved, _ = load_offloaded(tmp_path / "off", _budget(meta, 2), prefetch=True)
    for off in (direct, resaved):
        assert off.slimformer_offload.capacity < 3
        with torch.inference_mode():
            assert torch.equal(off(input_ids=ids).logits, expected)
            assert torch.equal(_generate(off, ids[:1]), expected_gen)
        assert off.slimformer_offload.max_resident_blocks <= off.slimformer_offload.capacity
        q = off.model.layers[2].self_attn.q_proj
        assert q.qweight.is_meta and q._runtime is None    # packed copy dropped with the weights


def test_hf_directory_and_errors(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    off, _ = load_offloaded(tmp_path / "hf", None)
    with torch.inference_mode():
        assert torch.equal(off(input_ids=_ids()).logits, model(input_ids=_ids()).logits)
    with pytest.raises(ModelLoadError, match="not found"):
        load_offloaded(tmp_path / "nowhere", "1GB")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no safetensors"):
        load_offloaded(tmp_path / "empty", "1GB")


@pytest.mark.slow
def test_smollm2_offloaded_matches(tmp_path):
    model, tokenizer = slimformer.load("smollm2-135m")
    save_offloadable(model, tmp_path / "smol", tokenizer)
    meta = json.loads((tmp_path / "smol" / "offload.json").read_text())
    off, _ = load_offloaded(tmp_path / "smol", _budget(meta, 4))
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(off(input_ids=ids).logits, model(input_ids=ids).logits)
        assert torch.equal(_generate(off, ids, 4), _generate(model, ids, 4))
    assert off.slimformer_offload.max_resident_blocks <= 4
