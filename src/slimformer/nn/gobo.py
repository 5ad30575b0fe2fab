"""GOBOLinear: a linear layer whose weights are indices into small per-group centroid
tables, with the few outlier weights kept in float16 (saved by the GOBO technique)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimformer.formats import packing
from slimformer.formats.matrix import CompressedMatrix, NotNative
from slimformer.formats.primitives import (
    group_view,
)
from slimformer.formats.spec import WeightSpec
from slimformer.nn.base import CompressedLinear
from slimformer.nn.registry import register_module_type


@register_module_type
class GOBOLinear(CompressedLinear):
    """``y = x Ŵᵀ + b``, Ŵ = centroid table lookup of the stored indices, with the
    outliers scattered back in.

    Buffers (what is saved): ``qweight`` (packed ``bits``-bit indices), ``centroids``
    (float16 ``[out|1, n_groups, 2^bits]``), ``outlier_index`` (int32 flat positions),
    ``outlier_value`` (float16) and ``bias``.
    """

    def __init__(self, in_features: int, out_features: int, weight_spec: WeightSpec, n_outliers: int,
                 bias: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.weight_spec = in_features, out_features, weight_spec
        rows = 1 if weight_spec.granularity == "tensor" else out_features
        n_groups = in_features // weight_spec.group_size if weight_spec.granularity == "group" else 1
        numel = in_features * out_features
        self.register_buffer("qweight", torch.zeros(packing.packed_nbytes(numel, weight_spec.bits), dtype=torch.uint8))
        self.register_buffer("centroids", torch.zeros(rows, n_groups, 2**weight_spec.bits, dtype=torch.float16))
        self.register_buffer("outlier_index", torch.zeros(n_outliers, dtype=torch.int32))
        self.register_buffer("outlier_value", torch.zeros(n_outliers, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.compute_dtype = dtype

    @classmethod
    def from_codes(cls, indices: torch.Tensor, centroids: torch.Tensor, flat_index: torch.Tensor,
                   values: torch.Tensor, bias: torch.Tensor | None, weight_spec: WeightSpec,
                   dtype: torch.dtype = torch.float32) -> "GOBOLinear":
        """From GOBO's result: ``[out, in]`` centroid indices, ``[rows, n_groups, 2^bits]``
        centroids, the flat positions of the outliers and their values."""
        out_features, in_features = indices.shape
        module = cls(in_features, out_features, weight_spec, flat_index.numel(), bias is not None, dtype)
        module.qweight = packing.pack(indices, weight_spec.bits)
        module.centroids = centroids.to(torch.float16)
        module.outlier_index = flat_index.to(torch.int32)
        module.outlier_value = values.to(torch.float16)
        if bias is not None:
            module.bias = bias.detach().clone()
        return module

    @property
    def outlier_fraction(self) -> float:
        return self.outlier_index.numel() / (self.in_features * self.out_features)

    def indices(self) -> torch.Tensor:
        numel = self.in_features * self.out_features
        return packing.unpack(self.qweight, self.weight_spec.bits, numel).reshape(self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        grouped = group_view(self.indices(), self.weight_spec).long()     # [rows, n_groups, group]
        weight = torch.gather(self.centroids.float(), 2, grouped).reshape(-1)
        weight[self.outlier_index.long()] = self.outlier_value.float()
        return weight.reshape(shape).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The dequantised weight is cached outside the state dict (not saved; rebuilt
        # after a load): table lookup on every call would dominate the matmul.
        if self._weight is None:
            self._weight = self.dequantized_weight()
        return F.linear(x, self._weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    _weight = None

    def drop_runtime(self) -> None:
        self._weight = None

    def matrix(self, name: str = "") -> CompressedMatrix:
        raise NotNative("centroid tables with float16 outliers have no native format: the native engine runs "
                        "the dequantised weight", dense_ok=True)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, {self.weight_spec.bits}-bit tables per "
                f"{self.weight_spec.describe().split('-')[1]}, outliers={self.outlier_index.numel()}")

    def config(self) -> dict:
        return {
            "type": "GOBOLinear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "weight": self.weight_spec.to_dict(),
            "n_outliers": int(self.outlier_index.numel()),
            "bias": self.bias is not None,
        }

    @classmethod
    def from_config(cls, cfg: dict, dtype: torch.dtype = torch.float32) -> "GOBOLinear":
        return cls(cfg["in_features"], cfg["out_features"], WeightSpec(**cfg["weight"]), cfg["n_outliers"],
                   cfg["bias"], dtype)
