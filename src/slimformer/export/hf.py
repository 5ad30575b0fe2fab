"""``--format hf``: a plain transformers checkpoint of the dequantised (or pruned) model.

Every compressed module becomes what transformers' own model has at that path (an
``nn.Linear``, GPT-2's ``Conv1D``) holding its dequantised weight; ``outtype`` casts the
float tensors (float32, float16, bfloat16; default: the model's dtype). The directory
(``config.json`` without any ``quantization_config``, ``model.safetensors``,
``generation_config.json``, tokenizer files) loads with ``AutoModelForCausalLM`` (decoders)
or ``AutoModel`` (encoders) and nothing of slimformer; what it came from is recorded
beside it in ``slimformer_export.json``, which transformers ignores. Tied embeddings stay
tied (the LM head is not stored twice).

Modules whose dequantised weight alone does not compute the layer (activation
quantisation, LLM.int8's outlier decomposition, hidden-state fake quantisation) are
written as their dense weights — the behaviour of a dense model, not of the compressed
one — with a warning, and listed under ``changed`` in ``slimformer_export.json``.

The pieces both this exporter and ``export/compressed_tensors.py`` use live here:
:func:`compressed_roots`, :func:`skeleton`, :func:`dense_weight`, :func:`export_config`,
:func:`write_side_files`.
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
from slimformer.models.compressed import library_versions
from slimformer.models.hf import first_line, model_class
from slimformer.nn.base import CompressedLinear, CompressedModule
from slimformer.util.atomic import atomic_directory

PROVENANCE_FILE = "slimformer_export.json"
WEIGHTS_FILE = "model.safetensors"
OUTTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------ shared pieces
def compressed_roots(model: nn.Module) -> list[tuple[str, CompressedModule]]:
    """The outermost compressed modules (an InputScaledLinear, not the layer inside it)."""
    roots: list[tuple[str, CompressedModule]] = []
    for name, module in model.named_modules():
        if isinstance(module, CompressedModule) and not any(name.startswith(r + ".") for r, _ in roots):
            roots.append((name, module))
    return roots


def _plain_config(model):
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config   # an imported GPTQ / compressed-tensors model
    return config


def skeleton(model: nn.Module) -> nn.Module:
    """transformers' own model for ``model``'s config, on the meta device (no memory): the
    module each path had before slimformer replaced it, and the tensor names it loads."""
    from accelerate import init_empty_weights

    config = _plain_config(model)
    try:
        with init_empty_weights():
            return model_class(config).from_config(config)
    except Exception as exc:
        raise ExportError(f"cannot rebuild transformers' model for {type(model).__name__}: {first_line(exc)}") \
            from None


def original_module(skel: nn.Module, name: str) -> nn.Module | None:
    try:
        return skel.get_submodule(name)
    except AttributeError:
        return None


def dense_weight(name: str, module: CompressedModule, original: nn.Module | None) -> dict[str, torch.Tensor]:
    """The tensors transformers' module at ``name`` holds for ``module`` dequantised
    (``weight`` in its own layout, ``bias``); ExportError when there is no such module."""
    if isinstance(original, nn.Embedding) and hasattr(module, "dequantized_weight"):   # QuantEmbedding
        return {"weight": module.dequantized_weight().detach().contiguous()}
    if not isinstance(module, CompressedLinear) or original is None:
        raise ExportError(f"{name}: a {type(module).__name__} is not a layer of transformers' model, so no plain "
                          "checkpoint holds it")
    kind = type(original).__name__
    weight = module.dequantized_weight().detach()
    if kind == "Conv1D":
        weight = weight.t()
    elif not isinstance(original, nn.Linear):
        raise ExportError(f"{name}: a {type(module).__name__} replaced a {kind}, which this exporter does not write")
    out = {"weight": weight.contiguous()}
    bias = getattr(module, "bias", None)
    if bias is not None:
        out["bias"] = bias.detach().contiguous()
    return out


def tied_head(model: nn.Module) -> str | None:
    """The LM head's weight name when it is the input embedding's tensor (tied), or reads
    the quantised embedding's codes (``QuantTiedHead``), else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or embed is None:
        return None
    head_weight = getattr(head, "weight", None)
    shares_tensor = head_weight is not None and head_weight is getattr(embed, "weight", None)
    if not shares_tensor and getattr(head, "embedding", None) is not embed:
        return None
    for name, module in model.named_modules():
        if module is head:
            return f"{name}.weight"
    return None


