"""``slimformer.load``: any supported source → (model, tokenizer) on CPU.

Sources, tried in this order: a built-in name, a directory written by
``slimformer compress``, a ``.gguf`` file, a local Hugging Face directory, a hub id.
Weights are read with safetensors or GGUF only; pickle checkpoints are refused
unless the caller opts in (``trust_pickle=True``), and then read with
``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

import torch

from slimformer.errors import (
    ModelLoadError,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
)
from slimformer.models.builtin import BUILTINS, builtin_path
from slimformer.models.hf import (
    COMPRESSED_MARKER,
    first_line,
    model_class,
    resolve_dtype,
)

_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()   # "Loading weights" bars would break one-line errors and --quiet
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load(source: str | os.PathLike, dtype="float32", trust_pickle: bool = False):
    """Load a model and its tokenizer on CPU. Returns ``(model, tokenizer)`` in eval mode.

    ``source``: ``smollm2-135m`` / ``minilm-l6`` (built-in), a ``slimformer compress``
    output directory, a ``.gguf`` file, a local HF directory, or a hub id.
    """
    _quiet_transformers()
    torch_dtype = resolve_dtype(dtype)
    name = str(source)
    path = builtin_path(name) if name in BUILTINS else Path(name).expanduser()

    if path.is_dir() and (path / COMPRESSED_MARKER).exists():
        from slimformer.models.compressed import load_compressed

        model, tokenizer = load_compressed(path, torch_dtype)
    elif path.suffix == ".gguf" or (path.is_file() and _is_gguf(path)):
        model, tokenizer = _load_gguf(path, torch_dtype)
    elif path.is_dir() and _quant_method(path) is not None:
        model, tokenizer = _load_quantized_checkpoint(path, _quant_method(path), torch_dtype)
    elif path.is_dir():
        model, tokenizer = _load_hf(str(path), torch_dtype, trust_pickle, local=True)
    elif path.exists():
        raise ModelLoadError(f"{path} is a file but not a GGUF model; pass a model directory or a .gguf file")
    elif _looks_like_hub_id(name):
        model, tokenizer = _load_hf(name, torch_dtype, trust_pickle, local=False)
    else:
        raise ModelLoadError(f"model not found: {name}")
    model.eval()
    return model, tokenizer


# Checkpoints quantised by other tools, read into our module types (never through
# transformers' own quantizer integrations, which need optimum / gptqmodel / a GPU).
_QUANTIZED_LOADERS = {
    "gptq": "slimformer.models.gptq:load_gptq",
    "compressed-tensors": "slimformer.models.compressed_tensors:load_compressed_tensors",
}


def _quant_method(path: Path) -> str | None:
    """``quantization_config.quant_method`` of a local HF directory's config.json, or None."""
    from slimformer.models.hf import read_json_limited

    config_path = path / "config.json"
    if not config_path.is_file():
        return None
    config = read_json_limited(config_path)
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if not isinstance(method, str):
        raise ModelLoadError(f"{config_path}: quantization_config.quant_method is missing or not a string")
    # others (e.g. "gguf", which transformers records for a model read from a GGUF file) load as before
    return method if method in _QUANTIZED_LOADERS else None


def _load_quantized_checkpoint(path: Path, method: str, dtype: torch.dtype):
    import importlib

    module, func = _QUANTIZED_LOADERS[method].split(":")
    return getattr(importlib.import_module(module), func)(path, dtype)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _load_gguf(path: Path, dtype: torch.dtype):
    """GGUF through transformers (which uses the gguf package): tensors are
    dequantised to ``dtype``; the runtime may later run the quantised blocks directly."""
    from transformers import AutoConfig, AutoTokenizer

    if not path.exists():
        raise ModelLoadError(f"GGUF file not found: {path}")
    if not _is_gguf(path):
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic number)")
    from slimformer.formats.gguf_check import check_gguf

    check_gguf(path)   # sizes, offsets, counts and types, before transformers' reader maps anything
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # corrupt header, unknown GGUF architecture
        raise ModelLoadError(f"cannot read GGUF {path}: {first_line(exc)}") from None
    cls = model_class(config)
    try:
        with _no_gguf_progress_bar():
            model = cls.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise ModelLoadError(f"cannot read GGUF {path}: {first_line(exc)}") from None
    return model, tokenizer


@contextlib.contextmanager
def _no_gguf_progress_bar():
    """transformers' GGUF reader draws its own tqdm bar, deaf to disable_progress_bar()."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _load_hf(name: str, dtype: torch.dtype, trust_pickle: bool, local: bool):
    from transformers import AutoConfig, AutoTokenizer

    if local:
        path = Path(name)
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
        has_safetensors = any(path.glob("*.safetensors"))
        from slimformer.formats.safetensors_check import check_safetensors

        for weights in sorted(path.glob("*.safetensors")):
            check_safetensors(weights)   # lengths, dtypes, shapes and offsets, before transformers maps them
        if not has_safetensors and any((path / f).exists() for f in _PICKLE_FILES):
            if not trust_pickle:
                raise UnsafeCheckpointError(
                    f"{path} holds only pickle weights (pytorch_model.bin); pickle can run code. "
                    "Convert to safetensors, or pass --trust-pickle if you trust its source"
                )
    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as exc:
        raise ModelLoadError(f"cannot read model config of {name}: {first_line(exc)}") from None
    cls = model_class(config)  # raises UnsupportedArchitectureError first
    kwargs = {"dtype": dtype}
    if not trust_pickle:
        kwargs["use_safetensors"] = True
    try:
        model = cls.from_pretrained(name, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except UnsupportedArchitectureError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load {name}: {first_line(exc)}") from None
    return model, tokenizer


