"""Fuzzing every file reader slimformer owns with mutated files.

    python benchmarks/fuzz_readers.py [--cases 100000] [--seed 0] [--out benchmarks/results/fuzz_readers.json]

Seed files are generated first (a small GGUF written with ``gguf.GGUFWriter``, safetensors
files, a compressed directory of a tiny random Llama from ``save_compressed``, an
offloadable directory from ``save_offloadable``, the built-in recipe YAML files). Each case
takes one target's seed, applies 1-3 mutations drawn from a seeded RNG (bit flips, byte
overwrites with interesting values, 2/4/8-byte integers set to boundary values, truncation,
extension, chunk deletion/duplication; and format-aware ones aimed at what readers trust:
GGUF count/length/dim/offset fields (positions from ``check_gguf(record_fields=True)``),
the safetensors header length, shapes, dtypes and offsets, JSON values of
``slimformer.json``/``offload.json``/``config.json``, recipe names, numbers, anchors and
nesting) and runs the target's reader in a worker process.

A case passes when the reader succeeds or raises a :class:`SlimformerError` (our one-line
errors). Anything else is a finding: another exception, the worker dying (a crash in C:
the worker runs with faulthandler and is restarted), a case running past ``--timeout``, or
Python-level memory (tracemalloc peak, numpy included) above 16 MiB + 32x the case's
input bytes. The mutated input of every finding is kept under ``--findings`` to reproduce
it (``--replay TARGET CASE_SEED``).

Adding a reader is one :func:`target` entry: a seed builder (writes a small valid input
under the directory it is given and returns its path) and the reader; weights are relative
(normalised over the targets run), ``files`` names the files of a directory seed that are
mutated, and the test subset (tests/test_fuzz_readers.py) picks the new target up. E.g. for
a GPTQ checkpoint reader::

    @target("gptq", 0.05, files=("config.json", "model.safetensors"))
    @seeded(_gptq_seed)              # e.g. a tiny Llama written in the qweight/qzeros/scales/g_idx layout
    def read_gptq(path):
        from slimformer.models.gptq import load_gptq
        return load_gptq(path, torch.float32)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MEMORY_SLACK = 16 << 20
MEMORY_PER_BYTE = 32


# ----------------------------------------------------------------------------- targets

@dataclass
class Target:
    name: str
    make_seed: Callable[[Path], Path]          # writes the seed file or directory under the given dir
    read: Callable[[Path], object]             # the reader: returns, or raises SlimformerError
    weight: float                              # share of the cases
    files: tuple[str, ...] = ()                # for a directory seed: the files mutated (one per case)
    description: str = ""
    per_file: bool = False                     # a directory of alternative seed files: the reader gets one
    accepts: tuple[str, ...] = ()              # our exception types besides SlimformerError this reader may raise
    full_load: bool = False                    # builds a model (slow): few cases in the test subset


TARGETS: dict[str, Target] = {}


def target(name: str, weight: float, files: tuple[str, ...] = (), description: str = "", per_file: bool = False,
           accepts: tuple[str, ...] = (), full_load: bool = False):
    """Decorator on the reader: ``@target("gguf", 0.3)`` over ``def read(path)``, with its
    seed builder attached as ``read.seed = builder`` or passed through :func:`seeded`."""
    def wrap(read):
        TARGETS[name] = Target(name, read.seed_builder, read, weight, files, description or (read.__doc__ or "").strip(),
                               per_file, accepts, full_load)
        return read
    return wrap


def seeded(builder):
    def wrap(read):
        read.seed_builder = builder
        return read
    return wrap


# --- seed builders (each runs once per fuzz run)

def _tiny_llama_parts():
    import torch

    from slimformer.models.tiny import tiny_model, tiny_tokenizer

    torch.manual_seed(0)
    return tiny_model("llama", num_hidden_layers=2), tiny_tokenizer()


def _compressed_seed(root: Path) -> Path:
    import slimformer.api as api

    model, tok = _tiny_llama_parts()
    out = root / "compressed"
    api.compress((model, tok), "rtn-w4-g32", out, progress=False, overwrite=True)
    return out


MIXED_RECIPE = r"""name: fuzz-mixed
stages:
  - NMSparsity: {n: 2, m: 4, targets: {include: ['mlp\..*']}}
  - GOBO: {bits: 4, granularity: channel, outlier_sigma: 3.0, targets: {include: ['self_attn\.[qk]_proj']}}
  - RTN: {bits: 8, targets: {include: ['self_attn\.[vo]_proj']}}