def export_config(model: nn.Module, dtype: torch.dtype, tied: bool) -> dict:
    """``config.json`` of the written model: transformers' config, no quantization_config,
    the architecture named, the stored dtype, ``tie_word_embeddings`` as written."""
    config = _plain_config(model)
    data = config.to_dict()
    data["architectures"] = [type(model).__name__]
    name = str(dtype).removeprefix("torch.")
    data["dtype"] = name
    if "torch_dtype" in data:
        data["torch_dtype"] = name
    if "tie_word_embeddings" in data or not tied:
        data["tie_word_embeddings"] = tied
    return data


def write_side_files(tmp: Path, model: nn.Module, tokenizer, config: dict, provenance: dict) -> None:
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")


def provenance(model: nn.Module, fmt: str, **extra) -> dict:
    meta = getattr(model, "slimformer_meta", None) or {}
    return {"format": fmt, "source": meta.get("source"), "recipe": meta.get("recipe"),
            "versions": library_versions(), **extra}


def check_against_skeleton(state: dict, skel: nn.Module, tied_name: str | None, label: str) -> None:
    """Every tensor transformers' model loads is written, and nothing else (one line)."""
    expected = set(skel.state_dict().keys())
    if tied_name is not None:
        expected.discard(tied_name)
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ExportError(f"{label}: {unexpected[0]} is not a tensor of transformers' {type(skel).__name__}")
    missing = sorted(expected - set(state))
    if missing:
        raise ExportError(f"{label}: transformers' {type(skel).__name__} needs {missing[0]}, which the model lacks")


def save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses tensors sharing memory: each is written from its own copy
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path), metadata={"format": "pt"})


# ------------------------------------------------------------------ the exporter
@register_exporter("hf", "plain Hugging Face checkpoint (dequantised, safetensors): loaded by transformers alone",
                   options=("outtype",))
def write_hf(model, tokenizer, out: Path, *, overwrite: bool = False, outtype: str | None = None) -> Path:
    if outtype is not None and outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype!r} is not a type of the hf format (choose {', '.join(OUTTYPES)})")
    params = [p for p in model.parameters() if p.is_floating_point()]
    dtype = OUTTYPES[outtype] if outtype else (params[0].dtype if params else torch.float32)
    skel = skeleton(model)
    roots = compressed_roots(model)
    state = dict(model.state_dict())
    changed: dict[str, str] = {}
    for name, module in roots:
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        original = original_module(skel, name)
        if isinstance(module, CompressedLinear) and not module.dense_equivalent:
            changed[name] = (f"{type(module).__name__} quantises or decomposes its input; written as its dense "
                             "weight (a plain model has no activation quantisation)")
        if not isinstance(module, CompressedLinear) and original is None:
            reason = getattr(module, "not_native", None) or "no weight"
            changed[name] = f"{type(module).__name__} dropped ({reason}): a plain model has no place for it"
            continue
        for key, tensor in dense_weight(name, module, original).items():
            state[f"{name}.{key}"] = tensor
    tied_name = tied_head(model)
    if tied_name is not None:
        state.pop(tied_name, None)
    check_against_skeleton(state, skel, tied_name, "hf export")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if changed:
        first = next(iter(changed.items()))
        warnings.warn(f"hf export: {len(changed)} module(s) written differently from the compressed model, first "
                      f"{first[0]}: {first[1]} (listed in {PROVENANCE_FILE})", RuntimeWarning, stacklevel=2)
    config = export_config(model, dtype, tied=tied_name is not None)
    record = provenance(model, "hf", dtype=str(dtype).removeprefix("torch."),
                        dequantized=[name for name, _ in roots if name not in changed], changed=changed)
    with atomic_directory(out, overwrite) as tmp:
        save_tensors(state, tmp / WEIGHTS_FILE)
        write_side_files(tmp, model, tokenizer, config, record)
    return out
