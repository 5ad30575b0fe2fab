"""Architecture adapters: where each family keeps its blocks, projections and norms.

Techniques never hard-code module names; they ask the adapter. An adapter is data
(typed fields), picked from ``config.model_type``, never from the model's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from slimformer.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class NormGroup:
    """A norm and the projections that read its output (used by smoothing techniques)."""

    norm: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class Adapter:
    """Names (relative paths) of one family's parts.

    ``blocks`` is the dotted path of the ModuleList of transformer blocks from the
    top-level model; the other names are relative to one block.
    """

    family: str
    model_types: tuple[str, ...]
    blocks: str
    attention_in: tuple[str, ...]   # q, k, v (or fused qkv)
    attention_out: tuple[str, ...]
    mlp_in: tuple[str, ...]
    mlp_out: tuple[str, ...]
    norms: tuple[NormGroup, ...] = field(default=())
    is_decoder: bool = True
    # Linear-like modules stored as (in, out) rather than nn.Linear's (out, in): GPT-2's Conv1D.
    transposed_linears: bool = False
    lm_head: str | None = "lm_head"

    @property
    def linears(self) -> tuple[str, ...]:
        """All projections of a block, in the order data flows through them."""
        return self.attention_in + self.attention_out + self.mlp_in + self.mlp_out

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        module = model
        for part in self.blocks.split("."):
            if not hasattr(module, part):
                raise UnsupportedArchitectureError(
                    f"model of family {self.family} has no '{self.blocks}' block list"
                )
            module = getattr(module, part)
        return module

    def block_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        """The projections of one block, keyed by their path inside the block."""
        return {name: block.get_submodule(name) for name in self.linears}

    def num_heads(self, config) -> tuple[int, int]:
        """(query heads, key/value heads)."""
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
        kv = getattr(config, "num_key_value_heads", None) or heads
        return heads, kv


_REGISTRY: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(model_or_config) -> Adapter:
    """The adapter for a model (or its config), chosen by ``config.model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"unsupported architecture '{model_type}' "
            f"(supported: {', '.join(supported_model_types())})"
        )
    return _REGISTRY[model_type]
