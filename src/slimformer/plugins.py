"""The one place that imports the built-in plugins: every technique (each registers its
Transform and, if it saves one, its module type) and every saved module type.

Registries (``core.transform``, ``nn.registry``, ``export``) never import what registers
with them; entry points (``api``, ``cli``, the package's ``load``) call :func:`load_builtin`
first. Third-party packages add theirs under the ``slimformer.plugins`` entry-point group.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings

BUILTIN = (
    "slimformer.nn.quant_linear",
    "slimformer.nn.quant_embedding",
    "slimformer.nn.sparse",
    "slimformer.nn.gobo",
    "slimformer.nn.int8_outlier",
    "slimformer.nn.peg",
    "slimformer.nn.input_scaled",
    "slimformer.nn.hidden_state",
    "slimformer.nn.act_order",
    "slimformer.techniques.quant.rtn",
    "slimformer.techniques.quant.gptq",
    "slimformer.techniques.quant.hawq",
    "slimformer.techniques.quant.zeroquant",
    "slimformer.techniques.quant.qbert",
    "slimformer.techniques.quant.gobo",
    "slimformer.techniques.quant.llm_int8",
    "slimformer.techniques.quant.peg",
    "slimformer.techniques.quant.smoothquant",
    "slimformer.techniques.quant.mixed_precision",
    "slimformer.techniques.quant.embedding",
    "slimformer.techniques.quant.qat",
    "slimformer.techniques.sparsity.oneshot",
    "slimformer.techniques.sparsity.training",
    "slimformer.techniques.sparsity.calibrated",
    "slimformer.techniques.distill.layers",
    "slimformer.export.builtin",
    "slimformer.export.gguf",
    "slimformer.export.gptq",
    "slimformer.export.hf",
    "slimformer.export.compressed_tensors",
)

_loaded = False


def load_builtin() -> None:
    """Import every built-in plugin and any installed third-party one (idempotent)."""
    global _loaded
    if _loaded:
        return
    for name in BUILTIN:
        importlib.import_module(name)
    for entry in importlib.metadata.entry_points(group="slimformer.plugins"):
        try:
            entry.load()
        except Exception as exc:  # a broken third-party plugin must not take the built-ins down
            warnings.warn(f"slimformer plugin {entry.name!r} ({entry.value}) failed to load: {exc}", stacklevel=2)
    _loaded = True
