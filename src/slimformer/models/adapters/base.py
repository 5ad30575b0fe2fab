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
    # Module paths the native decoder reads (None: the family has no such part, or the
    # decoder does not run it). Top-level paths from the model; norms relative to a block.
    embed_tokens: str | None = None
    final_norm: str | None = None
    rotary: str | None = None
    attn_norm: str | None = None
    mlp_norm: str | None = None
    q_norm: str | None = None       # per-head RMSNorm on q before rotary (Qwen3)
    k_norm: str | None = None
    # GGUF (llama.cpp) tensor name -> projection path in a block, for reading GGUF blocks directly
    gguf_linears: tuple[tuple[str, str], ...] = ()

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

    def context_length(self, config, default: int = 2048) -> int:
        """Positions the model has (``max_position_embeddings`` or GPT-2's ``n_positions``)."""
        return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
                   or default)

    def decoder_spec(self, model_or_config) -> DecoderSpec:
        """The facts a decoder engine needs, read from the config here and nowhere else."""
        config = getattr(model_or_config, "config", model_or_config)
        heads, kv = self.num_heads(config)
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        n_layers = getattr(config, "num_hidden_layers", None) or config.n_layer
        context = self.context_length(config)
        rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        # Sliding windows, per layer: HF's layer_types when the config has them (Qwen2/3: only
        # layers marked sliding_attention), else one window for every layer (Mistral).
        window = getattr(config, "sliding_window", None)
        if window is not None and getattr(config, "use_sliding_window", True) is False:
            window = None
        layer_types = getattr(config, "layer_types", None)
        if window is not None and layer_types is not None:
            windows = tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
        else:
            windows = (int(window) if window is not None else None,) * n_layers
        windows = tuple(w if w is not None and w < context else None for w in windows)  # no effect: no window
        act = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None) or "unknown"
        mlp = f"gated_{act}" if len(self.mlp_in) == 2 else str(act)
        norm = "rms" if hasattr(config, "rms_norm_eps") else "layernorm"
        eps = float(getattr(config, "rms_norm_eps", None) or getattr(config, "layer_norm_eps", None)
                    or getattr(config, "layer_norm_epsilon", None) or 1e-5)
        return DecoderSpec(
            model_type=str(getattr(config, "model_type", self.family)), hidden=int(hidden), n_layers=int(n_layers),
            n_heads=int(heads), n_kv_heads=int(kv), head_dim=int(head_dim),
            vocab=int(config.vocab_size), max_positions=context, rope_type=str(rope_type),
            rope_theta=theta, rope_scaling=rope or None, qk_norm=self.q_norm is not None,
            sliding_windows=windows, mlp=mlp, norm=norm, norm_eps=eps,
            attention_bias=bool(getattr(config, "attention_bias", False)),
        )


@dataclass(frozen=True)
class DecoderSpec:
    """What a decoder-only model computes, as a decoder engine needs it (from the adapter)."""

    model_type: str
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    rope_type: str                    # HF rope_type: default, linear, llama3, yarn, ...
    rope_theta: float
    rope_scaling: dict | None
    qk_norm: bool                     # RMSNorm per head on q and k before rotary
    sliding_windows: tuple[int | None, ...]  # per layer: attend to the last w positions, or None
    mlp: str                          # "gated_silu" (SwiGLU), "gelu", ...
    norm: str                         # "rms" or "layernorm"
    norm_eps: float
    attention_bias: bool = False

    @property
    def sliding_window(self) -> int | None:
        """The window when every windowed layer shares one (else the smallest)."""
        ws = [w for w in self.sliding_windows if w is not None]
        return min(ws) if ws else None


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
