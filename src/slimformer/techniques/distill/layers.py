"""``DropLayers``: a smaller student made by removing whole blocks (DistilBERT: initialise
the student from every other teacher layer).

A one-shot stage that works on the whole model: it runs in ``plan_model``, before any
block is processed, so later stages of the same run see only the kept blocks. It updates
``config.num_hidden_layers`` (and per-layer config lists such as ``layer_types``),
renumbers the kept blocks' ``layer_idx`` (the KV cache is indexed by it) and records in
``config.slimformer_layer_map`` which teacher block each student block came from; the
hidden-state and attention distillation terms align student block i with teacher block
``slimformer_layer_map[i]``. The map is saved in ``config.json`` with the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from slimformer.core.transform import Transform, register
from slimformer.errors import RecipeError
from slimformer.models.adapters import Adapter

# Config keys never subset by layer even when their length happens to match.
_NOT_PER_LAYER = {"architectures", "slimformer_layer_map"}


def keep_indices(keep, n_blocks: int) -> list[int]:
    """The block numbers ``keep`` names: ``every_other`` (0, 2, 4, ...) or a list."""
    if keep == "every_other":
        return list(range(0, n_blocks, 2))
    if isinstance(keep, (list, tuple)) and keep and all(isinstance(i, int) and not isinstance(i, bool) for i in keep):
        indices = list(keep)
        if any(i < 0 or i >= n_blocks for i in indices):
            raise RecipeError(f"DropLayers: keep {indices} names blocks outside 0-{n_blocks - 1}")
        if indices != sorted(set(indices)):
            raise RecipeError(f"DropLayers: keep must list distinct blocks in increasing order, got {indices}")
        return indices
    raise RecipeError(f"DropLayers: keep must be every_other or a list of block numbers, got {keep!r}")


def drop_layers(model: nn.Module, adapter: Adapter, keep) -> list[int]:
    """Remove every block of ``model`` not in ``keep`` (in place); returns the layer map
    (teacher block of each remaining block, composed with any earlier map)."""
    blocks = adapter.get_blocks(model)
    n = len(blocks)
    indices = keep_indices(keep, n)
    kept = [blocks[i] for i in indices]
    # Mutate the ModuleList itself: the runner and other stages hold it.
    for i in reversed(range(n)):
        del blocks[i]
    blocks.extend(kept)
    for new, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    config = model.config
    for key, value in list(vars(config).items()):
        if key not in _NOT_PER_LAYER and isinstance(value, list) and len(value) == n and n > 1:
            setattr(config, key, [value[i] for i in indices])
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(config, key):
            setattr(config, key, len(indices))
    earlier = getattr(config, "slimformer_layer_map", None)
    layer_map = [earlier[i] for i in indices] if earlier else indices
    config.slimformer_layer_map = layer_map
    return layer_map


@register
@dataclass(frozen=True)
class DropLayers(Transform):
    """Keep only the blocks ``keep`` names (``every_other``: 0, 2, 4, ...; or a list of
    block numbers); the rest are removed. Follow it with a training stage and the
    ``distill`` / ``distill_hidden`` (decoders) or ``embed_cosine`` (encoders) loss."""

    keep: str | list = "every_other"
    keeps_block_outputs: ClassVar[bool] = True

    def __post_init__(self):
        if isinstance(self.keep, str) and self.keep != "every_other":
            raise RecipeError(f"DropLayers: keep must be every_other or a list of block numbers, got {self.keep!r}")

    def plan_model(self, model, adapter, calib, plan):
        plan["layer_map"] = drop_layers(model, adapter, self.keep)

    def convert(self, block, ctx):
        pass   # the work is model-level (plan_model)

    def summary(self, model, adapter):
        return {"layer_map": getattr(model.config, "slimformer_layer_map", None)}