"""


def _mixed_seed(root: Path) -> Path:
    """A compressed directory holding several module types (SparseLinear, GOBOLinear, QuantLinear)."""
    import slimformer.api as api
    from slimformer.recipes.schema import parse_recipe

    model, tok = _tiny_llama_parts()
    out = root / "mixed"
    api.compress((model, tok), parse_recipe(MIXED_RECIPE), out, progress=False, overwrite=True)
    return out


def _offload_seed(root: Path) -> Path:
    import slimformer.api as api
    from slimformer.models.compressed import load_compressed
    from slimformer.runtime.offload import save_offloadable

    source = root / "compressed"
    if not (source / "slimformer.json").exists():
        model, tok = _tiny_llama_parts()
        api.compress((model, tok), "rtn-w4-g32", source, progress=False, overwrite=True)
    quantised, _ = load_compressed(source)
    out = root / "offload"
    save_offloadable(quantised, out)   # no tokenizer: the reader under test is the weights'
    return out


def _gguf_seed(root: Path) -> Path:
    import gguf
    import numpy as np

    from slimformer.formats.gguf import BLOCK_BYTES

    path = root / "seed.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_uint32("llama.embedding_length", 64)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_string("general.name", "fuzz seed")
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(24)])
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(24)])
    w.add_array("tokenizer.ggml.token_type", [1] * 24)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((24, 64)).astype(np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(64, dtype=np.float16))
    for name, qtype in (("attn_q", "Q8_0"), ("attn_k", "Q4_0"), ("attn_v", "Q4_1")):
        blocks = rng.integers(0, 256, (32, 64 // 32, BLOCK_BYTES[qtype]), dtype=np.uint8)
        blocks[..., 0:2] = np.array([0.01], dtype=np.float16).view(np.uint8)     # finite fp16 scales
        if qtype == "Q4_1":
            blocks[..., 2:4] = np.array([-0.05], dtype=np.float16).view(np.uint8)
        w.add_tensor(f"blk.0.{name}.weight", blocks.reshape(32, -1), raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _decoder_gguf_seed(root: Path) -> Path:
    """The linears of the tiny Llama (2 blocks) as GGUF Q8_0 / Q4_0 / Q4_1 blocks, named as
    llama.cpp names them: what ``NativeDecoder.from_model(model, gguf_path)`` reads."""
    import gguf
    import numpy as np

    from slimformer.formats.gguf import BLOCK_BYTES
    from slimformer.models.adapters import adapter_for

    model, _ = _tiny_llama_parts()
    adapter = adapter_for(model)
    path = root / "decoder.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", len(adapter.get_blocks(model)))
    rng = np.random.default_rng(1)
    qtypes = ("Q8_0", "Q4_0", "Q4_1")
    for i, block in enumerate(adapter.get_blocks(model)):
        for j, (gguf_name, module_name) in enumerate(adapter.gguf_linears):
            linear = block.get_submodule(module_name)
            qtype = qtypes[(i + j) % 3]
            blocks = rng.integers(0, 256, (linear.out_features, linear.in_features // 32, BLOCK_BYTES[qtype]),
                                  dtype=np.uint8)
            blocks[..., 0:2] = np.array([0.01], dtype=np.float16).view(np.uint8)
            if qtype == "Q4_1":
                blocks[..., 2:4] = np.array([-0.05], dtype=np.float16).view(np.uint8)
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", blocks.reshape(linear.out_features, -1),
                         raw_dtype=gguf.GGMLQuantizationType[qtype])
    emb = model.get_submodule(adapter.embed_tokens).weight.detach().numpy()
    w.add_tensor("token_embd.weight", emb.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _llama_gguf_seed(root: Path) -> Path:
    """The tiny Llama as an F32 GGUF file with its tokenizer (gpt2 BPE), as transformers
    reads GGUF: what ``slimformer.load("x.gguf")`` takes."""
    import gguf
    import numpy as np

    model, tok = _tiny_llama_parts()
    c = model.config
    path = root / "llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(1)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, value in model.state_dict().items():
        array = value.detach().float().numpy()
        if key == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", array)
        elif key == "model.norm.weight":
            w.add_tensor("output_norm.weight", array)
        elif key.startswith("model.layers."):
            parts = key.split(".")
            w.add_tensor(f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.weight", array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _safetensors_seed(root: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    path = root / "seed.safetensors"
    save_file({"a.weight": torch.randn(8, 16, generator=g), "a.bias": torch.zeros(8, dtype=torch.float16),
               "b.qweight": torch.randint(0, 255, (8, 8), dtype=torch.uint8, generator=g),
               "b.scale": torch.ones(8, 1, dtype=torch.bfloat16), "c.index": torch.arange(5, dtype=torch.int64),
               "empty": torch.zeros(0, 4)}, str(path), metadata={"format": "pt"})
    return path


def _recipe_seed(root: Path) -> Path:
    from slimformer.recipes.schema import builtin_recipes

    out = root / "recipes"
    out.mkdir()
    texts = builtin_recipes()
    for name in ("rtn-w4-g32", "gptq-w4-g64", "smoothquant-w8a8", "gmp-50", "hawq-4.5", "nm-2-4-permuted"):
        (out / f"{name}.yaml").write_text(texts[name])
    return out


# --- readers (what each case runs)

def _exported_seed(root: Path, fmt: str) -> Path:
    """A tiny Llama compressed with rtn-w4-g32 and exported with our ``fmt`` exporter
    (the int8 embedding goes out dequantised, with a warning)."""
    import warnings

    import slimformer.api as api

    model, tok = _tiny_llama_parts()
    api.compress((model, tok), "rtn-w4-g32", root / f"{fmt}-source", progress=False, overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return api.export(str(root / f"{fmt}-source"), root / fmt, format=fmt, overwrite=True)


def _gptq_seed(root: Path) -> Path:
    return _exported_seed(root, "gptq")


def _compressed_tensors_seed(root: Path) -> Path:
    return _exported_seed(root, "compressed-tensors")


def _touch(tensor) -> None:
    """Read every byte (faults mmap pages in: a bad offset crashes here if anywhere)."""
    import torch

    if tensor.numel():
        tensor.reshape(-1).view(torch.uint8).sum() if tensor.dtype != torch.bool else tensor.sum()


@target("gguf", 0.27, description="check_gguf, then gguf.GGUFReader and from_gguf_tensor on every matrix "
                                  "(what models/load.py and the native decoder do before reading GGUF)")
@seeded(_gguf_seed)
def read_gguf(path: Path):
    import gguf
    import numpy as np

    from slimformer.formats.gguf import from_gguf_tensor
    from slimformer.formats.gguf_check import check_gguf

    layout = check_gguf(path)
    reader = gguf.GGUFReader(str(path))
    assert len(reader.tensors) == len(layout.tensors)
    for field in reader.fields.values():
        field.contents() if hasattr(field, "contents") else None
    for t in reader.tensors:
        np.asarray(t.data).view(np.uint8).sum()
        if len(t.shape) == 2 and t.tensor_type.name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"):
            K, N = int(t.shape[0]), int(t.shape[1])
            from_gguf_tensor(t.name, t.tensor_type.name, t.data, N, K)
    return layout


@target("safetensors", 0.22, description="check_safetensors, then safetensors' safe_open and every tensor read")
@seeded(_safetensors_seed)
def read_safetensors(path: Path):
    from safetensors import safe_open

    from slimformer.formats.safetensors_check import check_safetensors

    header = check_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(header.tensors)
        for key in f.keys():
            _touch(f.get_tensor(key))
    return header


@target("compressed-check", 0.10, files=("slimformer.json", "config.json", "model.safetensors"),
        description="check_compressed_dir: slimformer.json schema, registered types, module sizes vs the "
                    "safetensors header, config.json bounds")
@seeded(_compressed_seed)
def read_compressed_check(path: Path):
    from slimformer.models.validate import check_compressed_dir

    return check_compressed_dir(path)


@target("compressed-mixed-check", 0.05, files=("slimformer.json", "model.safetensors"),
        description="check_compressed_dir on a directory of several module types (sparse 2:4, GOBO, int8)")
@seeded(_mixed_seed)
def read_mixed_check(path: Path):
    from slimformer.models.validate import check_compressed_dir

    return check_compressed_dir(path)


@target("offload-index", 0.10, files=("offload.json", "config.json", "block_0000.safetensors", "rest.safetensors"),
        description="the offload loader's index: offload.json schema, file names, every header, modules vs headers")
@seeded(_offload_seed)
def read_offload_index(path: Path):
    from slimformer.models.validate import check_model_config
    from slimformer.runtime.offload import _index

    index, meta, dtype, headers = _index(path)
    check_model_config(path, headers)
    return len(index)


@target("recipe", 0.196, description="load_recipe of a YAML file (size limit, typed schema, safe name)", per_file=True)
@seeded(_recipe_seed)
def read_recipe(path: Path):
    from slimformer.recipes.schema import load_recipe

    return load_recipe(str(path))


@target("gguf-load", 0.004, description="slimformer.load of a .gguf file: check_gguf, then transformers' GGUF "
                                          "config, weights and tokenizer readers", full_load=True)
@seeded(_llama_gguf_seed)
def read_gguf_load(path: Path):
    from slimformer.models.load import load

    return load(path)


_DECODER_MODEL = []


@target("gguf-decoder", 0.02, description="NativeDecoder.from_model with a GGUF file's blocks (check_gguf, "
                                          "GGUFReader, shapes vs the model) and a 3-token forward through the kernels; "
                                          "UnsupportedFormat (a block type with no runtime layout: the engine falls "
                                          "back to transformers) counts as a refusal",
        accepts=("UnsupportedFormat",), full_load=True)
@seeded(_decoder_gguf_seed)
def read_gguf_decoder(path: Path):
    from slimformer.runtime.decoder import NativeDecoder

    if not _DECODER_MODEL:
        _DECODER_MODEL.append(_tiny_llama_parts()[0])
    decoder = NativeDecoder.from_model(_DECODER_MODEL[0], gguf_path=path)
    return decoder.forward_logits([1, 5, 9])


@target("compressed-load", 0.02, files=("slimformer.json", "config.json", "model.safetensors"),
        description="full load_compressed and a 4-token forward (the native kernels run on what was bound)",
        full_load=True)
@seeded(_compressed_seed)
def read_compressed_load(path: Path):
    import torch

    from slimformer.models.compressed import load_compressed

    model, _ = load_compressed(path)
    with torch.no_grad():
        model(torch.tensor([[1, 5, 9, 2]]))
    return model


@target("offload-load", 0.02, files=("offload.json", "config.json", "block_0000.safetensors", "rest.safetensors"),
        description="full load_offloaded and a 4-token forward (blocks bound from the files, kernels run)",
        full_load=True)
@seeded(_offload_seed)
def read_offload_load(path: Path):
    import torch

    from slimformer.runtime.offload import load_offloaded

    model, _ = load_offloaded(path, None, prefetch=False)
    try:
        with torch.no_grad():
            model(torch.tensor([[1, 5, 9, 2]]))
    finally:
        model.slimformer_offload.close()
    return model


@target("gptq-load", 0.03, files=("config.json", "quantize_config.json", "model.safetensors"),
        description="slimformer.models.gptq.load_gptq of a GPTQ checkpoint (qweight/qzeros/scales/g_idx) and a "
                    "4-token forward", full_load=True)
@seeded(_gptq_seed)
def read_gptq_load(path: Path):
    import torch

    from slimformer.models.gptq import load_gptq

    model, _ = load_gptq(path, torch.float32)
    with torch.no_grad():
        model(torch.tensor([[1, 5, 9, 2]]))
    return model


@target("compressed-tensors-load", 0.03, files=("config.json", "model.safetensors"),
        description="slimformer.models.compressed_tensors.load_compressed_tensors (pack-quantized / "
                    "int-quantized) and a 4-token forward", full_load=True)
@seeded(_compressed_tensors_seed)
def read_compressed_tensors_load(path: Path):
    import torch

    from slimformer.models.compressed_tensors import load_compressed_tensors

    model, _ = load_compressed_tensors(path, torch.float32)
    with torch.no_grad():
        model(torch.tensor([[1, 5, 9, 2]]))
    return model


# ----------------------------------------------------------------------------- mutators

INTERESTING_8 = [0, 1, 0x7F, 0x80, 0xFF, 0x20, 0x30]
INTERESTING_INTS = [0, 1, 2, 3, 4, 7, 8, 16, 31, 32, 33, 63, 64, 255, 256, 4095, 4096, 65535, 65536,
                    2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**48, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def _mutate_bytes(data: bytearray, rng: random.Random) -> bytearray:
    op = rng.randrange(9)
    n = len(data)
    if n == 0:
        return bytearray(rng.randbytes(rng.randrange(1, 64)))
    if op == 0:                                    # bit flips
        for _ in range(rng.randrange(1, 9)):
            i = rng.randrange(n)
            data[i] ^= 1 << rng.randrange(8)
    elif op == 1:                                  # interesting bytes
        for _ in range(rng.randrange(1, 5)):
            data[rng.randrange(n)] = rng.choice(INTERESTING_8)
    elif op == 2:                                  # interesting 2/4/8-byte integers, either byte order
        width = rng.choice((2, 4, 8))
        if n >= width:
            i = rng.randrange(n - width + 1)
            value = rng.choice(INTERESTING_INTS + [n, n - 1, n + 1, i]) % (1 << (8 * width))
            data[i:i + width] = value.to_bytes(width, rng.choice(("little", "big")))
    elif op == 3:                                  # truncate
        del data[rng.randrange(n):]
    elif op == 4:                                  # extend
        data += rng.choice((bytes(rng.randrange(1, 4096)), rng.randbytes(rng.randrange(1, 256))))
    elif op == 5:                                  # delete a chunk
        i = rng.randrange(n)
        del data[i:i + rng.randrange(1, 64)]
    elif op == 6:                                  # duplicate a chunk
        i = rng.randrange(n)
        data[i:i] = data[i:i + rng.randrange(1, 64)]
    elif op == 7:                                  # random bytes
        i = rng.randrange(n)
        k = rng.randrange(1, 32)
        data[i:i + k] = rng.randbytes(k)
    else:                                          # swap two chunks
        i, j = sorted(rng.randrange(n) for _ in range(2))
        k = rng.randrange(1, 16)
        a, b = bytes(data[i:i + k]), bytes(data[j:j + k])
        data[j:j + len(b)] = a[:len(b)]
        data[i:i + len(a)] = b[:len(a)]
    return data


def _interesting_value(rng: random.Random, old):
    choices = [0, 1, -1, 2, 3, 31, 32, 33, 64, 2**31, 2**32 - 1, 2**40, 2**53, 2**63, -2**63, 10**30,
               0.5, 1e308, float("inf") if rng.random() < 0.1 else 1.5, "", "x", "../../../../tmp/x", "/etc/passwd",
               "..", "Linear", "QuantLinear", "SparseLinear", "GOBOLinear", "os.system", "float32", "int4",
               "a" * 1000, [], [1, 2], [2**40], {}, {"type": "QuantLinear"}, None, True, False]
    if isinstance(old, bool):
        return not old if rng.random() < 0.5 else rng.choice(choices)
    if isinstance(old, int) and rng.random() < 0.5:
        return rng.choice([old + 1, old - 1, old * 2, old // 2, -old, old * 1000, 0])
    return rng.choice(choices)


def _json_nodes(value, path=()):
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _json_nodes(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _json_nodes(v, path + (i,))


def _mutate_json_value(obj, rng: random.Random):
    nodes = [p for p, _ in _json_nodes(obj) if p]
    if not nodes:
        return _interesting_value(rng, obj)
    path = rng.choice(nodes)
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    op = rng.randrange(6)
    if op == 0 and isinstance(parent, dict):
        del parent[key]
    elif op == 1 and isinstance(parent, dict):
        parent[rng.choice(["type", "in_features", "out_features", "extra", "../x", "bits", "group_size"])] = \
            _interesting_value(rng, None)
    elif op == 2 and isinstance(parent, dict) and len(parent) > 1:
        other = rng.choice(list(parent))
        parent[key], parent[other] = parent[other], parent[key]
    else:
        parent[key] = _interesting_value(rng, parent[key])
    return obj


def _mutate_json(data: bytearray, rng: random.Random) -> bytearray:
    try:
        obj = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError):
        return _mutate_bytes(data, rng)
    for _ in range(rng.randrange(1, 4)):
        obj = _mutate_json_value(obj, rng)
    return bytearray(json.dumps(obj).encode())


def _mutate_safetensors(data: bytearray, rng: random.Random) -> bytearray:
    if len(data) < 8:
        return _mutate_bytes(data, rng)
    (n,) = struct.unpack_from("<Q", data)
    if rng.random() < 0.25 or n > len(data) - 8:           # the length field itself
        value = rng.choice(INTERESTING_INTS + [n + 1, n - 1, len(data), len(data) - 7, len(data) - 8, 2 * n])
        data[0:8] = (value % 2**64).to_bytes(8, "little")
        return data
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except (ValueError, UnicodeDecodeError):
        return _mutate_bytes(data, rng)
    body = data[8 + n:]
    keys = [k for k in header if k != "__metadata__"]
    if keys:
        key = rng.choice(keys)
        info = header[key]
        op = rng.randrange(7)
        if op == 0 and info.get("shape"):
            i = rng.randrange(len(info["shape"]))
            info["shape"][i] = rng.choice([0, 1, info["shape"][i] + 1, info["shape"][i] * 2, 2**31, 2**62, -1])
        elif op == 1:
            info["shape"] = rng.choice([[], [1] * 9, info.get("shape", []) + [1], [2**32, 2**32], "x"])
        elif op == 2:
            info["dtype"] = rng.choice(["F32", "F16", "U8", "I64", "BF16", "F4", "Q4", "", 5])
        elif op == 3 and isinstance(info.get("data_offsets"), list):
            a, b = info["data_offsets"]
            info["data_offsets"] = rng.choice([[b, a], [a, b + 1], [a - 1, b], [a + 4, b + 4], [0, 2**63],
                                               [a, len(body) + 1], [a], [a, b, b]])
        elif op == 4:
            del header[key]
        elif op == 5:
            header[key + "x"] = dict(info)
        else:
            header["__metadata__"] = _interesting_value(rng, None)
    raw = json.dumps(header).encode()
    if rng.random() < 0.2:
        raw += b" " * rng.randrange(8)
    return bytearray(struct.pack("<Q", len(raw)) + raw + body)


def _gguf_fields(seed: bytes):
    """Offsets of the GGUF structural fields in ``seed`` (computed once per seed)."""
    from slimformer.formats.gguf_check import check_gguf

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(seed)
        f.flush()
        return check_gguf(f.name, record_fields=True).fields


_FIELD_CACHE: dict[bytes, list] = {}


def _mutate_gguf(data: bytearray, rng: random.Random, seed: bytes) -> bytearray:
    if seed not in _FIELD_CACHE:
        _FIELD_CACHE[seed] = _gguf_fields(seed)
    fields = _FIELD_CACHE[seed]
    if not fields or rng.random() < 0.3:
        return _mutate_bytes(data, rng)
    pos, size, label = rng.choice(fields)
    if pos + size > len(data):
        return _mutate_bytes(data, rng)
    (old,) = struct.unpack_from("<" + {4: "I", 8: "Q"}[size], data, pos)
    value = rng.choice(INTERESTING_INTS + [old + 1, old - 1, old * 2, old + 32, old - 32, len(data), 0x0C, 9])
    data[pos:pos + size] = (value % (1 << (8 * size))).to_bytes(size, "little")
    return data


def _mutate_yaml(data: bytearray, rng: random.Random) -> bytearray:
    import re

    text = data.decode("utf-8", "replace")
    op = rng.randrange(8)
    if op == 0:
        text = re.sub(r"^name: .*$", "name: " + rng.choice(["../../etc", "/tmp/x", "a/b", "..", "", "'x y'",
                                                           "[1, 2]", "{a: 1}", "ok-name", "é", "a" * 200]),
                      text, flags=re.M)
    elif op == 1:
        numbers = list(re.finditer(r"\b\d+(\.\d+)?\b", text))
        if numbers:
            m = rng.choice(numbers)
            text = text[:m.start()] + str(rng.choice([0, -1, 1, 2**31, 2**64, 1e308, "1e999", ".nan", "-.inf",
                                                      "true", "null", "[]", "{}"])) + text[m.end():]
    elif op == 2:
        text = "base: &a [1, 2]\n" + text.replace("stages:", "stages: *a\nx:", 1) if rng.random() < 0.5 else \
            "a: &a [[[[1]]]]\n" + text
    elif op == 3:
        text += "\n" + "[" * rng.choice((10, 100, 5000)) + "]" * rng.randrange(2)
    elif op == 4:
        text = text.replace(":", rng.choice([": !!python/object:os.system", ": !!binary AAAA", ":: ", ":"]), 1)
    elif op == 5:
        lines = text.splitlines()
        if lines:
            i = rng.randrange(len(lines))
            lines[i] = rng.choice(["  - " + rng.choice(["RTN", "GPTQ", "Nope", "SparseGPT", "RTN: 5", "RTN: [1]"]),
                                   "train: {steps: -1}", "train: 5", "stages: []", "description: [1]",
                                   "unknown: 1", "  - RTN: {bits: 99}", "  - GPTQ: {group_size: 0}", lines[i] * 2])
            text = "\n".join(lines)
    else:
        return _mutate_bytes(bytearray(text.encode("utf-8", "surrogatepass")), rng)
    return bytearray(text.encode("utf-8", "surrogatepass"))


def mutate_file(name: str, data: bytes, rng: random.Random) -> bytes:
    """1-3 mutations of one file's bytes, format-aware for what the name says it is."""
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        structured = rng.random() < 0.7
        try:
            if structured and name.endswith(".gguf"):
                out = _mutate_gguf(out, rng, data)
            elif structured and name.endswith(".safetensors"):
                out = _mutate_safetensors(out, rng)
            elif structured and name.endswith(".json"):
                out = _mutate_json(out, rng)
            elif structured and name.endswith((".yaml", ".yml")):
                out = _mutate_yaml(out, rng)
            else:
                out = _mutate_bytes(out, rng)
        except Exception:   # a format-aware mutator met an already-mangled file: plain bytes then
            out = _mutate_bytes(out, rng)
    return bytes(out)


