"""ActOrderLinear: a compressed layer whose input columns are read in a fixed permuted order.

GPTQ's act-order (``desc_act``) checkpoints quantise a layer's input columns in order of
decreasing Hessian diagonal, so a quantisation group (one scale and zero-point) holds
columns scattered over the input: column ``k`` belongs to group ``g_idx[k]``. Our formats
group contiguous columns. Sorting the columns by group (``input_perm``, a stable sort of
``g_idx``) makes every group contiguous, so the layer is held exactly as an inner
:class:`~slimformer.nn.quant_linear.QuantLinear` over the permuted columns plus the
permutation: ``y = inner(x[..., input_perm])``, and the dense weight is the inner one with
its columns put back, ``W[:, input_perm[i]] = W_inner[:, i]``.

The native decoder has no input permutation: :meth:`matrix` raises
:class:`NotNative` (``dense_ok`` when the inner layer is weight-only), so it runs the
layer as its dequantised fp32 weight, with a warning naming the layer and the reason
recorded (``fallback``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimformer.formats.matrix import CompressedMatrix, NotNative
from slimformer.nn.base import CompressedLinear, _rows
from slimformer.nn.registry import module_type, register_module_type


def _check_permutation(perm: torch.Tensor) -> None:
    if perm.dim() != 1 or perm.dtype != torch.int64 or not torch.equal(torch.sort(perm).values,
                                                                         torch.arange(perm.numel())):
        raise ValueError("input_perm is not a permutation of the layer's input columns")


@register_module_type
class ActOrderLinear(CompressedLinear):
    """``inner(x[..., input_perm])``: ``input_perm`` (int64, ``[in_features]``, a
    permutation) then the inner compressed layer's buffers."""

    def __init__(self, inner: nn.Module, input_perm: torch.Tensor):
        super().__init__()
        perm = torch.as_tensor(input_perm, dtype=torch.int64).reshape(-1)
        if perm.numel() != inner.in_features:
            raise ValueError(f"input permutation of {perm.numel()} columns for a layer of {inner.in_features} inputs")
        if not perm.is_meta:   # a skeleton being checked has no values yet
            _check_permutation(perm)
        self.inner = inner
        self.register_buffer("input_perm", perm.clone())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stored = state_dict.get(prefix + "input_perm")
        if stored is not None and not stored.is_meta:
            _check_permutation(stored)   # a file's indices must not gather outside the input
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def in_features(self) -> int:
        return self.inner.in_features

    @property
    def out_features(self) -> int:
        return self.inner.out_features

    @property
    def bias(self):
        return getattr(self.inner, "bias", None)

    @property
    def dense_equivalent(self) -> bool:
        return getattr(self.inner, "dense_equivalent", True)

    def dequantized_weight(self) -> torch.Tensor:
        inner = self.inner.dequantized_weight()
        weight = torch.empty_like(inner)
        weight[:, self.input_perm] = inner
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.index_select(-1, self.input_perm))

    def matrix(self, name: str = "") -> CompressedMatrix:
        raise NotNative(f"act-order input permutation in front of a {type(self.inner).__name__}: the native formats "
                        "group contiguous input columns and have no input permutation", dense_ok=self.dense_equivalent)

    def runtime_fallback(self) -> str | None:
        return self.fallback or self.inner.runtime_fallback()

    def drop_runtime(self) -> None:
        inner = self._modules.get("inner")
        if inner is not None:
            inner.drop_runtime()

    def shard(self, rank: int, world: int, dim: int, index=None, name: str = "") -> nn.Module:
        """Rows: the inner layer's row shard behind the same permutation (packed, exact).
        Columns: the dense weight's columns (the base class's fallback, warned)."""
        if dim == 0:
            rows = _rows(self.out_features, rank, world, index, name or "ActOrderLinear")
            return ActOrderLinear(self.inner.shard(rank, world, 0, rows, name=name), self.input_perm)
        return super().shard(rank, world, dim, index, name)

    def extra_repr(self) -> str:
        return f"act-order permutation of {self.in_features} inputs"

    def config(self) -> dict:
        return {
            "type": "ActOrderLinear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "inner": self.inner.config(),
        }

    @classmethod
    def from_config(cls, cfg: dict, dtype: torch.dtype = torch.float32) -> "ActOrderLinear":
        inner_cfg = cfg["inner"]
        inner = module_type(inner_cfg.get("type")).from_config(inner_cfg, dtype)
        return cls(inner, torch.arange(cfg["in_features"]))
