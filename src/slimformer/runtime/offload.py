"""Offloading: run a model whose transformer blocks live on disk, under a memory budget.

``save_offloadable`` writes one safetensors file per transformer block plus one for
the rest (embeddings, final norm, LM head). ``load_offloaded`` builds the model on the
meta device, keeps the non-block weights resident, and gives every block a forward
pre-hook that binds the block's tensors straight from the memory-mapped files (no
copy: the parameters *are* the mapped pages) and a post-hook that unbinds them, so the
mapping is dropped and its pages leave the process. A background thread maps and
faults in the next block while the current one computes.

The budget counts the non-block weights plus ``capacity`` block slots. Slots beyond
the ones streaming needs (1, or 2 with prefetch) pin the first blocks, which are then
read once and stay resident: a larger budget means fewer bytes streamed per forward.

Also reads a ``slimformer compress`` directory (one ``model.safetensors``) and a plain
Hugging Face safetensors directory, whose key names are the model's own.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from slimformer.errors import MemoryBudgetError, ModelLoadError
from slimformer.models.adapters import adapter_for
from slimformer.models.compressed import MODULE_TYPES, library_versions, swapped_modules
from slimformer.formats.safetensors_check import TensorEntry, check_safetensors
from slimformer.models.hf import (
    COMPRESSED_MARKER,
    first_line,
    model_class,
    read_json_limited,
)
from slimformer.models.validate import (
    check_compressed_dir,
    check_config_types,
    check_file_name,
    check_model_config,
    check_module_configs,
    check_replaces,
    check_skeleton,
    check_tensor,
    refuse,
)
from slimformer.nn.base import CompressedModule, link_modules
from slimformer.nn.surgery import set_module
from slimformer.util.atomic import atomic_directory

OFFLOAD_MARKER = "offload.json"
# 2: QuantLinear's 4-bit codes in the Q4 layout (see nn/quant_linear.py); 1 is still read
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
REST_FILE = "rest.safetensors"
PAGE = 4096

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}
_BYTES_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(text: str | int) -> int:
    """``"300MB"`` → 300_000_000. Units B, KB, MB, GB (powers of 1000) and KiB, MiB,
    GiB (powers of 1024), case-insensitive; a bare number is bytes."""
    if isinstance(text, bool):
        raise MemoryBudgetError(f"bad memory size {text!r}")
    if isinstance(text, int):
        if text <= 0:
            raise MemoryBudgetError(f"memory size must be positive, got {text}")
        return text
    match = _BYTES_RE.match(str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise MemoryBudgetError(f"bad memory size {text!r} (expected e.g. 300MB, 1.5GiB; units B, KB, MB, GB, KiB, MiB, GiB)")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise MemoryBudgetError(f"memory size must be positive, got {text!r}")
    return value


# --------------------------------------------------------------------------- saving

def _block_file(index: int) -> str:
    return f"block_{index:04d}.safetensors"


def _block_of(name: str, prefix: str) -> int | None:
    """Index of the block ``name`` belongs to (``prefix`` = ``model.layers.``), else None."""
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def save_offloadable(model: nn.Module, directory: str | os.PathLike, tokenizer=None, *,
                     overwrite: bool = False) -> Path:
    """Write ``model`` for :func:`load_offloaded`: ``block_NNNN.safetensors`` per
    transformer block, ``rest.safetensors`` for everything else, the HF config, the
    tokenizer if given, and ``offload.json``. Atomic: a failure leaves nothing behind.
    QuantLinear modules are saved as their packed buffers and recorded as in a
    ``slimformer compress`` directory."""
    out = Path(directory)
    adapter = adapter_for(model)
    n_blocks = len(adapter.get_blocks(model))
    prefix = adapter.blocks + "."
    files: list[dict[str, torch.Tensor]] = [{} for _ in range(n_blocks)]
    rest: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_meta:
            raise ModelLoadError(f"cannot save {name}: it is on the meta device (save from a loaded model)")
        if id(tensor) in seen:   # tied (embeddings / LM head): stored once, re-tied on load
            continue
        seen[id(tensor)] = name
        index = _block_of(name, prefix)
        (rest if index is None else files[index])[name] = tensor.detach().contiguous()
    meta = {
        "format_version": FORMAT_VERSION,
        "blocks": adapter.blocks,
        "num_blocks": n_blocks,
        "rest_file": REST_FILE,
        "block_files": [_block_file(i) for i in range(n_blocks)],
        "dtype": str(_float_dtype(model)).removeprefix("torch."),
        "modules": swapped_modules(model),
        "non_block_bytes": sum(t.nbytes for t in rest.values()),
        "block_bytes": [sum(t.nbytes for t in f.values()) for f in files],
        "versions": library_versions(),
    }
    with atomic_directory(out, overwrite) as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(rest, str(tmp / REST_FILE), metadata={"format": "pt"})
        for i, tensors in enumerate(files):
            save_file(tensors, str(tmp / _block_file(i)), metadata={"format": "pt"})
        (tmp / OFFLOAD_MARKER).write_text(json.dumps(meta, indent=2))
    return out


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


# --------------------------------------------------------------------------- loading

@dataclass
class _Entry:
    """One tensor of a block: where it is bound and what stands in when it is not."""

    key: str                 # full name in the files
    module: nn.Module
    attr: str
    is_param: bool
    placeholder: torch.Tensor   # meta tensor of the right shape and dtype


@dataclass
class _Block:
    index: int
    module: nn.Module
    entries: list[_Entry]
    files: dict[str, list[str]]          # file → keys
    nbytes: int
    pinned: bool = False
    bound: bool = False
    future: Future | None = None
    quant_modules: list[nn.Module] = field(default_factory=list)


class Offloader:
    """Streams a model's blocks from memory-mapped safetensors files under a budget.

    Attached to the model as ``model.slimformer_offload``. Counters: ``resident_blocks``
    (blocks whose tensors are mapped now, including one being prefetched),
    ``max_resident_blocks`` (the most ever at once), ``loads`` (block reads),
    ``bytes_loaded``; limits: ``capacity`` (block slots the budget holds), ``pinned``.
    """

    def __init__(self, model: nn.Module, blocks: list[_Block], dtypes: dict[str, torch.dtype],
                 budget_bytes: int | None, non_block_bytes: int, prefetch: bool):
        self.model = model
        self.blocks = blocks
        self.non_block_bytes = non_block_bytes
        self.block_bytes = max((b.nbytes for b in blocks), default=0)
        self.budget_bytes = budget_bytes
        n = len(blocks)
        if budget_bytes is None:
            capacity = n
        else:
            need = non_block_bytes + self.block_bytes
            if budget_bytes < need:
                raise MemoryBudgetError(
                    f"memory budget {budget_bytes} B cannot hold the non-block weights ({non_block_bytes} B) "
                    f"plus one block ({self.block_bytes} B): need at least {need} B")
            capacity = (budget_bytes - non_block_bytes) // max(self.block_bytes, 1)
        self.capacity = min(capacity, n)
        if self.capacity >= n:
            self.window = 0            # everything fits: read each block once, keep it
        else:
            self.window = 2 if prefetch and self.capacity >= 2 else 1
            if prefetch and self.window < 2:
                warnings.warn(f"memory budget holds only one block ({self.block_bytes} B); prefetch is off",
                              stacklevel=3)
        self.pinned = self.capacity - self.window
        for block in blocks[:self.pinned]:
            block.pinned = True
        self.prefetch = prefetch and (self.window == 2 or self.window == 0)
        self._dtypes = dtypes
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slimformer-prefetch") \
            if self.prefetch else None
        self.resident_blocks = 0
        self.max_resident_blocks = 0
        self.loads = 0
        self.bytes_loaded = 0
        self._hooks = []
        for block in blocks:
            self._hooks.append(block.module.register_forward_pre_hook(self._make_pre_hook(block.index)))
            self._hooks.append(block.module.register_forward_hook(self._make_post_hook(block.index),
                                                                  always_call=True))

    # Reading runs on the prefetch thread or the caller's; binding only on the caller's.
    def _read(self, block: _Block, touch: bool) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for file, keys in block.files.items():
            # Each open maps the file afresh; once the handle and these views are gone the
            # mapping is unmapped, so a block's pages stop counting in this process's RSS.
            with safe_open(file, framework="pt") as f:
                for key in keys:
                    tensors[key] = f.get_tensor(key)
        for key, tensor in tensors.items():
            want = self._dtypes[key]
            if tensor.dtype != want:   # e.g. a bf16 HF checkpoint run in fp32: a real copy
                tensors[key] = tensor = tensor.to(want)
            elif touch and tensor.numel():
                # Fault the pages in now (one byte per page), off the compute thread.
                tensor.reshape(-1).view(torch.uint8)[::PAGE].sum()
        return tensors

    def _reserve(self, block: _Block) -> None:
        self.resident_blocks += 1
        self.max_resident_blocks = max(self.max_resident_blocks, self.resident_blocks)
        self.loads += 1
        self.bytes_loaded += block.nbytes

    def _streaming_resident(self) -> int:
        return sum(1 for b in self.blocks if not b.pinned and (b.bound or b.future is not None))

    def _has_room(self, block: _Block) -> bool:
        return block.pinned or self.window == 0 or self._streaming_resident() < self.window

    def _bind(self, block: _Block, tensors: dict[str, torch.Tensor]) -> None:
        for e in block.entries:   # checked at load; again here, as the files may have changed since
            t = tensors.get(e.key)
            if t is None or t.shape != e.placeholder.shape or t.dtype != e.placeholder.dtype:
                have = "missing" if t is None else f"{list(t.shape)} {t.dtype}"
                file = next((f for f, keys in block.files.items() if e.key in keys), "?")
                raise ModelLoadError(f"{file}: {e.key}: now {have}, expected {list(e.placeholder.shape)} "
                                     f"{e.placeholder.dtype} (file changed while loaded?)")
        for e in block.entries:
            t = tensors[e.key]
            if e.is_param:
                e.module._parameters[e.attr] = nn.Parameter(t, requires_grad=False)
            else:
                e.module._buffers[e.attr] = t
        for m in block.quant_modules:
            m.drop_runtime()      # new weights: kernel layouts / dense caches are rebuilt from them
        block.bound = True

    def _release(self, block: _Block) -> None:
        for e in block.entries:
            (e.module._parameters if e.is_param else e.module._buffers)[e.attr] = e.placeholder
        for m in block.quant_modules:
            m.drop_runtime()      # drop the kernel layout (it may share the weights' storage) / dense cache
        block.bound = False
        self.resident_blocks -= 1

    def _drain(self, block: _Block) -> dict[str, torch.Tensor] | None:
        future, block.future = block.future, None
        return None if future is None else future.result()

    def _make_room(self, keep: _Block) -> None:
        """Free a streaming slot for ``keep`` (only needed if blocks ran out of order)."""
        for other in self.blocks:
            if self._has_room(keep):
                return
            if other is keep or other.pinned:
                continue
            if other.future is not None:
                self._drain(other)
                self.resident_blocks -= 1
            elif other.bound:
                self._release(other)

    def _pre(self, index: int) -> None:
        block = self.blocks[index]
        if not block.bound:
            try:
                if block.future is not None:
                    tensors = self._drain(block)
                else:
                    self._make_room(block)
                    self._reserve(block)
                    tensors = self._read(block, touch=False)
            except BaseException:
                self.resident_blocks -= 1   # the slot was reserved for a read that failed
                raise
            self._bind(block, tensors)
        if self.prefetch:
            self._schedule_after(index)

    def _schedule_after(self, index: int) -> None:
        """Start reading the next block that is not resident yet, if a slot is free
        (cyclically: after the last block, the next forward starts at the first)."""
        n = len(self.blocks)
        for step in range(1, n):
            nxt = self.blocks[(index + step) % n]
            if nxt.bound or nxt.future is not None:
                if nxt.pinned or self.window == 0:
                    continue   # resident for good: look further ahead
                return
            if not self._has_room(nxt):
                return
            self._reserve(nxt)
            nxt.future = self._executor.submit(self._read, nxt, True)
            return

    def _post(self, index: int) -> None:
        block = self.blocks[index]
        if block.bound and not block.pinned and self.window > 0:
            self._release(block)

    def _make_pre_hook(self, index: int):
        def hook(module, args):
            self._pre(index)
        return hook

    def _make_post_hook(self, index: int):
        def hook(module, args, output):
            self._post(index)
        return hook

    def release_all(self) -> None:
        """Unbind every block (pinned ones too) and wait for any prefetch in flight."""
        for block in self.blocks:
            if block.future is not None:
                self._drain(block)
                self.resident_blocks -= 1
            if block.bound:
                self._release(block)

    def close(self) -> None:
        """Release everything, remove the hooks and stop the prefetch thread."""
        self.release_all()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def stats(self) -> dict:
        return {"capacity": self.capacity, "pinned": self.pinned, "window": self.window,
                "prefetch": self.prefetch, "resident_blocks": self.resident_blocks,
                "max_resident_blocks": self.max_resident_blocks, "loads": self.loads,
                "bytes_loaded": self.bytes_loaded, "non_block_bytes": self.non_block_bytes,
                "block_bytes": self.block_bytes, "budget_bytes": self.budget_bytes}


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _offload_meta(directory: Path) -> tuple[dict, list[str], torch.dtype]:
    """``offload.json``, every field we read checked: its files must be plain names in
    ``directory`` (a crafted name cannot reach outside it)."""
    file = directory / OFFLOAD_MARKER
    try:
        meta = read_json_limited(file)
    except ModelLoadError as exc:
        raise ModelLoadError(f"corrupt {OFFLOAD_MARKER} in {directory}: {exc}") from None
    version = meta.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        refuse(file, "format_version", f"{str(version)[:40]!r} is not one of {', '.join(map(str, READABLE_VERSIONS))}")
    block_files = meta.get("block_files")
    if not isinstance(block_files, list) or len(block_files) > 1 << 16:
        refuse(file, "block_files", "expected a list of file names")
    files = [check_file_name(file, "rest_file", meta.get("rest_file")),
             *(check_file_name(file, f"block_files[{i}]", n) for i, n in enumerate(block_files))]
    if len(set(files)) != len(files):
        refuse(file, "block_files", "names a file twice")
    num_blocks = meta.get("num_blocks")
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks != len(block_files):
        refuse(file, "num_blocks", f"{str(num_blocks)[:40]!r}, but block_files lists {len(block_files)}")
    if not isinstance(meta.get("blocks"), str):
        refuse(file, "blocks", "expected the blocks' module path (a string)")
    dtype = meta.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        refuse(file, "dtype", f"{str(dtype)[:40]!r} is not one of {', '.join(_DTYPES)}")
    for key in ("non_block_bytes",):
        if key in meta and (isinstance(meta[key], bool) or not isinstance(meta[key], int) or meta[key] < 0):
            refuse(file, key, "expected a non-negative integer")
    if "block_bytes" in meta and not (isinstance(meta["block_bytes"], list)
                                      and all(isinstance(b, int) and not isinstance(b, bool) for b in meta["block_bytes"])):
        refuse(file, "block_bytes", "expected a list of integers")
    meta.setdefault("modules", {})
    return meta, files, _DTYPES[dtype]


def _index(directory: Path, dtype: torch.dtype | None = None):
    """key → file for every stored tensor, the layout's metadata, its dtype if recorded, and
    key → its checked safetensors header entry. ``modules`` are checked against the
    headers (registered types, every tensor present with its shape) before anything is built."""
    if (directory / OFFLOAD_MARKER).exists():
        meta, files, stored = _offload_meta(directory)
        marker = directory / OFFLOAD_MARKER
    elif (directory / COMPRESSED_MARKER).exists():
        meta, header = check_compressed_dir(directory, dtype or torch.float32)
        files, stored, marker = ["model.safetensors"], None, None   # modules checked just now
    else:
        meta = {"modules": {}}
        files, stored, marker = sorted(p.name for p in directory.glob("*.safetensors")), None, None
        if not files:
            raise ModelLoadError(f"{directory} has no safetensors weights to offload")
    index: dict[str, str] = {}
    entries: dict[str, TensorEntry] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            refuse(directory, name, "missing")
        for key, entry in check_safetensors(path).tensors.items():
            if key in index:
                refuse(path, key, f"also stored in {Path(index[key]).name}")
            index[key] = str(path)
            entries[key] = entry
    if marker is not None:
        check_module_configs(marker, meta["modules"], entries, dtype or stored or torch.float32,
                             flat_ok=meta["format_version"] == 1)
    return index, meta, stored, entries


def _skeleton(directory: Path, meta: dict, dtype: torch.dtype, headers: dict[str, TensorEntry]):
    """The model with every parameter on the meta device (buffers real), swapped modules in."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    check_model_config(directory, headers)   # sizes bounded by the weights, before anything is built
    try:
        config = AutoConfig.from_pretrained(str(directory))
    except Exception as exc:
        raise ModelLoadError(f"cannot read model config of {directory}: {first_line(exc)}") from None
    check_config_types(directory / "config.json", config)
    cls = model_class(config)   # raises UnsupportedArchitectureError

    def build(include_buffers: bool):
        with init_empty_weights(include_buffers=include_buffers):
            model = cls.from_config(config, dtype=dtype)
        model.tie_weights()
        return model

    file_bytes = sum(e.nbytes for e in headers.values())
    check_skeleton(directory, lambda: build(True), file_bytes)
    try:
        model = build(False)
    except Exception as exc:
        raise ModelLoadError(f"cannot rebuild model from {directory}: {first_line(exc)}") from None
    for name, cfg in meta.get("modules", {}).items():
        check_replaces(directory, model, name, cfg)   # type, fields and sizes: checked by _index
        # All their buffers are stored, so none is allocated here (they are per block).
        with init_empty_weights(include_buffers=True):
            set_module(model, name, MODULE_TYPES[cfg["type"]].from_config(cfg, dtype))
    link_modules(model)
    return model