# ----------------------------------------------------------------------------- cases

class Seeds:
    """The seed inputs of every target, built once under ``root``."""

    def __init__(self, root: Path, names=None):
        self.root = root
        self.bytes: dict[tuple[str, str], bytes] = {}
        manifest = root / "seeds.json"
        if manifest.exists():      # built by the parent: a worker only reads them
            self.paths = {n: Path(p) for n, p in json.loads(manifest.read_text()).items()}
            return
        self.paths: dict[str, Path] = {}
        built: dict[Callable, Path] = {}
        for name, t in TARGETS.items():
            if names is not None and name not in names:
                continue
            if t.make_seed not in built:
                built[t.make_seed] = t.make_seed(root)
            self.paths[name] = built[t.make_seed]
        manifest.write_text(json.dumps({n: str(p) for n, p in self.paths.items()}))

    def files_of(self, name: str) -> list[Path]:
        seed, t = self.paths[name], TARGETS[name]
        if seed.is_file():
            return [seed]
        if t.files:
            return [seed / f for f in t.files]
        return sorted(p for p in seed.iterdir() if p.is_file())

    def inputs_of(self, name: str) -> list[Path]:
        """What the reader is given, unmutated: the seed, or each of its files."""
        return self.files_of(name) if TARGETS[name].per_file else [self.paths[name]]

    def seed_bytes(self, name: str, file: Path) -> bytes:
        key = (name, str(file))
        if key not in self.bytes:
            self.bytes[key] = file.read_bytes()
        return self.bytes[key]


