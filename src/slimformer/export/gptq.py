"""The ``gptq`` exporter: a GPTQ checkpoint directory (the AutoGPTQ / GPTQModel layout that
transformers, vLLM and ``slimformer.load`` read), written from our codes without
requantising.

Each :class:`QuantLinear` of 2, 3, 4 or 8 bits in groups (or one group per row) becomes
``qweight``/``qzeros``/``scales``/``g_idx`` (``slimformer.models.gptq`` describes the
layout; ``checkpoint_format`` "gptq", v1: zero-points stored minus one). An
:class:`ActOrderLinear` becomes an act-order layer (``desc_act``: its permutation is the
``g_idx``). Everything else is stored in the model's dtype. GPTQ has one format per
model: layers of other bit widths or group sizes, activation quantisation, and other
module types are refused naming the first such layer.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from slimformer.errors import ExportError
from slimformer.export import register_exporter
from slimformer.models.gptq import SUPPORTED_BITS, pack_along_rows, write_zeros
from slimformer.nn.act_order import ActOrderLinear
from slimformer.nn.base import CompressedModule
from slimformer.nn.quant_embedding import QuantEmbedding, QuantTiedHead
from slimformer.nn.quant_linear import QuantLinear
from slimformer.util.atomic import atomic_directory


def _layer_format(name: str, module: QuantLinear) -> tuple[int, int]:
    """(bits, group_size or -1) of a layer GPTQ can hold, else the one-line refusal."""
    spec = module.weight_spec
    if module.act_spec is not None:
        raise ExportError(f"layer {name}: GPTQ checkpoints hold weight-only layers; this one quantises its input "
                          f"({module.act_spec})")
    if spec.bits not in SUPPORTED_BITS:
        raise ExportError(f"layer {name}: {spec.bits}-bit codes; GPTQ checkpoints hold {SUPPORTED_BITS} bits")
    if spec.granularity == "tensor":
        raise ExportError(f"layer {name}: one scale per tensor; GPTQ needs groups or one scale per row")
    K, N = module.in_features, module.out_features
    if (K * spec.bits) % 32 or (N * spec.bits) % 32:
        raise ExportError(f"layer {name}: {K} inputs / {N} outputs of {spec.bits} bits do not fill int32 words")
    return spec.bits, spec.group_size if spec.granularity == "group" else -1


def gptq_tensors(name: str, module: nn.Module, v1: bool = True) -> tuple[dict[str, torch.Tensor], int, int, bool]:
    """The GPTQ tensors of one layer and its (bits, group_size, symmetric)."""
    perm = None
    if isinstance(module, ActOrderLinear):
        if not isinstance(module.inner, QuantLinear):
            raise ExportError(f"layer {name}: act-order around a {type(module.inner).__name__}, not a QuantLinear")
        perm, module = module.input_perm, module.inner
    bits, group_size = _layer_format(name, module)
    K, N = module.in_features, module.out_features
    gs = K if group_size == -1 else group_size
    codes = module.codes()                                      # [N, K], in the module's column order
    g_idx = torch.arange(K, dtype=torch.int32) // gs
    if perm is not None:
        # the inner layer's column i is input column perm[i]; its group is i // gs
        original = torch.empty_like(codes)
        original[:, perm] = codes
        codes = original
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[perm] = torch.arange(K, dtype=torch.int32) // gs
    G = K // gs
    symmetric = module.weight_spec.symmetric
    zeros = (torch.full((G, N), 1 << (bits - 1), dtype=torch.int64) if symmetric
             else module.zero.t().to(torch.int64))
    tensors = {
        "qweight": pack_along_rows(codes.t(), bits).contiguous(),
        "qzeros": write_zeros(zeros, bits, v1),
        "scales": module.scale.to(torch.float16).reshape(-1, G).expand(N, G).t().contiguous(),
        "g_idx": g_idx,
    }
    if module.bias is not None:
        tensors["bias"] = module.bias.detach().contiguous()
    return tensors, bits, group_size, symmetric


@register_exporter("gptq", "a GPTQ checkpoint (AutoGPTQ/GPTQModel layout, checkpoint_format gptq): "
                           "transformers (optimum or gptqmodel), vLLM, slimformer.load")
def write_gptq(model, tokenizer, out: Path, *, overwrite: bool = False) -> Path:
    from slimformer._version import __version__

    quantised: dict[str, nn.Module] = {}
    table: tuple[str, QuantEmbedding] | None = None
    for name, module in model.named_modules():
        if any(name.startswith(done + ".") for done in quantised):
            continue
        if isinstance(module, (QuantLinear, ActOrderLinear)):
            quantised[name] = module
        elif isinstance(module, QuantEmbedding):
            table = (name, module)
        elif isinstance(module, QuantTiedHead):
            continue   # reads the table's codes; GPTQ checkpoints tie by config (stored once)
        elif isinstance(module, CompressedModule):
            raise ExportError(f"layer {name}: a {type(module).__name__}, which a GPTQ checkpoint cannot hold "
                              "(only QuantLinear weights of 2/3/4/8 bits)")
    if not quantised:
        raise ExportError("the model has no quantised layer: nothing to write as GPTQ (export it with --format hf)")
    tensors: dict[str, torch.Tensor] = {}
    first = None
    desc_act = False
    all_symmetric = True
    for name, module in quantised.items():
        layer, bits, group_size, symmetric = gptq_tensors(name, module)
        if first is None:
            first = (name, bits, group_size)
        elif (bits, group_size) != first[1:]:
            raise ExportError(f"layer {name}: w{bits} group {group_size}, but {first[0]} is w{first[1]} group "
                              f"{first[2]}; a GPTQ checkpoint has one format")
        desc_act |= isinstance(module, ActOrderLinear)
        all_symmetric &= symmetric
        tensors.update({f"{name}.{key}": value for key, value in layer.items()})
    seen: set[tuple[int, int]] = set()
    dense_table = None
    if table is not None:
        dense_table = table[0]
        tensors[f"{table[0]}.weight"] = table[1].dequantized_weight().detach().contiguous()
        warnings.warn(f"gptq export: {table[0]} (int8 embedding table) written dequantised: a GPTQ checkpoint "
                      "quantises Linear layers only", RuntimeWarning, stacklevel=2)
    for key, value in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in quantised or any(owner.startswith(q + ".") for q in quantised) or owner == dense_table:
            continue
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        if ident in seen:   # tied (embedding / head): stored once, as transformers does
            continue
        seen.add(ident)
        tensors[key] = value.detach().contiguous()
    bits, group_size = first[1], first[2]
    meta = getattr(model, "slimformer_meta", None) or {}
    qc = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": all_symmetric,
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "lm_head": "lm_head" in quantised,
        "true_sequential": True,
        "static_groups": False,
        "meta": {"quantizer": [f"slimformer:{__version__}"], "source": meta.get("source"),
                 "written_dense": [] if dense_table is None else [dense_table]},
    }
    with atomic_directory(out, overwrite) as tmp:
        model.config.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config["quantization_config"] = qc
        if "lm_head" in quantised:
            config["tie_word_embeddings"] = False
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "quantize_config.json").write_text(json.dumps(qc, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return out