def _tensors_by_name(model: nn.Module) -> list[tuple[str, nn.Module, str, bool, torch.Tensor]]:
    """(name, owner, attribute, is_parameter, tensor) for every parameter and persistent
    buffer, tied ones under each of their names."""
    out = []
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = mod_name + "." if mod_name else ""
        for attr, p in module._parameters.items():
            if p is not None:
                out.append((prefix + attr, module, attr, True, p))
        for attr, b in module._buffers.items():
            if b is not None and attr not in module._non_persistent_buffers_set:
                out.append((prefix + attr, module, attr, False, b))
    return out


def load_offloaded(directory: str | os.PathLike, budget_bytes: int | str | None, prefetch: bool = True,
                   dtype: torch.dtype | None = None):
    """Load a model whose blocks stream from disk. Returns ``(model, tokenizer)``.

    ``directory``: written by :func:`save_offloadable`, by ``slimformer compress``, or a
    Hugging Face safetensors directory. ``budget_bytes`` (int or a string such as
    ``"300MB"``; ``None``: no limit) bounds the non-block weights plus the resident
    blocks; :class:`MemoryBudgetError` if it cannot hold them plus one block.
    ``prefetch``: read block i+1 on a background thread while block i computes.
    The tokenizer is ``None`` if the directory has none. Counters are on
    ``model.slimformer_offload`` (an :class:`Offloader`).

    The budget counts stored weight bytes. Not counted: activations and KV cache, and
    for QuantLinear blocks the kernel-layout copy each resident block builds on its
    first forward (rebuilt every time a streamed block comes back).
    """
    from transformers import AutoTokenizer

    directory = Path(directory)
    budget = None if budget_bytes is None else parse_bytes(budget_bytes)
    if not directory.is_dir():
        raise ModelLoadError(f"model directory not found: {directory}")
    index, meta, stored_dtype, headers = _index(directory, dtype)
    dtype = dtype or stored_dtype or torch.float32
    model = _skeleton(directory, meta, dtype, headers)
    adapter = adapter_for(model)
    block_modules = adapter.get_blocks(model)
    prefix = adapter.blocks + "."

    named = _tensors_by_name(model)
    # Tied tensors: one object under several names; any stored name feeds them all.
    groups: dict[int, list[str]] = {}
    for name, _, _, _, t in named:
        groups.setdefault(id(t), []).append(name)
    source = {}
    for names in groups.values():
        stored = [n for n in names if n in index]
        for n in names:
            if stored:
                source[n] = stored[0]
    missing = [n for n, *_ in named if n not in source]
    used = set(source.values())
    unexpected = [k for k in index if k not in used]
    if missing or unexpected:
        problem = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ModelLoadError(f"cannot load weights from {directory}: {problem}")

    # Every stored tensor has the shape (and a compatible dtype) of what it is bound to: the
    # kernels trust the module's sizes, so a crafted file must not bind a shorter buffer.
    flat_ok = meta.get("format_version") == 1
    for name, _, _, _, t in named:
        key = source[name]
        check_tensor(index[key], key, headers[key], t.shape, t.dtype, flat_ok)
    dtypes = {source[n]: t.dtype for n, _, _, _, t in named}
    entries: list[list[_Entry]] = [[] for _ in block_modules]
    resident: dict[str, torch.Tensor] = {}
    non_block_bytes = 0
    for name, module, attr, is_param, t in named:
        key = source[name]
        b = _block_of(name, prefix)
        if b is not None:
            # the stored shape: checked above to be the module's (or its flat form, version 1)
            placeholder = torch.empty(headers[key].shape, dtype=dtypes[key], device="meta")
            if is_param:
                placeholder = nn.Parameter(placeholder, requires_grad=False)
            entries[b].append(_Entry(key, module, attr, is_param, placeholder))
            continue
        if key not in resident:
            resident[key] = _read_resident(index[key], key, dtypes[key])
            non_block_bytes += resident[key].nbytes
        value = resident[key]
        if is_param:
            # One Parameter per stored tensor, so tied names stay one object.
            if not isinstance(value, nn.Parameter):
                value = resident[key] = nn.Parameter(value, requires_grad=False)
            module._parameters[attr] = value
        else:
            module._buffers[attr] = value
    if any(_block_of(n, prefix) is None and t.is_meta for n, _, _, _, t in _tensors_by_name(model)):
        raise ModelLoadError(f"cannot load weights from {directory}: a non-block tensor stayed unloaded")

    quant_types = (CompressedModule, *MODULE_TYPES.values())
    blocks = []
    for i, (module, block_entries) in enumerate(zip(block_modules, entries)):
        files: dict[str, list[str]] = {}
        for e in block_entries:
            if e.key not in files.get(index[e.key], []):
                files.setdefault(index[e.key], []).append(e.key)
        nbytes = sum(e.placeholder.nbytes for e in {e.key: e for e in block_entries}.values())
        blocks.append(_Block(i, module, block_entries, files, nbytes,
                             quant_modules=[m for m in module.modules() if isinstance(m, quant_types)
                                            and callable(getattr(m, "drop_runtime", None))]))
        for e in block_entries:   # drop whatever the skeleton held (meta, or real buffers)
            (e.module._parameters if e.is_param else e.module._buffers)[e.attr] = e.placeholder

    model.slimformer_offload = Offloader(model, blocks, dtypes, budget, non_block_bytes, prefetch)
    model.eval()
    tokenizer = None
    if any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except Exception as exc:
            raise ModelLoadError(f"cannot load tokenizer from {directory}: {first_line(exc)}") from None
    return model, tokenizer


def _read_resident(file: str, key: str, dtype: torch.dtype) -> torch.Tensor:
    """A non-block tensor, kept for the model's lifetime as a view of its own mapping of
    the file (no copy). Opened alone, so that mapping holds only this tensor's pages;
    blocks sharing the file map it separately and their pages still leave when released."""
    with safe_open(file, framework="pt") as f:
        tensor = f.get_tensor(key)
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