def make_case(seeds: Seeds, name: str, case_seed: int, work: Path) -> tuple[Path, int, str]:
    """The mutated input of case ``case_seed`` of target ``name`` under ``work`` (replaced):
    its path, its size in bytes and which file was mutated."""
    rng = random.Random(case_seed)
    seed = seeds.paths[name]
    files = seeds.files_of(name)
    chosen = rng.choice(files)
    mutated = mutate_file(chosen.name, seeds.seed_bytes(name, chosen), rng)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if seed.is_file() or TARGETS[name].per_file:
        path = work / chosen.name
        path.write_bytes(mutated)
        return path, len(mutated), chosen.name
    path = work / seed.name
    path.mkdir()
    total = 0
    for entry in seed.iterdir():
        if entry.is_file():
            if entry == chosen:
                (path / entry.name).write_bytes(mutated)
                total += len(mutated)
            else:
                os.link(entry, path / entry.name)
                total += entry.stat().st_size
    return path, total, chosen.name


def run_case(name: str, path: Path, size: int) -> dict:
    """Run target ``name``'s reader on ``path`` in this process: the outcome, its time and its
    Python-level memory peak (tracemalloc, numpy's buffers included)."""
    import tracemalloc

    from slimformer.errors import SlimformerError

    started = time.perf_counter()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # high-water mark (Linux: KiB)
    outcome = {"target": name, "size": size}
    try:
        result = TARGETS[name].read(path)
        outcome["status"] = "ok"
        del result
    except SlimformerError as exc:
        message = str(exc)
        outcome["status"] = "refused"
        outcome["error"] = type(exc).__name__
        if "\n" in message.strip() or not message.strip():
            outcome["status"] = "finding"
            outcome["detail"] = f"{type(exc).__name__} is not one line: {message[:300]!r}"
    except Exception as exc:
        if type(exc).__name__ not in TARGETS[name].accepts:
            outcome["status"] = "finding"
            outcome["detail"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            outcome["traceback"] = traceback.format_exc()[-3000:]
        else:
            outcome["status"] = "refused"
            outcome["error"] = type(exc).__name__
            if "\n" in str(exc).strip():
                outcome["status"] = "finding"
                outcome["detail"] = f"{type(exc).__name__} is not one line: {str(exc)[:300]!r}"
    except BaseException as exc:   # noqa: BLE001 - anything else is what we are looking for
        outcome["status"] = "finding"
        outcome["detail"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        outcome["traceback"] = traceback.format_exc()[-3000:]
    outcome["peak_bytes"] = max(0, tracemalloc.get_traced_memory()[1] - base)
    # torch's allocations are not traced: the process's resident high-water mark catches them
    # (it only moves when a case needs more than any case before it).
    outcome["rss_growth_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    outcome["seconds"] = time.perf_counter() - started
    bound = MEMORY_SLACK + MEMORY_PER_BYTE * size
    worst = max(outcome["peak_bytes"], outcome["rss_growth_bytes"])
    if worst > bound and outcome["status"] != "finding":
        outcome["status"] = "finding"
        outcome["detail"] = (f"memory peak {outcome['peak_bytes']} B traced, resident high-water +{outcome['rss_growth_bytes']} B: "
                             f"above the bound {bound} B for {size} input bytes")
    return outcome


# ----------------------------------------------------------------------------- worker / parent

def worker(seed_root: Path, work: Path) -> None:
    """Read ``TARGET CASE_SEED`` lines on stdin, answer one JSON line each on stdout."""
    import faulthandler
    import tracemalloc
    import warnings

    import torch

    from slimformer.plugins import load_builtin

    load_builtin()   # the module types and techniques saved models and recipes name
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    faulthandler.enable(file=sys.stderr)
    seeds = Seeds(seed_root)
    out = sys.stdout
    sys.stdout = sys.stderr       # stray prints must not corrupt the protocol
    for name in seeds.paths:      # warm up: imports and one-time caches are not a case's memory
        TARGETS[name].read(seeds.inputs_of(name)[0])
    tracemalloc.start()
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        name, case_seed = line.split()
        path, size, file = make_case(seeds, name, int(case_seed), work)
        outcome = run_case(name, path, size)
        outcome.update(case_seed=int(case_seed), file=file)
        out.write(json.dumps(outcome) + "\n")
        out.flush()


class Worker:
    def __init__(self, seed_root: Path, work: Path, log: Path):
        self.args = [sys.executable, str(Path(__file__).resolve()), "--worker", str(seed_root), str(work)]
        self.log = open(log, "ab")
        self.proc = None
        self.starts = 0
        self.pending: tuple[str, int, float] | None = None

    def start(self):
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env)
        ready, _, _ = select.select([self.proc.stdout], [], [], 600)
        if not ready or self.proc.stdout.readline() != b"ready\n":
            raise RuntimeError(f"the fuzz worker did not start; see {self.log.name}")
        self.starts += 1

    def send(self, name: str, case_seed: int) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.pending = (name, case_seed, time.time())
        self.proc.stdin.write(f"{name} {case_seed}\n".encode())
        self.proc.stdin.flush()

    def receive(self) -> dict:
        """The pending case's outcome (its stdout is readable): a crash if the worker died."""
        line = self.proc.stdout.readline()
        if not line:
            self.kill()
            return {"status": "crash"}
        self.pending = None
        return json.loads(line)

    def kill(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        self.pending = None


def plan_cases(total: int, seed: int, names) -> list[tuple[str, int]]:
    """``total`` cases split by target weight, each with its own reproducible case seed."""
    weights = {n: TARGETS[n].weight for n in names}
    norm = sum(weights.values())
    counts = {n: int(total * w / norm) for n, w in weights.items()}
    counts[max(counts, key=counts.get)] += total - sum(counts.values())
    rng = random.Random(seed)
    cases = [(n, rng.getrandbits(62)) for n, c in counts.items() for _ in range(c)]
    rng.shuffle(cases)
    return cases


def summarize(outcomes: list[dict], names) -> dict:
    per = {}
    for name in names:
        rows = [o for o in outcomes if o["target"] == name]
        if not rows:
            continue
        errors: dict[str, int] = {}
        for o in rows:
            if o["status"] == "refused":
                errors[o["error"]] = errors.get(o["error"], 0) + 1
        per[name] = {
            "description": TARGETS[name].description,
            "cases": len(rows),
            "ok": sum(o["status"] == "ok" for o in rows),
            "refused": sum(o["status"] == "refused" for o in rows),
            "refused_by": dict(sorted(errors.items())),
            "findings": sum(o["status"] in ("finding", "crash", "timeout") for o in rows),
            "crashes": sum(o["status"] == "crash" for o in rows),
            "timeouts": sum(o["status"] == "timeout" for o in rows),
            "max_input_bytes": max(o.get("size", 0) for o in rows),
            "max_peak_bytes": max(o.get("peak_bytes", 0) for o in rows),
            "max_peak_over_input": max(o.get("peak_bytes", 0) / max(o.get("size", 1), 1) for o in rows),
            "max_rss_growth_bytes": max(o.get("rss_growth_bytes", 0) for o in rows),
            "max_seconds": max(o.get("seconds", 0) for o in rows),
            "mean_seconds": sum(o.get("seconds", 0) for o in rows) / len(rows),
        }
    return per


def merge(paths: list[Path]) -> dict:
    """One result from several runs (different seeds): counts add, maxima and weighted means
    combine; each run's protocol is kept."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    targets: dict[str, dict] = {}
    for run in runs:
        for name, r in run["targets"].items():
            t = targets.setdefault(name, {"description": r["description"], "refused_by": {}})
            n0, n1 = t.get("cases", 0), r["cases"]
            for key in ("cases", "ok", "refused", "findings", "crashes", "timeouts"):
                t[key] = t.get(key, 0) + r[key]
            for key in ("max_input_bytes", "max_peak_bytes", "max_peak_over_input", "max_rss_growth_bytes",
                        "max_seconds"):
                t[key] = max(t.get(key, 0), r.get(key, 0))
            t["mean_seconds"] = (t.get("mean_seconds", 0) * n0 + r["mean_seconds"] * n1) / (n0 + n1)
            for err, count in r["refused_by"].items():
                t["refused_by"][err] = t["refused_by"].get(err, 0) + count
    total = {key: sum(t[key] for t in targets.values()) for key in ("findings", "crashes", "ok", "refused")}
    return {
        "date": runs[0]["date"],
        "protocol": {**runs[0]["protocol"], "runs": [{"seed": r["protocol"]["seed"], "cases": r["total"]["cases"],
                                                     "planned": r["protocol"]["cases"],
                                                     "max_seconds": r["protocol"].get("max_seconds"),
                                                     "workers": r.get("workers"), "seconds": r["seconds"]}
                                                    for r in runs]},
        "machine": runs[0].get("machine"),
        "seconds": sum(r["seconds"] for r in runs),
        "total": {"cases": sum(r["total"]["cases"] for r in runs), **total},
        "targets": targets,
        "findings": [f for r in runs for f in r["findings"]][:50],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--workers", type=int, default=1, help="worker processes reading cases in parallel")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop starting cases after this long (the JSON records how many ran)")
    parser.add_argument("--out", default=str(RESULTS / "fuzz_readers.json"))
    parser.add_argument("--findings", default=str(ROOT / "benchmarks" / "results" / "fuzz_findings"))
    parser.add_argument("--worker", nargs=2, metavar=("SEEDS", "WORK"), help=argparse.SUPPRESS)
    parser.add_argument("--replay", nargs=2, metavar=("TARGET", "CASE_SEED"), help="rerun one case in this process")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="combine the results of several runs into --out")
    args = parser.parse_args()
    if args.merge:
        Path(args.out).write_text(json.dumps(merge(args.merge), indent=2) + "\n")
        return
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]))
        return
    names = [n for n in args.targets.split(",") if n]
    with tempfile.TemporaryDirectory(prefix="slimformer-fuzz-") as tmp:
        tmp = Path(tmp)
        seed_root = tmp / "seeds"
        seed_root.mkdir()
        import torch

        torch.set_num_threads(1)
        seeds = Seeds(seed_root)
        if args.replay:
            import tracemalloc

            tracemalloc.start()
            path, size, file = make_case(seeds, args.replay[0], int(args.replay[1]), tmp / "replay")
            print(json.dumps({**run_case(args.replay[0], path, size), "file": file}, indent=2))
            return
        started = time.time()
        load_at_start = [round(x, 1) for x in os.getloadavg()]
        cases = plan_cases(args.cases, args.seed, names)
        workers = [Worker(seed_root, tmp / f"work{k}", tmp / f"worker{k}.log") for k in range(args.workers)]
        outcomes = []
        findings_dir = Path(args.findings)
        todo = iter(cases)

        def feed(w: Worker) -> None:
            if args.max_seconds and time.time() - started > args.max_seconds:
                return             # out of time: the cases run so far are a uniform sample (shuffled)
            case = next(todo, None)
            if case is not None:
                w.send(*case)

        def record(name: str, case_seed: int, outcome: dict) -> None:
            if "target" not in outcome:    # the worker died (a crash) or hung (a timeout)
                outcome.update(target=name, case_seed=case_seed,
                               detail=f"worker {'died (see its faulthandler output)' if outcome['status'] == 'crash' else 'hung'}")
                _, size, file = make_case(seeds, name, case_seed, tmp / "crash")
                outcome.update(size=size, file=file)
            if outcome["status"] in ("finding", "crash", "timeout"):
                findings_dir.mkdir(parents=True, exist_ok=True)
                keep = findings_dir / f"{name}-{case_seed}"
                make_case(seeds, name, case_seed, keep)
                (keep / "outcome.json").write_text(json.dumps(outcome, indent=2))
                print(f"FINDING {name} {case_seed}: {outcome.get('detail')}", file=sys.stderr, flush=True)
            outcomes.append(outcome)
            if len(outcomes) % 2000 == 0:
                print(f"{len(outcomes)}/{len(cases)} cases, {time.time() - started:.0f} s", file=sys.stderr, flush=True)

        for w in workers:
            feed(w)
        while any(w.pending for w in workers):
            busy = {w.proc.stdout: w for w in workers if w.pending}
            ready, _, _ = select.select(list(busy), [], [], 1.0)
            for stream in ready:
                w = busy[stream]
                name, case_seed, _ = w.pending
                record(name, case_seed, w.receive())
                feed(w)
            now = time.time()
            for w in busy.values():
                if w.pending and now - w.pending[2] > args.timeout:
                    name, case_seed, _ = w.pending
                    w.kill()
                    record(name, case_seed, {"status": "timeout"})
                    feed(w)
        for w in workers:
            w.kill()
        per = summarize(outcomes, names)
        payload = {
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "protocol": {"cases": len(cases), "max_seconds": args.max_seconds, "seed": args.seed, "timeout_s": args.timeout,
                         "memory_bound": f"{MEMORY_SLACK} B + {MEMORY_PER_BYTE} x input bytes (tracemalloc peak, "
                                         "and growth of the worker's resident high-water mark)",
                         "mutations_per_case": "1-3", "torch_threads_per_worker": 1},
            "machine": {"cpus": os.cpu_count(), "load_average_at_start": load_at_start},
            "seconds": round(time.time() - started, 1),
            "workers": args.workers,
            "worker_starts": sum(w.starts for w in workers),
            "total": {"cases": len(outcomes), "findings": sum(p["findings"] for p in per.values()),
                      "crashes": sum(p["crashes"] for p in per.values()),
                      "ok": sum(p["ok"] for p in per.values()), "refused": sum(p["refused"] for p in per.values())},
            "targets": per,
            "findings": [o for o in outcomes if o["status"] in ("finding", "crash", "timeout")][:50],
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
        print(json.dumps(payload["total"]))


if __name__ == "__main__":
    main()
