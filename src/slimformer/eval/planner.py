"""Memory planner: bytes of weights and of the KV cache for a model config, batch and context."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    params: int
    vocab: int = 0

    @classmethod
    def from_config(cls, config, params: int | None = None) -> "ModelShape":
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        vocab = getattr(config, "vocab_size", 0)
        return cls(layers, hidden, heads, kv_heads, head_dim, params or 0, vocab)


def kv_cache_bytes(shape: ModelShape, batch: int, context: int, bytes_per_value: float = 2) -> int:
    """Keys and values of every layer: 2 × layers × kv_heads × head_dim × batch × context."""
    return int(2 * shape.layers * shape.kv_heads * shape.head_dim * batch * context * bytes_per_value)


def plan(shape: ModelShape, batch: int, context: int, weight_bytes_per_param: float = 2,
         kv_bytes_per_value: float = 2) -> dict:
    weights = int(shape.params * weight_bytes_per_param)
    kv = kv_cache_bytes(shape, batch, context, kv_bytes_per_value)
    return {
        "shape": asdict(shape),
        "batch": batch,
        "context": context,
        "weight_bytes": weights,
        "kv_cache_bytes": kv,
        "kv_bytes_per_token": kv // max(batch * context, 1),
        "total_bytes": weights + kv,
        "kv_to_weights": kv / weights if weights else None,
    }
