"""``--format compressed-tensors``: the checkpoint format vLLM and transformers (with the
``compressed-tensors`` package) load, written without that package.

Each :class:`~slimformer.nn.quant_linear.QuantLinear` is written with its own codes,
scales and zero-points, nothing requantised (``formats/compressed_tensors.py`` says how
our unsigned codes and uint8 zero-points map onto the format's signed values, exactly):

- weight-only, 2-8 bits, per group / per channel (symmetric or asymmetric) or per tensor
  (symmetric): ``pack-quantized`` (``weight_packed`` int32, ``weight_scale``,
  ``weight_zero_point`` packed int32 when asymmetric, ``weight_shape``);
- dynamic symmetric int8 per-token input activations (W8A8, SmoothQuant, ZeroQuant):
  ``int-quantized`` for 8-bit weights (``weight`` int8), ``pack-quantized`` for fewer bits,
  with ``input_activations`` in the scheme.

Layers that are not quantised stay float and are listed in ``ignore``; SmoothQuant's
scales folded into norms are ordinary weights, and an ``InputScaledLinear`` around a float
layer is written as that layer with the scale folded into its columns (exact). Refused,
one line naming the first module: static or non-int8 activation quantisation, a
per-tensor asymmetric weight, an input scale in front of a quantised layer, LLM.int8 /
PEG / hidden-state quantisation, and a quantised layer that is not an ``nn.Linear`` in
transformers' model (GPT-2's ``Conv1D``). Other weight-only modules (sparse, GOBO, the int8
embedding table of ``QuantizeEmbeddings`` and its tied head) are written as their dense
weights with a warning and recorded.

The scales are stored in the model's float dtype when it holds our float16 scales
exactly (float32, float16), else float32. What the export came from is recorded in
``slimformer_export.json``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from slimformer.errors import ExportError
from slimformer.export import register_exporter
from slimformer.export.hf import (
    PROVENANCE_FILE,
    WEIGHTS_FILE,
    compressed_roots,
    dense_weight,
    export_config,
    original_module,
    provenance,
    save_tensors,
    skeleton,
    tied_head,
    write_side_files,
)
from slimformer.formats import compressed_tensors as ct
from slimformer.nn.base import CompressedLinear
from slimformer.nn.input_scaled import InputScaledLinear
from slimformer.nn.quant_embedding import QuantEmbedding
from slimformer.nn.quant_linear import QuantLinear
from slimformer.util.atomic import atomic_directory


def scheme_of(name: str, module: QuantLinear) -> ct.Scheme:
    """The format's scheme for ``module``, or ExportError saying why it has none."""
    spec, act = module.weight_spec, module.act_spec
    if spec.granularity == "tensor" and not spec.symmetric:
        raise ExportError(f"{name}: per-tensor asymmetric weights ({spec.describe()}) are not written to "
                          "compressed-tensors (group or channel scales, or symmetric, are)")
    acts = None
    if act is not None:
        if not (act.dynamic and act.bits == 8 and act.symmetric and act.granularity == "token"):
            kind = "static" if not act.dynamic else f"a{act.bits}-{act.granularity}"
            raise ExportError(f"{name}: {kind} activation quantisation is not written to compressed-tensors "
                              "(only dynamic symmetric int8 per token)")
        acts = ct.Args(8, True, "token", None, True)
    group = spec.group_size if spec.granularity == "group" else None
    weights = ct.Args(spec.bits, spec.symmetric, spec.granularity, group, False)
    fmt = ct.INT_QUANTIZED if act is not None and spec.bits == 8 else ct.PACK_QUANTIZED
    return ct.Scheme(weights, acts, fmt)


