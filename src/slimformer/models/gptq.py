"""Import of GPTQ checkpoints (the AutoGPTQ / GPTQModel / transformers layout) into our
module types, exactly: every dequantised weight equals the checkpoint's
``scales[g_idx[k]] * (q[k] - zeros[g_idx[k]])`` bit for bit in fp32.

The layout, per quantised linear layer of ``K`` inputs and ``N`` outputs, ``b`` bits,
``G`` groups (``K / group_size``, one when ``group_size`` is -1):

- ``qweight`` int32 ``[K*b/32, N]``: the codes of each output column as one little-endian
  bit stream along the input dimension (code ``k`` at bits ``k*b .. k*b+b-1`` of the
  column's words, low bits first; 3-bit codes cross word boundaries);
- ``qzeros`` int32 ``[G, N*b/32]``: the zero-points of each group, packed the same way
  along the output dimension;
- ``scales`` float16 ``[G, N]``; ``g_idx`` int32 ``[K]`` (the group of each input column;
  absent in old checkpoints: ``k // group_size``); ``bias`` ``[N]`` optional.

``checkpoint_format`` "gptq" (v1) stores each zero-point minus one; "gptq_v2" stores it
as is. v1 zero-points are read as the packed words plus one in every field, carried
within each 32-bit word as GPTQModel does (the exact inverse of the word-wise subtraction
its writer does; AutoGPTQ's reader adds one per field, which agrees except for a field
stored as all ones, i.e. a zero-point of 0: such fields are warned about).

Symmetric checkpoints store a zero-point of ``2^(b-1)``, which is our symmetric
convention exactly (``(code - 2^(b-1)) * scale``); a layer holding any other zero-point is
read as asymmetric. Act-order checkpoints (``g_idx`` not ``k // group_size``) become an
:class:`~slimformer.nn.act_order.ActOrderLinear`: the columns sorted by group, so each
group is contiguous, behind the input permutation.

GPTQModel's per-module overrides (``dynamic``) are read too: modules it excludes are
stored dense (and loaded as they are); each override's bits and group size are checked,
and each layer takes the declared format its tensor shapes fit (patterns are never
evaluated). Marlin/BitBLAS repacked layouts, pack dtypes other than int32, 5-7-bit
(planar) codes, adapters and rotations are refused.

Everything is validated before any tensor is read: every field of
``quantization_config`` (types, ranges), the safetensors headers (``safe_open``: sizes and
offsets against the file), every tensor's dtype and shape against the dimensions in
``config.json``. A bad file fails with one :class:`ModelLoadError` line naming the file and
the field. Pickle checkpoints are refused (never unpickled).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from slimformer.errors import ModelLoadError, UnsafeCheckpointError
from slimformer.formats.spec import WeightSpec
from slimformer.models.hf import first_line, model_class, read_json_limited
from slimformer.models.validate import check_config_types, check_model_config

SUPPORTED_BITS = (2, 3, 4, 8)
FORMATS = ("gptq", "gptq_v2")
_QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
# Fields that change nothing about how the stored tensors are read (how they were
# computed, which kernel to use, provenance).
_INFORMATIONAL = {
    "quant_method", "damp_percent", "damp_auto_increment", "true_sequential", "static_groups", "mse",
    "model_name_or_path", "model_file_base_name", "is_marlin_format", "use_exllama", "exllama_config",
    "use_cuda_fp16", "max_input_length", "cache_block_outputs", "batch_size", "pad_token_id", "dataset",
    "tokenizer", "backend", "block_name_to_quantize", "module_name_preceding_first_block", "meta",
    "modules_in_block_to_quantize", "v2", "v2_alpha", "act_group_aware", "hyb_act", "quantizer", "uri",
    "offload_to_disk", "offload_to_disk_path", "device", "mock_quantization", "fail_safe", "hessian",
    "gptaq", "pack_impl", "buffered_fwd", "zero_point", "version", "desc_act", "sym", "bits", "group_size",
    "checkpoint_format", "format", "pack_dtype", "lm_head", "dynamic", "adapter", "rotation", "method",
}


@dataclass(frozen=True)
class GPTQConfig:
    """The parts of ``quantization_config`` that decide how the tensors are read."""

    bits: int
    group_size: int              # -1: one group per output row
    desc_act: bool
    sym: bool
    checkpoint_format: str       # "gptq" (zero-points stored minus one) or "gptq_v2"
    lm_head: bool
    unknown: tuple[str, ...] = field(default=())
    # (bits, group_size) of GPTQModel's per-module overrides (``dynamic``); which layers they
    # apply to is read from each layer's tensor shapes, not from the patterns
    overrides: tuple[tuple[int, int], ...] = field(default=())

    @property
    def formats(self) -> tuple[tuple[int, int], ...]:
        return ((self.bits, self.group_size), *(f for f in self.overrides if f != (self.bits, self.group_size)))


def _spec(bits: int, group_size: int, symmetric: bool) -> WeightSpec:
    if group_size == -1:
        return WeightSpec(bits, symmetric, "channel")
    return WeightSpec(bits, symmetric, "group", group_size)


def _bad(where, key: str, why: str) -> ModelLoadError:
    return ModelLoadError(f"{where}: quantization_config.{key} {why}")


def _typed(qc: dict, where, key: str, kind, default=None, required: bool = False):
    if key not in qc or qc[key] is None:
        if required:
            raise _bad(where, key, "is missing")
        return default
    value = qc[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise _bad(where, key, f"must be {getattr(kind, '__name__', kind)}, got {type(value).__name__} {value!r:.40}")
    return value


def parse_quantization_config(qc, where) -> GPTQConfig:
    """Check every field of a GPTQ ``quantization_config``; one line naming the field
    when a value is missing, of the wrong type, out of range or not supported."""
    if not isinstance(qc, dict):
        raise ModelLoadError(f"{where}: quantization_config must be a JSON object")
    bits = _typed(qc, where, "bits", int, required=True)
    if bits not in SUPPORTED_BITS:
        raise _bad(where, "bits", f"= {bits} is not supported "
                   f"(GPTQ bits we read: {', '.join(map(str, SUPPORTED_BITS))})")
    group_size = _typed(qc, where, "group_size", int, required=True)
    if group_size != -1 and not 1 <= group_size <= 1 << 20:
        raise _bad(where, "group_size", f"= {group_size} must be -1 (per channel) or a positive group size")
    desc_act = _typed(qc, where, "desc_act", bool, default=False)
    sym = _typed(qc, where, "sym", bool, default=True)
    for key in ("true_sequential", "static_groups", "is_marlin_format"):
        _typed(qc, where, key, bool)
    _typed(qc, where, "damp_percent", (int, float))
    fmt = _typed(qc, where, "checkpoint_format", str)
    alt = _typed(qc, where, "format", str)
    if fmt is not None and alt is not None and fmt != alt:
        raise _bad(where, "format", f"'{alt}' contradicts checkpoint_format '{fmt}'")
    fmt = fmt or alt or "gptq"
    if fmt not in FORMATS:
        raise _bad(where, "checkpoint_format", f"'{fmt}' is not supported (readable: {', '.join(FORMATS)}; "
                   "marlin/bitblas/qqq checkpoints repack the codes differently)")
    if qc.get("is_marlin_format"):
        raise _bad(where, "is_marlin_format", "is true: Marlin's repacked layout is not supported")
    pack_dtype = _typed(qc, where, "pack_dtype", str, default="int32")
    if pack_dtype not in ("int32", "torch.int32"):
        raise _bad(where, "pack_dtype", f"'{pack_dtype}' is not supported (only int32 words)")
    lm_head = _typed(qc, where, "lm_head", bool, default=False)
    overrides = _dynamic(qc.get("dynamic"), where, bits, group_size)
    for key in ("adapter", "rotation"):
        if qc.get(key) not in (None, {}, "", False):
            raise _bad(where, key, f"= {qc[key]!r:.60} is not supported (the weights need it applied at run time)")
    modules = qc.get("modules_in_block_to_quantize")
    if modules is not None and not (isinstance(modules, list) and all(
            isinstance(group, list) and all(isinstance(m, str) for m in group) for group in modules)):
        raise _bad(where, "modules_in_block_to_quantize", "must be a list of lists of module names")
    unknown = tuple(sorted(k for k in qc if k not in _INFORMATIONAL and qc[k] not in (None, False, {}, [], "")))
    return GPTQConfig(bits, group_size, desc_act, sym, fmt, lm_head, unknown, overrides)


_DYNAMIC_KEYS = {"bits": int, "group_size": int, "sym": bool, "desc_act": bool}


def _dynamic(dynamic, where, bits: int, group_size: int) -> tuple[tuple[int, int], ...]:
    """GPTQModel's per-module overrides: ``{"-:pattern": {}}`` leaves matching modules
    unquantised (they are stored dense, which the tensors show), ``{"[+:]pattern": {bits,
    group_size, sym, desc_act}}`` quantises them differently. Each override's (bits,
    group_size) is checked here; which layer has which is read from its tensor shapes."""
    if dynamic in (None, {}):
        return ()
    if not isinstance(dynamic, dict):
        raise _bad(where, "dynamic", "must be an object of module patterns")
    found = []
    for pattern, override in dynamic.items():
        label = f"dynamic['{pattern:.60}']"
        if not isinstance(override, dict):
            raise _bad(where, label, "must be an object of overrides")
        if pattern.startswith("-:"):
            continue
        for key, value in override.items():
            kind = _DYNAMIC_KEYS.get(key)
            if kind is None:
                raise _bad(where, f"{label}.{key}", "is an override this reader does not support "
                           f"(supported: {', '.join(_DYNAMIC_KEYS)})")
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise _bad(where, f"{label}.{key}", f"must be {kind.__name__}, got {value!r:.40}")
        b, gs = override.get("bits", bits), override.get("group_size", group_size)
        if b not in SUPPORTED_BITS:
            raise _bad(where, f"{label}.bits", f"= {b} is not supported (GPTQ bits we read: "
                       f"{', '.join(map(str, SUPPORTED_BITS))})")
        if gs != -1 and not 1 <= gs <= 1 << 20:
            raise _bad(where, f"{label}.group_size", f"= {gs} must be -1 (per channel) or a positive group size")
        found.append((b, gs))
    return tuple(dict.fromkeys(found))


# ----------------------------------------------------------------------- the packed words
def unpack_along_rows(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """``[W, C]`` int32 words holding, per column, a little-endian bit stream of ``count``
    ``bits``-wide fields (field ``i`` at bits ``i*bits ..``, crossing word boundaries when
    ``bits`` does not divide 32) -> ``[count, C]`` uint8."""
    n_words = words.shape[0]
    if n_words * 32 != count * bits:
        raise ValueError(f"{n_words} words cannot hold {count} fields of {bits} bits")
    u = words.to(torch.int64) & 0xFFFFFFFF
    pos = torch.arange(count, dtype=torch.int64) * bits
    word, off = pos // 32, (pos % 32).unsqueeze(1)
    value = u.index_select(0, word) >> off
    spill = (pos % 32) + bits > 32
    if bool(spill.any()):
        idx = spill.nonzero().reshape(-1)
        upper = u.index_select(0, word[idx] + 1) << (32 - off[idx])
        value[idx] |= upper
    return (value & ((1 << bits) - 1)).to(torch.uint8)


def pack_along_rows(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`unpack_along_rows`: ``[count, C]`` fields (``0..2^bits-1``) ->
    ``[count*bits/32, C]`` int32 words."""
    count = fields.shape[0]
    if (count * bits) % 32:
        raise ValueError(f"{count} fields of {bits} bits do not fill whole int32 words")
    v = fields.to(torch.int64)
    pos = torch.arange(count, dtype=torch.int64) * bits
    word, off = pos // 32, (pos % 32).unsqueeze(1)
    words = torch.zeros(count * bits // 32, fields.shape[1], dtype=torch.int64)
    words.index_add_(0, word, (v << off) & 0xFFFFFFFF)     # disjoint bits: the sum is the OR
    spill = (pos % 32) + bits > 32
    if bool(spill.any()):
        idx = spill.nonzero().reshape(-1)
        words.index_add_(0, word[idx] + 1, v[idx] >> (32 - off[idx]))
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def write_zeros(zeros: torch.Tensor, bits: int, v1: bool) -> torch.Tensor:
    """Zero-points ``[G, N]`` -> ``qzeros`` ``[G, N*b/32]``; v1 stores each minus one, word
    by word with borrows (as GPTQModel writes; :func:`read_zeros` inverts it exactly), or per
    field modulo ``2^bits`` for 3 bits."""
    z = zeros.to(torch.int64)
    if not v1:
        return pack_along_rows(z.t(), bits).t().contiguous()
    if 32 % bits:
        return pack_along_rows(((z - 1) & ((1 << bits) - 1)).t(), bits).t().contiguous()
    ones = sum(1 << (i * bits) for i in range(32 // bits))
    words = (pack_along_rows(z.t(), bits).t().to(torch.int64) & 0xFFFFFFFF) - ones
    words = words & 0xFFFFFFFF
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).contiguous()


def read_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """``qweight`` ``[K*b/32, N]`` -> codes ``[N, K]`` uint8."""
    return unpack_along_rows(qweight, bits, in_features).t().contiguous()


def read_zeros(qzeros: torch.Tensor, bits: int, out_features: int, v1: bool) -> tuple[torch.Tensor, int]:
    """``qzeros`` ``[G, N*b/32]`` -> zero-points ``[G, N]`` (int16) and how many v1 fields
    were stored as all ones (a zero-point of 0, which GPTQ tools read differently)."""
    if not v1:
        return unpack_along_rows(qzeros.t(), bits, out_features).t().to(torch.int16), 0
    stored = unpack_along_rows(qzeros.t(), bits, out_features).t()
    all_ones = int((stored == (1 << bits) - 1).sum())
    if 32 % bits == 0:
        # every field + 1, carried within each 32-bit word
        ones = sum(1 << (i * bits) for i in range(32 // bits))
        words = ((qzeros.to(torch.int64) & 0xFFFFFFFF) + ones) & 0xFFFFFFFF
        return unpack_along_rows(words.t(), bits, out_features).t().to(torch.int16), all_ones
    # 3-bit fields straddle words: + 1 per field, modulo 2^bits (GPTQModel's reading)
    return ((stored.to(torch.int16) + 1) & ((1 << bits) - 1)), all_ones


# ----------------------------------------------------------------------- files
def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        data = read_json_limited(index)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: weight_map must be a non-empty object")
        names = set()
        for tensor, name in weight_map.items():
            if not isinstance(name, str) or not name.endswith(".safetensors") or Path(name).name != name:
                raise ModelLoadError(f"{index}: weight_map['{tensor:.80}'] = {name!r:.80} is not a safetensors "
                                     "file name in this directory")
            names.add(name)
        files = [path / n for n in sorted(names)]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{index}: names {f.name}, which is missing")
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found   # AutoGPTQ's own name: gptq_model-4bit-128g.safetensors
    if found:
        raise ModelLoadError(f"{path}: {len(found)} safetensors files and no model.safetensors.index.json to say "
                             "which holds what")
    pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    if pickles:
        raise UnsafeCheckpointError(f"{path}: a GPTQ checkpoint with only pickle weights ({pickles[0]}); "
                                    "pickle can run code and is never read: convert it to safetensors")
    raise ModelLoadError(f"{path}: no safetensors weights found")


@dataclass
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]


def _headers(files: list[Path]) -> dict[str, _Entry]:
    """Every tensor's file, dtype and shape, from the headers only (``safe_open`` checks
    the header's size, offsets and coverage of the file; no tensor data is read)."""
    from safetensors import safe_open

    entries: dict[str, _Entry] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    if name in entries:
                        raise ModelLoadError(f"{f}: tensor {name} is also in {entries[name].file.name}")
                    entries[name] = _Entry(f, piece.get_dtype(), tuple(int(d) for d in piece.get_shape()))
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"{f}: not a readable safetensors file ({first_line(exc)})") from None
    return entries


# ----------------------------------------------------------------------- the plan
@dataclass
class _Layer:
    name: str
    in_features: int
    out_features: int
    bias: bool
    g_idx: bool
    bits: int
    group_size: int       # -1: one group per row


def _expect(entries: dict, name: str, dtypes: tuple[str, ...], shape: tuple[int, ...], field_name: str,
            file: Path):
    entry = entries.get(name)
    if entry is None:
        raise ModelLoadError(f"{file}: missing tensor {name} ({field_name})")
    if entry.dtype not in dtypes:
        raise ModelLoadError(f"{entry.file}: {name} is {entry.dtype}, expected {' or '.join(dtypes)}")
    if entry.shape != shape:
        raise ModelLoadError(f"{entry.file}: {name} has shape {list(entry.shape)}, expected {list(shape)} "
                             f"({field_name})")


def _layer_format(entries: dict, prefix: str, K: int, N: int, cfg: GPTQConfig) -> tuple[int, int]:
    """The (bits, group_size) of one layer: the config's, or with per-module overrides the
    one of the declared formats its qweight and scales shapes fit (shapes are then checked
    against it as for any layer)."""
    if len(cfg.formats) == 1:
        return cfg.formats[0]
    qweight, scales = entries.get(f"{prefix}.qweight"), entries.get(f"{prefix}.scales")
    for b, group_size in cfg.formats:
        groups = 1 if group_size == -1 else K // group_size
        if (qweight is not None and qweight.shape == (K * b // 32, N)
                and scales is not None and scales.shape == (groups, N)):
            return b, group_size
    return cfg.formats[0]   # none fits: the checks below name the tensor and the expected shape


def _plan_layers(model: nn.Module, entries: dict, cfg: GPTQConfig, where) -> list[_Layer]:
    """The quantised layers, every tensor's dtype and shape checked against the layer the
    config builds and the config's bits and group size."""
    from slimformer.nn.surgery import is_linear, linear_weight

    prefixes = {name.rsplit(".", 1)[0] for name in entries if name.rsplit(".", 1)[-1] in _QUANT_SUFFIXES}
    modules = dict(model.named_modules())
    layers = []
    for prefix in sorted(prefixes):
        entry = entries.get(f"{prefix}.qweight") or next(e for n, e in entries.items() if n.startswith(prefix + "."))
        module = modules.get(prefix)
        if module is None or not is_linear(module):
            raise ModelLoadError(f"{entry.file}: {prefix}.qweight names no linear layer of this "
                                 f"{model.config.model_type} model")
        out_features, in_features = linear_weight(module).shape
        b, group_size = _layer_format(entries, prefix, in_features, out_features, cfg)
        gs = in_features if group_size == -1 else group_size
        if in_features % gs:
            raise ModelLoadError(f"{where}: quantization_config.group_size {gs} does not divide the {in_features} "
                                 f"inputs of {prefix}")
        if (in_features * b) % 32 or (out_features * b) % 32:
            raise ModelLoadError(f"{entry.file}: {prefix} has {in_features} inputs and {out_features} outputs, "
                                 f"which {b}-bit codes do not fill whole int32 words")
        groups = in_features // gs
        _expect(entries, f"{prefix}.qweight", ("I32",), (in_features * b // 32, out_features), "qweight", entry.file)
        _expect(entries, f"{prefix}.qzeros", ("I32",), (groups, out_features * b // 32), "qzeros", entry.file)
        _expect(entries, f"{prefix}.scales", tuple(_FLOAT_DTYPES), (groups, out_features), "scales", entry.file)
        has_g_idx = f"{prefix}.g_idx" in entries
        if has_g_idx:
            _expect(entries, f"{prefix}.g_idx", ("I32", "I64"), (in_features,), "g_idx", entry.file)
        has_bias = f"{prefix}.bias" in entries
        if getattr(module, "bias", None) is not None and not has_bias:
            raise ModelLoadError(f"{entry.file}: missing tensor {prefix}.bias (config.json's model has a bias there)")
        if has_bias:
            _expect(entries, f"{prefix}.bias", tuple(_FLOAT_DTYPES), (out_features,), "bias", entry.file)
        layers.append(_Layer(prefix, in_features, out_features, has_bias, has_g_idx, b, group_size))
    if not layers:
        raise ModelLoadError(f"{where}: quant_method is gptq but no tensor is a qweight")
    head_quantised = any(layer.name == "lm_head" for layer in layers)
    if head_quantised != cfg.lm_head:
        raise ModelLoadError(f"{where}: quantization_config.lm_head is {str(cfg.lm_head).lower()} but the weights "
                             f"{'hold' if head_quantised else 'do not hold'} lm_head.qweight")
    return layers


def _check_dense(model: nn.Module, entries: dict, layers: list[_Layer]) -> list[str]:
    """The non-quantised tensors must be exactly the skeleton's other parameters and
    persistent buffers (tied ones may be stored once), with the same shapes."""
    quantised = {layer.name for layer in layers}
    expected = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        owner = name.rsplit(".", 1)[0]
        if owner in quantised:
            continue
        expected[name] = tuple(tensor.shape)
    persistent = set(model.state_dict().keys())
    dense = [n for n in entries if n.rsplit(".", 1)[0] not in quantised]
    for name in dense:
        entry = entries[name]
        if name not in expected:
            raise ModelLoadError(f"{entry.file}: unexpected tensor {name} (no such parameter in this "
                                 f"{model.config.model_type} model)")
        if entry.shape != expected[name]:
            raise ModelLoadError(f"{entry.file}: {name} has shape {list(entry.shape)}, config.json's model needs "
                                 f"{list(expected[name])}")
        if entry.dtype not in _FLOAT_DTYPES:
            raise ModelLoadError(f"{entry.file}: {name} is {entry.dtype}, expected a float tensor")
    tied = _tied_groups(model)
    for name in expected:
        if name in entries or name not in persistent:
            continue
        if any(other in entries for other in tied.get(name, ())):
            continue
        raise ModelLoadError(f"{_where(entries)}: missing tensor {name}")
    return dense


def _where(entries: dict) -> Path:
    """The weight file (or, for several, their directory) for messages about a missing tensor."""
    files = {e.file for e in entries.values()}
    return next(iter(files)) if len(files) == 1 else next(iter(files)).parent


def _tied_groups(model: nn.Module) -> dict[str, list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return {name: [n for n in names if n != name] for names in by_id.values() for name in names}


# ----------------------------------------------------------------------- building
class _Reader:
    """The tensors' data, each file opened once (its header was checked by :func:`_headers`)."""

    def __init__(self, entries: dict[str, _Entry]):
        self.entries, self.handles = entries, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles.values():
            handle.__exit__(None, None, None)
        self.handles.clear()

    def __call__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        entry = self.entries[name]
        try:
            handle = self.handles.get(entry.file)
            if handle is None:
                handle = self.handles[entry.file] = safe_open(str(entry.file), framework="pt").__enter__()
            return handle.get_tensor(name)
        except Exception as exc:
            raise ModelLoadError(f"{entry.file}: cannot read {name} ({first_line(exc)})") from None


def _as_fp16(tensor: torch.Tensor, entry: _Entry, name: str) -> torch.Tensor:
    if tensor.dtype != torch.float16:
        half = tensor.to(torch.float16)
        if not torch.equal(half.to(tensor.dtype), tensor):
            raise ModelLoadError(f"{entry.file}: {name} is {entry.dtype} with values float16 cannot hold exactly")
        tensor = half
    if not bool(torch.isfinite(tensor).all()):
        raise ModelLoadError(f"{entry.file}: {name} holds non-finite scales")
    return tensor


def build_layer(layer: _Layer, tensors: dict[str, torch.Tensor], cfg: GPTQConfig, dtype: torch.dtype,
                entries: dict, notes: list[str]) -> nn.Module:
    """One checkpoint layer as a QuantLinear (or an ActOrderLinear around one), exactly."""
    from slimformer.nn.act_order import ActOrderLinear
    from slimformer.nn.quant_linear import QuantLinear

    name, K, N, b = layer.name, layer.in_features, layer.out_features, layer.bits
    gs = K if layer.group_size == -1 else layer.group_size
    G = K // gs
    codes = read_codes(tensors["qweight"], b, K)                              # [N, K]
    zeros, all_ones = read_zeros(tensors["qzeros"], b, N, cfg.checkpoint_format == "gptq")   # [G, N]
    if all_ones:
        notes.append(f"{name}: {all_ones} v1 zero-point field(s) stored as all ones (a zero-point of 0), read with "
                     "GPTQModel's word-wise carry (AutoGPTQ's reader would read 2^bits)")
    scales = _as_fp16(tensors["scales"], entries[f"{name}.scales"], f"{name}.scales")   # [G, N]
    g_idx = tensors.get("g_idx")
    default = torch.arange(K, dtype=torch.int64) // gs
    if g_idx is None:
        g_idx = default
    g_idx = g_idx.to(torch.int64)
    file = entries[f"{name}.qweight"].file
    if bool((g_idx < 0).any()) or bool((g_idx >= G).any()):
        raise ModelLoadError(f"{file}: {name}.g_idx holds group indices outside 0..{G - 1}")
    perm = None
    if not torch.equal(g_idx, default):
        counts = torch.bincount(g_idx, minlength=G)
        if not bool((counts == gs).all()):
            g = int((counts != gs).nonzero()[0])
            raise ModelLoadError(f"{file}: {name}.g_idx puts {int(counts[g])} columns in group {g}; "
                                 f"group_size {gs} needs exactly {gs}")
        perm = torch.argsort(g_idx, stable=True)
        codes = codes[:, perm].contiguous()
    offset = 1 << (b - 1)
    symmetric = bool((zeros == offset).all())
    if cfg.sym and not symmetric:
        notes.append(f"{name}: quantization_config.sym is true but the layer stores zero-points other than "
                     f"{offset}: read as asymmetric")
    if bool((zeros < 0).any()) or bool((zeros > 255).any()):
        raise ModelLoadError(f"{file}: {name}.qzeros decodes to zero-points outside 0..255")
    spec = _spec(b, layer.group_size, symmetric)
    module = QuantLinear(K, N, spec, None, layer.bias, dtype)
    module.set_codes(codes)
    module.scale = scales.t().contiguous()
    if not symmetric:
        module.zero = zeros.t().to(torch.uint8).contiguous()
    if layer.bias:
        module.bias = tensors["bias"].to(dtype).contiguous()
    return module if perm is None else ActOrderLinear(module, perm)


def load_gptq(path, dtype: torch.dtype = torch.float32):
    """A GPTQ checkpoint directory -> ``(model, tokenizer)`` with every quantised layer a
    :class:`QuantLinear` (an :class:`ActOrderLinear` around one for act-order layers)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoTokenizer

    from slimformer.models.compressed import swapped_modules
    from slimformer.nn.surgery import set_module
    path = Path(path)
    where = path / "config.json"
    raw = read_json_limited(where)
    cfg = parse_quantization_config(raw.get("quantization_config"), where)
    files = _weight_files(path)
    entries = _headers(files)
    check_model_config(path, entries)   # sizes bounded by the weights, before anything is built
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{where}: cannot read the model config ({first_line(exc)})") from None
    check_config_types(where, config)
    quantization_config = getattr(config, "quantization_config", None)
    if hasattr(config, "quantization_config"):
        del config.quantization_config   # the model we build is ours, not transformers' GPTQ integration
    try:
        cls = model_class(config)
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(config, dtype=dtype)
        model.tie_weights()
    except ModelLoadError:
        raise
    except Exception as exc:
        if type(exc).__module__.startswith("slimformer"):
            raise
        raise ModelLoadError(f"{where}: cannot build the model ({first_line(exc)})") from None
    layers = _plan_layers(model, entries, cfg, where)
    dense = _check_dense(model, entries, layers)

    notes: list[str] = []
    if cfg.unknown:
        notes.append(f"quantization_config fields not read: {', '.join(cfg.unknown)}")
    head = next((layer for layer in layers if layer.name == "lm_head"), None)
    if head is not None and getattr(model.config, "tie_word_embeddings", False):
        # the head is quantised, the embedding is not: they can no longer be one tensor
        model.config.tie_word_embeddings = False
    with _Reader(entries) as read:
        for layer in layers:
            tensors = {s: read(f"{layer.name}.{s}") for s in (*_QUANT_SUFFIXES, "bias")
                       if f"{layer.name}.{s}" in entries}
            set_module(model, layer.name, build_layer(layer, tensors, cfg, dtype, entries, notes))
        tied = _tied_groups(model)
        state = {name: read(name).to(dtype) for name in dense}
    model.load_state_dict(state, strict=False, assign=True)
    for name, others in tied.items():
        if name in state:
            continue
        source = next((o for o in others if o in state), None)
        if source is not None:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, model.get_parameter(source))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelLoadError(f"{_where(entries)}: missing tensor {left[0]}")
    for note in notes:
        warnings.warn(f"slimformer: GPTQ import of {path}: {note}", RuntimeWarning, stacklevel=2)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot load the tokenizer ({first_line(exc)})") from None
    qc = quantization_config.to_dict() if hasattr(quantization_config, "to_dict") else raw.get("quantization_config")
    model.slimformer_meta = {
        "source": str(path),
        "imported_from": "gptq",
        "recipe": None,
        "quantization_config": qc,
        "gptq": asdict(cfg),
        "weight_files": [f.name for f in files],
        "modules": swapped_modules(model),
        "act_order_layers": sum(1 for m in model.modules() if type(m).__name__ == "ActOrderLinear"),
        "notes": notes,
    }
    return model, tokenizer
