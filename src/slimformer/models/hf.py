"""What every model reader shares: dtype names, the Hugging Face class for a config, the
compressed-directory marker and one-line error text."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimformer.errors import ModelLoadError
from slimformer.models.adapters import adapter_for

COMPRESSED_MARKER = "slimformer.json"


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype '{dtype}' (choose from {', '.join(_DTYPES)})")
    return _DTYPES[dtype]


def model_class(config):
    """Decoders load with their LM head; encoders as the bare encoder (embeddings)."""
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if adapter_for(config).is_decoder else AutoModel


def first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# JSON files we read (config.json, slimformer.json, quantization configs) are small; a
# larger one is refused before it is read into memory.
MAX_JSON_BYTES = 64 << 20


def read_json_limited(path: Path, limit: int = MAX_JSON_BYTES) -> dict:
    """A JSON object from ``path``, refused in one line (naming the file) when the file is
    larger than ``limit`` bytes, unreadable, not JSON, or not an object."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise ModelLoadError(f"{path}: {size} bytes, more than the {limit} a JSON file of a model may have")
        value = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelLoadError(f"{path}: not readable JSON ({first_line(exc)})") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def read_compressed_config(path: Path) -> dict:
    try:
        return read_json_limited(path / COMPRESSED_MARKER)
    except ModelLoadError as exc:
        raise ModelLoadError(f"corrupt {COMPRESSED_MARKER} in {path}: {exc}") from None


def tied_groups(model) -> list[list[str]]:
    """Names of parameters that are one tensor (tied embeddings), group by group."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return list(groups.values())


def retie(model, groups: list[list[str]], stored: set | dict) -> None:
    """After an ``assign=True`` load of ``stored`` names: point every tied name that was not
    stored at the parameter that was (safetensors keeps a shared tensor once)."""
    for names in groups:
        present = [n for n in names if n in stored]
        for name in names:
            if present and name not in stored:
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner), attr, model.get_parameter(present[0]))