def quantized_tensors(module: QuantLinear, scheme: ct.Scheme, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The module's tensors under the format's names (exact: see formats/compressed_tensors)."""
    spec = module.weight_spec
    N, K = module.out_features, module.in_features
    offset = 1 << (spec.bits - 1)
    codes = module.codes()
    scale = module.scale.to(scale_dtype)
    scale = scale.reshape(1) if spec.granularity == "tensor" else scale.reshape(N, -1)
    out: dict[str, torch.Tensor] = {"weight_scale": scale.contiguous()}
    if scheme.format == ct.PACK_QUANTIZED:
        out["weight_packed"] = ct.pack_int32(codes, spec.bits)   # the stored value u = q + 2^(b-1) is our code
        out["weight_shape"] = torch.tensor([N, K], dtype=torch.int64)
        if not spec.symmetric:
            out["weight_zero_point"] = ct.pack_columns(module.zero.reshape(N, -1), spec.bits)
    else:
        out["weight"] = (codes.to(torch.int16) - offset).to(torch.int8).contiguous()
        if not spec.symmetric:
            out["weight_zero_point"] = (module.zero.to(torch.int16) - offset).to(torch.int8).reshape(N, -1).contiguous()
    if module.bias is not None:
        out["bias"] = module.bias.detach().contiguous()
    return out


@register_exporter("compressed-tensors",
                   "compressed-tensors checkpoint (pack-quantized W4A16, int-quantized W8A8): loaded by vLLM, "
                   "and by transformers with the compressed-tensors package")
def write_compressed_tensors(model, tokenizer, out: Path, *, overwrite: bool = False) -> Path:
    skel = skeleton(model)
    roots = compressed_roots(model)
    params = [p for p in model.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else torch.float32
    scale_dtype = dtype if dtype in (torch.float32, torch.float16) else torch.float32

    state = dict(model.state_dict())
    groups: dict[ct.Scheme, list[str]] = {}
    dense: dict[str, str] = {}     # written as float weights: why
    quantized: set[str] = set()
    for name, module in roots:
        original = original_module(skel, name)
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        if isinstance(module, QuantLinear):
            scheme = scheme_of(name, module)
            if not isinstance(original, nn.Linear):
                kind = "no module" if original is None else f"a {type(original).__name__}"
                raise ExportError(f"{name}: transformers' model has {kind} there; compressed-tensors quantises "
                                  "nn.Linear layers only")
            for key, tensor in quantized_tensors(module, scheme, scale_dtype).items():
                state[f"{name}.{key}"] = tensor
            groups.setdefault(scheme, []).append(name)
            quantized.add(name)
            continue
        if isinstance(module, InputScaledLinear):
            if isinstance(module.inner, CompressedLinear):
                raise ExportError(f"{name}: an input scale in front of a {type(module.inner).__name__}: "
                                  "compressed-tensors cannot scale the input of a quantised layer (SmoothQuant "
                                  "with fold: norm exports)")
            why = None   # the scale folded into a float weight: exact
        elif isinstance(module, QuantEmbedding):
            why = ("int8 embedding table: compressed-tensors quantises Linear layers, so the table (and a tied "
                   "LM head) is written dequantised")
        elif isinstance(module, CompressedLinear) and module.dense_equivalent:
            why = (f"{type(module).__name__} has no compressed-tensors form: written as its dense weight "
                   "(same output, no compression)")
        else:
            reason = getattr(module, "not_native", None) or "it quantises or decomposes its input"
            raise ExportError(f"{name}: a {type(module).__name__} cannot be written to compressed-tensors ({reason})")
        for key, tensor in dense_weight(name, module, original).items():
            state[f"{name}.{key}"] = tensor.to(dtype)
        if why:
            dense[name] = why
    if not quantized:
        raise ExportError("compressed-tensors export: the model has no quantised layer (use --format hf for a "
                          "float model)")

    tied_name = tied_head(model)
    if tied_name is not None:
        state.pop(tied_name, None)
    # the float part must be exactly what transformers' model loads
    plain = {k: v for k, v in state.items() if k.rpartition(".")[0] not in quantized}
    expected = {k for k in skel.state_dict() if k.rpartition(".")[0] not in quantized and k != tied_name}
    unexpected, missing = sorted(set(plain) - expected), sorted(expected - set(plain))
    if unexpected or missing:
        what = f"{unexpected[0]} is not a tensor of" if unexpected else f"{missing[0]} is missing for"
        raise ExportError(f"compressed-tensors export: {what} transformers' {type(skel).__name__}")

    linears = [n for n, m in skel.named_modules() if isinstance(m, nn.Linear)]
    ignore = [n for n in linears if n not in quantized]
    schemes = list(groups.items())
    if len(schemes) == 1:
        config_groups = [(schemes[0][0], ["Linear"])]
    else:   # mixed formats (HAWQ): each group names its layers
        config_groups = [(scheme, names) for scheme, names in schemes]
    config = export_config(model, dtype, tied=tied_name is not None)
    config["quantization_config"] = ct.build_config(config_groups, ignore)
    if dense:
        first = next(iter(dense.items()))
        warnings.warn(f"compressed-tensors export: {len(dense)} compressed module(s) written as dense float weights, "
                      f"first {first[0]}: {first[1]} (listed in {PROVENANCE_FILE})", RuntimeWarning, stacklevel=2)
    record = provenance(model, "compressed-tensors",
                        modules={name: {"format": s.format, "weights": s.weights.to_json(),
                                        "input_activations": None if s.input_activations is None
                                        else s.input_activations.to_json()}
                                 for s, names in schemes for name in names},
                        written_dense=dense)
    with atomic_directory(out, overwrite) as tmp:
        save_tensors(state, tmp / WEIGHTS_FILE)
        write_side_files(tmp, model, tokenizer, config, record)
    return out
