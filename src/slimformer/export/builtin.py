"""The built-in exporters (registered on import; imported by ``slimformer.plugins``)."""

from __future__ import annotations

from pathlib import Path

from slimformer.export import register_exporter
from slimformer.models.compressed import save_compressed
from slimformer.runtime.offload import save_offloadable


@register_exporter("compressed", "slimformer's compressed directory: packed weights, loaded by slimformer.load",
                   options=("recipe_text", "source"))
def write_compressed(model, tokenizer, out: Path, *, overwrite: bool = False, **options) -> Path:
    meta = getattr(model, "slimformer_meta", None) or {}
    options.setdefault("recipe_text", meta.get("recipe"))
    options.setdefault("source", meta.get("source"))
    return save_compressed(model, tokenizer, out, overwrite=overwrite, **options)


@register_exporter("offload", "one safetensors file per block, for running models larger than memory")
def write_offloadable(model, tokenizer, out: Path, *, overwrite: bool = False) -> Path:
    return save_offloadable(model, out, tokenizer, overwrite=overwrite)
