"""Reading compressed-tensors checkpoints (vLLM's format; ours from ``--format
compressed-tensors`` or anyone's) into slimformer's module types, exactly.

``pack-quantized``, ``int-quantized`` and ``naive-quantized`` integer weights (2-8 bits,
per group, channel or tensor, symmetric or asymmetric) become
:class:`~slimformer.nn.quant_linear.QuantLinear` layers holding the same integers: our code
is the format's stored unsigned value ``q + 2^(b-1)``, our uint8 zero-point ``zp +
2^(b-1)`` (``formats/compressed_tensors.py``); scales are kept in float16 when every value
is a float16 exactly, else in float32 (never rounded). Dynamic symmetric int8 per-token
input activations become our ``ActSpec(8, token, dynamic)``; like vLLM's int8 kernels, our
runtime divides a token's absolute maximum by 127 (the package's Python reference divides
by 127.5, so its fake-quantised logits differ from vLLM's and ours in the last bits).
Anything else (float/FP8/FP4 formats, static activation scales, KV-cache schemes,
sparsity or transforms, block strategies) is refused in one line naming the field.

Every config field, tensor name, dtype and shape is checked against the model config
before a tensor is read (one line naming the file and the field); nothing is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from slimformer.errors import ModelLoadError
from slimformer.formats import compressed_tensors as ct
from slimformer.formats.spec import ActSpec, WeightSpec
from slimformer.models.hf import first_line, model_class, read_json_limited, retie, tied_groups
from slimformer.models.validate import check_config_types, check_model_config
from slimformer.nn.quant_linear import QuantLinear
from slimformer.nn.surgery import set_module

_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MAX_TARGET_CHARS = 1000
_FIELDS = {
    ct.PACK_QUANTIZED: {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "bias"},
    ct.INT_QUANTIZED: {"weight", "weight_scale", "weight_zero_point", "bias"},
    ct.NAIVE_QUANTIZED: {"weight", "weight_scale", "weight_zero_point", "bias"},
}


@dataclass(frozen=True)
class _Shape:
    shape: tuple[int, ...]


class _Tensors:
    """The checkpoint's safetensors files (one, or shards named by an index): names,
    dtypes and shapes from the headers; a tensor is read only when asked for."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        single, index = path / "model.safetensors", path / "model.safetensors.index.json"
        if single.is_file():
            files = {single}
            where: dict[str, Path] = {}
        elif index.is_file():
            data = read_json_limited(index)
            weight_map = data.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ModelLoadError(f"{index}: weight_map is missing or not an object of file names")
            files = set()
            for shard in set(weight_map.values()):
                if Path(shard).name != shard:
                    raise ModelLoadError(f"{index}: weight_map names {shard!r}, not a file of the directory")
                files.add(path / shard)
            where = {}
        else:
            raise ModelLoadError(f"{path}: no model.safetensors (nor model.safetensors.index.json)")
        self.handles, self.info = {}, {}
        for file in sorted(files):
            try:
                handle = safe_open(str(file), "pt")
                for name in handle.keys():
                    view = handle.get_slice(name)
                    if name in self.info:
                        raise ModelLoadError(f"{file}: tensor {name} is also in {where[name]}")
                    self.info[name] = (view.get_dtype(), tuple(view.get_shape()))
                    where[name] = file
            except ModelLoadError:
                raise
            except Exception as exc:   # truncated file, bad header
                raise ModelLoadError(f"{file}: not a readable safetensors file ({first_line(exc)})") from None
            self.handles[file] = handle
        self.where = where

    def check(self, name: str, dtypes: tuple[str, ...], shape: tuple[int, ...] | None) -> None:
        if name not in self.info:
            raise ModelLoadError(f"{self.file(name)}: tensor {name} is missing")
        dtype, got = self.info[name]
        if dtype not in dtypes:
            raise ModelLoadError(f"{self.file(name)}: tensor {name} is {dtype}, expected {' or '.join(dtypes)}")
        if shape is not None and got != shape:
            raise ModelLoadError(f"{self.file(name)}: tensor {name} has shape {list(got)}, expected {list(shape)}")

    def file(self, name: str) -> Path:
        return self.where.get(name) or next(iter(self.handles))

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.handles[self.where[name]].get_tensor(name)
        except Exception as exc:
            raise ModelLoadError(f"{self.where[name]}: cannot read tensor {name} ({first_line(exc)})") from None


