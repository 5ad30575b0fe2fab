"""How sparse a set of weights is (for the results of pruning stages and training logs)."""

from __future__ import annotations

import torch

from slimformer.formats.masks import sparsity_of


def describe_sparsity(weights: dict[str, torch.Tensor]) -> dict:
    """Overall sparsity of ``weights`` (name → tensor) and each one's."""
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return {"sparsity": zeros / total if total else 0.0,
            "layers": {k: round(sparsity_of(w != 0), 6) for k, w in weights.items()}}
