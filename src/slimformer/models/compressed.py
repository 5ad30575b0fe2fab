"""The compressed-model directory: HF config + tokenizer, ``model.safetensors`` with
packed weights, and ``slimformer.json`` naming each swapped module, the recipe
verbatim, library versions and the calibration data fingerprint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_model

from slimformer.errors import ModelLoadError
from slimformer.models.hf import (
    COMPRESSED_MARKER,
    first_line,
    model_class,
    retie,
    tied_groups,
)
from slimformer.models.validate import check_compressed_dir, check_config_types, check_replaces, check_skeleton
from slimformer.nn.base import link_modules
from slimformer.nn.registry import MODULE_TYPES
from slimformer.nn.surgery import set_module
from slimformer.util.atomic import atomic_directory

# Version 2: QuantLinear saves 4-bit codes of rows of a multiple of 32 in the Q4 layout
# ([out, in/2], GGUF's block order: what the native decoder and GGUF read) instead of a flat bit
# stream. Version 1 directories still load: QuantLinear converts their codes once, when the
# state dict is loaded (nn/quant_linear.py).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
WEIGHTS_FILE = "model.safetensors"



def library_versions() -> dict[str, str]:
    import transformers

    from slimformer._version import __version__

    return {"slimformer": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def swapped_modules(model: nn.Module) -> dict[str, dict]:
    return {name: m.config() for name, m in model.named_modules() if type(m).__name__ in MODULE_TYPES}


def save_compressed(model, tokenizer, out: str | os.PathLike, *, recipe_text: str | None = None,
                    source: str | None = None, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write the model to ``out`` atomically. Returns the path."""
    out = Path(out)
    meta = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "recipe": recipe_text,
        "versions": library_versions(),
        "modules": swapped_modules(model),
        **(extra or {}),
    }
    with atomic_directory(out, overwrite) as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # save_model drops tensors shared with another (tied embeddings) and restores them on load.
        save_model(model, str(tmp / WEIGHTS_FILE))
        (tmp / COMPRESSED_MARKER).write_text(json.dumps(meta, indent=2))
    return out


def weight_bytes(path: str | os.PathLike) -> int:
    """Real stored bytes of a compressed directory's weights (file size, header included)."""
    return (Path(path) / WEIGHTS_FILE).stat().st_size


def load_compressed(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoConfig, AutoTokenizer

    # Every field, module type and size is checked against the weights' header before
    # anything is built: a crafted slimformer.json or config.json cannot force allocations.
    meta, header = check_compressed_dir(path, dtype, WEIGHTS_FILE, READABLE_VERSIONS)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise ModelLoadError(f"cannot rebuild model from {path}: {first_line(exc)}") from None
    check_config_types(path / "config.json", config)

    def skeleton(include_buffers: bool):
        # Parameters on the meta device: no fp32 copy of the weights that are about to be
        # replaced by packed ones is ever allocated.
        with init_empty_weights(include_buffers=include_buffers):
            model = model_class(config).from_config(config, dtype=dtype)
        model.tie_weights()   # on meta, so the tied groups below are known
        return model

    check_skeleton(path, lambda: skeleton(True), header.file_size)
    try:
        model = skeleton(False)
    except Exception as exc:
        raise ModelLoadError(f"cannot rebuild model from {path}: {first_line(exc)}") from None
    for name, cfg in meta["modules"].items():
        check_replaces(path / COMPRESSED_MARKER, model, name, cfg)
        set_module(model, name, MODULE_TYPES[cfg["type"]].from_config(cfg, dtype))
    link_modules(model)   # e.g. a tied int8 LM head to its embedding's codes (stored once, under the embedding)
    # Tied parameters (embedding / LM head) are one object under several names; the
    # file holds them once, so the other names are pointed at the loaded tensor.
    tied = tied_groups(model)
    try:
        state = load_file(str(path / WEIGHTS_FILE))
        _, unexpected = model.load_state_dict(state, strict=False, assign=True)
        retie(model, tied, state)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise ModelLoadError(f"cannot load weights from {path}: {first_line(exc)}") from None
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing or unexpected:
        problem = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ModelLoadError(f"cannot load weights from {path}: {problem}")
    model.slimformer_meta = meta
    return model, tokenizer