def _matches(name: str, module: nn.Module, target: str, where: str) -> bool:
    if target.startswith("re:"):
        pattern = target[3:]
        if len(pattern) > MAX_TARGET_CHARS:
            raise ModelLoadError(f"{where}: a regular expression of {len(pattern)} characters")
        try:
            return re.match(pattern, name) is not None
        except re.error as exc:
            raise ModelLoadError(f"{where}: {target!r} is not a regular expression ({exc})") from None
    return name == target or any(cls.__name__ == target for cls in type(module).__mro__)


def _check_layer(name: str, module: nn.Linear, scheme: ct.Scheme, tensors: _Tensors) -> tuple[WeightSpec, int]:
    """Every tensor of one quantised layer: present, of the right dtype and shape (only the
    two-element ``weight_shape`` is read). Returns the layer's format and its group count."""
    w = scheme.weights
    N, K = module.out_features, module.in_features
    if w.strategy == "group":
        if K % w.group_size:
            raise ModelLoadError(f"{tensors.file(name + '.weight_scale')}: {name} has {K} inputs, not a multiple of "
                                 f"its group_size {w.group_size}")
        spec = WeightSpec(w.num_bits, w.symmetric, "group", w.group_size)
        scale_shape = (N, K // w.group_size)
    elif w.strategy == "channel":
        spec, scale_shape = WeightSpec(w.num_bits, w.symmetric, "channel"), (N, 1)
    else:
        spec, scale_shape = WeightSpec(w.num_bits, w.symmetric, "tensor"), (1,)
    groups = scale_shape[1] if len(scale_shape) == 2 else 1
    tensors.check(f"{name}.weight_scale", tuple(_FLOATS), scale_shape)
    if scheme.format == ct.PACK_QUANTIZED:
        tensors.check(f"{name}.weight_packed", ("I32",), (N, ct.packed_words(K, w.num_bits)))
        tensors.check(f"{name}.weight_shape", ("I64", "I32"), (2,))
        stored = tensors.get(f"{name}.weight_shape").tolist()
        if stored != [N, K]:
            raise ModelLoadError(f"{tensors.file(name + '.weight_shape')}: {name}.weight_shape is {stored}, the "
                                 f"model's layer is [{N}, {K}]")
        if not w.symmetric:
            tensors.check(f"{name}.weight_zero_point", ("I32",), (ct.packed_words(N, w.num_bits), groups))
    else:
        tensors.check(f"{name}.weight", ("I8",), (N, K))
        if not w.symmetric:
            tensors.check(f"{name}.weight_zero_point", ("I8",), (N, groups) if len(scale_shape) == 2 else (1,))
    if module.bias is not None:
        tensors.check(f"{name}.bias", tuple(_FLOATS), (N,))
    return spec, groups


def _read_layer(name: str, module: nn.Linear, scheme: ct.Scheme, spec: WeightSpec, groups: int, tensors: _Tensors,
                dtype: torch.dtype) -> QuantLinear:
    """One checked layer read into a QuantLinear holding the same integers."""
    N, K = module.out_features, module.in_features
    bits, offset = spec.bits, 1 << (spec.bits - 1)
    if scheme.format == ct.PACK_QUANTIZED:
        codes = ct.unpack_int32(tensors.get(f"{name}.weight_packed"), bits, K)
        zero = None if spec.symmetric else ct.unpack_columns(tensors.get(f"{name}.weight_zero_point"), bits, N)
    else:
        q = tensors.get(f"{name}.weight").to(torch.int16)
        zp = None if spec.symmetric else tensors.get(f"{name}.weight_zero_point").to(torch.int16).reshape(-1, groups)
        for label, values in (("weight", q), ("weight_zero_point", zp)):
            if values is not None and values.numel() and (values.min() < -offset or values.max() >= offset):
                raise ModelLoadError(f"{tensors.file(name + '.' + label)}: {name}.{label} holds values outside the "
                                     f"{bits}-bit range")
        codes = (q + offset).to(torch.uint8)
        zero = None if zp is None else (zp + offset).to(torch.uint8)
    scale = tensors.get(f"{name}.weight_scale").float().reshape(-1, groups)
    if not torch.isfinite(scale).all():
        raise ModelLoadError(f"{tensors.file(name + '.weight_scale')}: {name}.weight_scale is not finite")
    act = None if scheme.input_activations is None else ActSpec(8, True, "token", True)
    bias = module.bias is not None
    layer = QuantLinear(K, N, spec, act, bias, dtype)
    layer.set_codes(codes)
    exact_half = torch.equal(scale.half().float(), scale) and torch.isfinite(scale.half()).all()
    layer.scale = (scale.half() if exact_half else scale).contiguous()   # never rounded
    if zero is not None:
        layer.zero = zero.reshape(-1, groups).contiguous()
    if bias:
        layer.bias = tensors.get(f"{name}.bias").to(dtype)
    return layer


def load_compressed_tensors(path: Path, dtype: torch.dtype = torch.float32):
    """A compressed-tensors checkpoint directory → ``(model, tokenizer)`` with QuantLinear layers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    config_path = path / "config.json"
    raw = read_json_limited(config_path)
    try:
        groups, ignore = ct.parse_config(raw.get("quantization_config"))
    except ct.FormatError as exc:
        raise ModelLoadError(f"{config_path}: {exc}") from None
    tensors = _Tensors(path)   # headers only: names, dtypes, shapes
    # sizes bounded by the weights, before anything is built
    check_model_config(path, {name: _Shape(shape) for name, (_dtype, shape) in tensors.info.items()})
    try:
        config = AutoConfig.from_pretrained(str(path))
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        check_config_types(config_path, config)
        with init_empty_weights(include_buffers=False):
            model = model_class(config).from_config(config, dtype=dtype)
        model.tie_weights()
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot rebuild model from {path}: {first_line(exc)}") from None

    # which layer takes which scheme: the format's matching (class name, exact name or re:)
    plan: dict[str, ct.Scheme] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if any(_matches(name, module, t, f"{config_path}: quantization_config.ignore") for t in ignore):
            continue
        for index, (scheme, targets) in enumerate(groups):
            where = f"{config_path}: quantization_config.config_groups (group {index + 1}).targets"
            if any(_matches(name, module, t, where) for t in targets):
                plan[name] = scheme
                break
    if not plan:
        raise ModelLoadError(f"{config_path}: quantization_config targets no linear layer of the model")

    # everything checked before any tensor is read
    checked = {name: _check_layer(name, model.get_submodule(name), scheme, tensors) for name, scheme in plan.items()}
    # the float rest: exactly the tensors transformers' model holds outside the quantised layers
    tied = tied_groups(model)
    quant_keys = {k for k in tensors.info if k.rpartition(".")[0] in plan}
    for key in sorted(quant_keys):
        owner, _, field = key.rpartition(".")
        if field not in _FIELDS[plan[owner].format]:
            raise ModelLoadError(f"{tensors.file(key)}: tensor {key} is not part of a {plan[owner].format} layer")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.rpartition(".")[0] not in plan}
    for key in sorted(set(tensors.info) - quant_keys):
        if key not in shapes:
            raise ModelLoadError(f"{tensors.file(key)}: tensor {key} is not a tensor of the model")
        shape = shapes[key]
        tensors.check(key, tuple(_FLOATS), shape)
    for names in tied:
        if names[0].rpartition(".")[0] not in plan and not any(n in tensors.info for n in names):
            raise ModelLoadError(f"{next(iter(tensors.handles))}: tensor {names[0]} is missing")
    float_state = {key: tensors.get(key).to(dtype) for key in sorted(set(tensors.info) - quant_keys)}
    layers = {name: _read_layer(name, model.get_submodule(name), plan[name], *checked[name], tensors, dtype)
              for name in plan}
    for name, layer in layers.items():
        set_module(model, name, layer)
    try:
        model.load_state_dict(float_state, strict=False, assign=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load weights from {path}: {first_line(exc)}") from None
    retie(model, tied, float_state)
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ModelLoadError(f"{tensors.file(missing[0])}: tensor {missing[0]} is missing")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {path}: {first_line(exc)}") from None
    model.slimformer_meta = {
        "source": str(path),
        "recipe": None,
        "imported_from": "compressed-tensors",   # its own files count as its stored size
        "imported": {"format": "compressed-tensors", "version": raw["quantization_config"].get("version")},
        "modules": {name: layer.config() for name, layer in layers.items()},
    }
    return model, tokenizer


__all__ = ["load_compressed_tensors"]
