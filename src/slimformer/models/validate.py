"""Checks of the directories we read (``slimformer compress`` outputs, offload layouts), made
before any module is constructed or any tensor is mapped.

* ``slimformer.json`` / ``offload.json``: every field we read has its type; ``modules`` may
  only name registered module types (``nn/registry.py``); each module is built on the
  meta device (nothing allocated) and every tensor it will hold must be in the weights'
  safetensors header with the same shape and a compatible dtype, so its sizes (in/out
  features, groups, nnz, ...) are justified by the bytes on disk.
* ``config.json``: its integers are bounded by the weights (``num_hidden_layers`` by the
  stored tensors, every other size by the stored elements), and the buffers a model
  builds from it (rotary tables, position ids) by the files' size.

Every refusal is one :class:`ModelLoadError` line naming the file and the field.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn as nn

from slimformer.errors import ModelLoadError, SlimformerError
from slimformer.formats.safetensors_check import SafetensorsHeader, TensorEntry, check_safetensors
from slimformer.models.hf import first_line, read_json_limited
from slimformer.nn.registry import MODULE_TYPES

SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
}
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}$")
MAX_INT = 1 << 40               # no size in a model config comes near this
SMALL_CONFIG_INT = 1 << 24      # sizes up to this need no justification by the weights
BUFFER_SLACK = 16 << 20         # real buffers a rebuilt model may hold beyond 4x its files


def refuse(file, field: str, why: str):
    raise ModelLoadError(f"{file}: {field}: {why}")


def _config_value(file, where: str, value, depth: int = 0) -> None:
    """A module config holds JSON scalars, short strings and small nested mappings/lists."""
    if depth > 4:
        refuse(file, where, "nested too deeply")
    if value is None or isinstance(value, (bool, str)):
        if isinstance(value, str) and len(value) > 256:
            refuse(file, where, "string longer than 256 characters")
        return
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            refuse(file, where, f"{value} is out of range")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            refuse(file, where, f"{value} is not finite")
        return
    if isinstance(value, list):
        if len(value) > 64:
            refuse(file, where, f"list of {len(value)} items (at most 64)")
        for i, item in enumerate(value):
            _config_value(file, f"{where}[{i}]", item, depth + 1)
        return
    if isinstance(value, dict):
        if len(value) > 64:
            refuse(file, where, f"mapping of {len(value)} keys (at most 64)")
        for key, item in value.items():
            _config_value(file, f"{where}.{key}", item, depth + 1)
        return
    refuse(file, where, f"unexpected {type(value).__name__}")


def _dtype_fits(stored: str, want: torch.dtype) -> bool:
    """A stored tensor may stand for ``want``: the same dtype, or any float for a float
    (a bf16 file read in fp32 is converted); integer codes must match exactly."""
    have = SAFETENSORS_DTYPES.get(stored)
    if have is None:
        return False
    return have == want or (have.is_floating_point and want.is_floating_point)


def check_tensor(file, key: str, entry: TensorEntry | None, shape, dtype: torch.dtype, flat_ok: bool = False) -> None:
    """``entry`` (a safetensors header entry) may be bound where a tensor of ``shape`` and
    ``dtype`` is expected. ``flat_ok``: a 1-D tensor of the same element count and dtype is
    accepted too (format version 1 stored packed codes flat; QuantLinear reads both)."""
    if entry is None:
        refuse(file, key, "missing from the weights")
    flat = flat_ok and len(entry.shape) == 1 and entry.shape[0] == math.prod(shape) \
        and SAFETENSORS_DTYPES.get(entry.dtype) == dtype
    if (tuple(entry.shape) != tuple(shape) and not flat) or not _dtype_fits(entry.dtype, dtype):
        refuse(file, key, f"stored as {list(entry.shape)} {entry.dtype}, but the module expects "
                          f"{list(shape)} {str(dtype).removeprefix('torch.')}")


def persistent_tensors(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of ``module`` (recursively), by full name."""
    out = {}
    for mod_name, sub in module.named_modules(remove_duplicate=False):
        base = prefix + (mod_name + "." if mod_name else "")
        for attr, p in sub._parameters.items():
            if p is not None:
                out[base + attr] = p
        for attr, b in sub._buffers.items():
            if b is not None and attr not in sub._non_persistent_buffers_set:
                out[base + attr] = b
    return out


def check_module_configs(file, modules, tensors: dict[str, TensorEntry], dtype: torch.dtype,
                         flat_ok: bool = False) -> dict[str, dict]:
    """``modules`` (name -> config) of a ``slimformer.json``/``offload.json`` in ``file``, each
    a registered type whose every tensor is in ``tensors`` (the safetensors headers) with the
    shape and dtype it needs. Built on the meta device: nothing is allocated."""
    if not isinstance(modules, dict):
        refuse(file, "modules", f"expected a mapping of module names to configs, found {type(modules).__name__}")
    if len(modules) > len(tensors):   # every module stores at least one tensor
        refuse(file, "modules", f"{len(modules)} modules, but the weights hold {len(tensors)} tensors")
    for name, cfg in modules.items():
        where = f"modules[{name[:120]!r}]"
        if not _MODULE_NAME.match(name) or len(name) > 512:
            refuse(file, where, "not a dotted module name")
        if not isinstance(cfg, dict):
            refuse(file, where, f"expected a mapping, found {type(cfg).__name__}")
        kind = cfg.get("type")
        if not isinstance(kind, str) or kind not in MODULE_TYPES:
            known = ", ".join(sorted(MODULE_TYPES)) or "none registered"
            refuse(file, f"{where}.type", f"{str(kind)[:60]!r} is not a registered module type (known: {known})")
        for key, value in cfg.items():
            _config_value(file, f"{where}.{key}", value)
        module = build_on_meta(file, where, MODULE_TYPES[kind], cfg, dtype)
        # A submodule that is itself listed (InputScaledLinear's quantised inner layer) is
        # replaced by that entry: its tensors are checked there.
        for key, t in persistent_tensors(module, name + ".").items():
            owners = key[len(name) + 1:].split(".")[:-1]   # submodule path below this module
            if not any(f"{name}.{'.'.join(owners[:i])}" in modules for i in range(1, len(owners) + 1)):
                check_tensor(file, key, tensors.get(key), t.shape, t.dtype, flat_ok)
    return modules


def build_on_meta(file, where: str, cls, cfg: dict, dtype: torch.dtype) -> nn.Module:
    try:
        with torch.device("meta"):
            return cls.from_config(cfg, dtype)
    except SlimformerError as exc:
        refuse(file, where, first_line(exc))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, OverflowError,
            ZeroDivisionError, AssertionError, NotImplementedError) as exc:
        # from_config read a field of the wrong kind (missing key, wrong type, impossible size)
        refuse(file, where, f"not a valid {cls.__name__} config ({type(exc).__name__}: {first_line(exc)[:160]})")


def check_model_config(directory: Path, tensors: dict[str, TensorEntry]) -> dict:
    """``config.json`` of ``directory``: every integer bounded by what the weights hold."""
    file = directory / "config.json"
    if not file.is_file():
        refuse(directory, "config.json", "missing")
    config = read_json_limited(file)
    elements = sum(math.prod(e.shape) for e in tensors.values())
    bound = max(SMALL_CONFIG_INT, elements)

    def walk(value, where: str, depth: int) -> None:
        if depth > 8:
            refuse(file, where, "nested too deeply")
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, int) and abs(value) > bound:
            refuse(file, where, f"{value} is larger than the weights justify ({bound})")
        if isinstance(value, float) and not math.isfinite(value):
            refuse(file, where, f"{value} is not finite")
        leaf = where.rsplit(".", 1)[-1]
        if ("dropout" in leaf or leaf.endswith(("_pdrop", "_prob"))) and isinstance(value, (int, float)) \
                and not 0 <= value <= 1:
            refuse(file, where, f"{value} is not a probability")   # torch refuses it at every forward
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}" if where else k, depth + 1)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]", depth + 1)

    walk(config, "", 0)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        layers = config.get(key)
        if isinstance(layers, int) and not isinstance(layers, bool) and layers > len(tensors):
            refuse(file, key, f"{layers} layers, but the weights hold {len(tensors)} tensors")
    return config


def check_skeleton(directory: Path, build, file_bytes: int) -> None:
    """``build()`` constructs the model with every tensor on the meta device; the buffers
    that loading leaves real (not stored: rotary tables, position ids) may take at most
    4x the weights' bytes plus 16 MiB."""
    try:
        model = build()
    except SlimformerError:
        raise
    except Exception as exc:   # transformers' config checks: any error of the config's values
        refuse(directory / "config.json", "model", f"cannot build it ({first_line(exc)[:160]})")
    real = sum(b.numel() * b.element_size() for b in model.buffers())
    limit = 4 * file_bytes + BUFFER_SLACK
    if real > limit:
        refuse(directory / "config.json", "model", f"its buffers need {real} bytes, more than the weights "
                                                   f"justify ({limit})")


def check_file_name(file, field: str, name) -> str:
    """A plain file name inside the directory (no separators, not hidden, no ``..``)."""
    if not isinstance(name, str) or not _FILE_NAME.match(name) or ".." in name:
        refuse(file, field, f"{str(name)[:80]!r} is not a plain file name")
    return name


def check_compressed_dir(directory: Path, dtype: torch.dtype = torch.float32,
                         weights_file: str = "model.safetensors", readable=(1, 2)) -> tuple[dict, SafetensorsHeader]:
    """The checked ``slimformer.json`` of a compressed directory and its weights' header."""
    from slimformer.models.hf import COMPRESSED_MARKER, read_compressed_config

    file = directory / COMPRESSED_MARKER
    meta = read_compressed_config(directory)
    version = meta.get("format_version")
    if isinstance(version, bool) or version not in readable:
        refuse(file, "format_version", f"{str(version)[:40]!r} is not one of {', '.join(map(str, readable))}")
    for key in ("source", "recipe"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            refuse(file, key, f"expected a string, found {type(meta[key]).__name__}")
    versions = meta.get("versions", {})
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        refuse(file, "versions", "expected a mapping of library names to version strings")
    for key, kinds in (("calibration", (dict,)), ("fallbacks", (dict, list)), ("layers", (dict, list)),
                       ("training", (dict,)), ("compress_seconds", (int, float))):
        if meta.get(key) is not None and not isinstance(meta[key], kinds):
            refuse(file, key, f"unexpected {type(meta[key]).__name__}")
    if "modules" not in meta:
        refuse(file, "modules", "missing")
    weights = directory / weights_file
    if not weights.is_file():
        refuse(directory, weights_file, "missing")
    header = check_safetensors(weights)
    check_module_configs(file, meta["modules"], header.tensors, dtype, flat_ok=version == 1)
    check_model_config(directory, header.tensors)
    return meta, header


def check_replaces(file, model: nn.Module, name: str, cfg: dict) -> None:
    """Module ``name`` of ``model`` exists and has the input/output sizes its replacement
    ``cfg`` records (a compressed module never changes a layer's shape)."""
    where = f"modules[{name[:120]!r}]"
    try:
        old = model.get_submodule(name)
    except AttributeError:
        # a module attached beside the layers (hidden-state quantisation) is new: its parent must exist
        parent, _, leaf = name.rpartition(".")
        try:
            model.get_submodule(parent)
        except AttributeError:
            refuse(file, where, "the model has no such module")
        if not leaf.isidentifier() or "in_features" in cfg or "out_features" in cfg:
            refuse(file, where, "the model has no such layer")
        return
    for attr in ("in_features", "out_features"):
        want = getattr(old, attr, getattr(old, "nx" if attr == "in_features" else "nf", None))  # Conv1D: nx, nf
        if want is not None and attr in cfg and cfg[attr] != want:
            refuse(file, f"{where}.{attr}", f"{cfg[attr]}, but the model's layer has {want}")


def check_config_types(file, config) -> None:
    """Fields whose default in the config's class is a number hold a number, the output
    switches are booleans and ``return_dict`` is true (each of these passes transformers'
    loading and fails at the first forward). Token ids are left alone: real checkpoints
    set them to null."""
    try:
        defaults = type(config)().to_dict()
    except Exception:   # a class without usable defaults: nothing to compare with
        return
    for key, default in defaults.items():
        if isinstance(default, bool) or not isinstance(default, (int, float)) or key.endswith("token_id"):
            continue
        value = getattr(config, key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            refuse(file, key, f"expected a number (the default is {default}), found {type(value).__name__}")
    for key in ("output_hidden_states", "output_attentions", "use_cache"):
        value = getattr(config, key, None)
        if value is not None and not isinstance(value, bool):
            refuse(file, key, f"expected true or false, found {type(value).__name__}")
    # return_dict: false makes the model return tuples, which the model's own forward (and
    # every slimformer path) reads by name: it fails at the first forward.
    if getattr(config, "return_dict", True) is not True:
        refuse(file, "return_dict", f"must be true, found {getattr(config, 'return_dict')!r}")
