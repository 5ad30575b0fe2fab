"""Int8OutlierLinear: LLM.int8()'s mixed decomposition, int8 rows times int8 tokens for the
inlier input dimensions and a floating-point matmul for the outlier ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimformer import kernels
from slimformer.formats.matrix import CompressedMatrix, NotNative
from slimformer.formats.primitives import (
    fake_quantize_activation,
    quantize_weight,
)
from slimformer.formats.spec import ActSpec, WeightSpec
from slimformer.nn.base import CompressedLinear
from slimformer.nn.registry import register_module_type

_INT8_ROWS = WeightSpec(bits=8, symmetric=True, granularity="channel")



_INT8_TOKENS = ActSpec(bits=8, symmetric=True, granularity="token", dynamic=True)



_CODE_OFFSET = 128   # stored codes are unsigned: q + 128



@register_module_type
class Int8OutlierLinear(CompressedLinear):
    """``y = x[:, O] W_Oᵀ + int8(x with O zeroed) · int8(W)ᵀ ⊙ (s_x ⊗ s_w) + b``.

    Buffers (what is saved): ``qweight`` (uint8 codes ``[out, in]``; zero in the
    calibrated outlier columns, which ``outlier_weight`` carries), ``scale`` (float16
    ``[out, 1]``, one per output row), ``outlier_index`` (int32 ``[n]``, sorted input
    columns), ``outlier_weight`` (``[out, n]`` in the model's dtype) and ``bias``.
    """

    def __init__(self, in_features: int, out_features: int, n_outliers: int, threshold: float,
                 bias: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.threshold = in_features, out_features, float(threshold)
        self.register_buffer("qweight", torch.full((out_features, in_features), _CODE_OFFSET, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, 1, dtype=torch.float16))
        self.register_buffer("outlier_index", torch.zeros(n_outliers, dtype=torch.int32))
        self.register_buffer("outlier_weight", torch.zeros(out_features, n_outliers, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.compute_dtype = dtype

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, outlier_dims: torch.Tensor,
                   threshold: float) -> "Int8OutlierLinear":
        """Build from an ``[out, in]`` weight and the calibrated outlier input columns."""
        out_features, in_features = weight.shape
        index = torch.as_tensor(outlier_dims, dtype=torch.long).unique(sorted=True)
        module = cls(in_features, out_features, index.numel(), threshold, bias is not None, weight.dtype)
        inliers = weight.detach().float().clone()
        # The fp copy computes these columns: leaving them out of the int8 part keeps
        # their large weights (if any) from widening the row scales.
        inliers[:, index] = 0
        codes, scale, _ = quantize_weight(inliers, _INT8_ROWS)
        module.qweight = codes
        module.scale = scale.to(torch.float16)
        module.outlier_index = index.to(torch.int32)
        module.outlier_weight = weight.detach()[:, index].clone()
        if bias is not None:
            module.bias = bias.detach().clone()
        return module

    @property
    def outlier_fraction(self) -> float:
        return self.outlier_index.numel() / self.in_features

    def int8_weight(self, columns: torch.Tensor | None = None) -> torch.Tensor:
        """The int8 part dequantised (optionally only some input columns), float32."""
        codes = self.qweight if columns is None else self.qweight[:, columns]
        return (codes.float() - _CODE_OFFSET) * self.scale.float()

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer computes with on inputs with no new outlier column."""
        weight = self.int8_weight()
        weight[:, self.outlier_index.long()] = self.outlier_weight.float()
        return weight.to(self.compute_dtype)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input with every outlier column zeroed, the columns beyond the calibrated set
        that exceed the threshold in this input)."""
        calibrated = self.outlier_index.long()
        column_max = x.detach().abs().reshape(-1, self.in_features).amax(dim=0)
        exceeding = column_max >= self.threshold
        exceeding[calibrated] = False
        extra = exceeding.nonzero().flatten()
        x_int = x.index_fill(-1, calibrated, 0) if calibrated.numel() else x
        if extra.numel():
            x_int = x_int.index_fill(-1, extra, 0)
        return x_int, extra

    def _floating_part(self, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor | None:
        y = None
        if self.outlier_index.numel():
            y = F.linear(x[..., self.outlier_index.long()], self.outlier_weight.to(x.dtype))
        if extra.numel():
            part = F.linear(x[..., extra], self.int8_weight(extra).to(x.dtype))
            y = part if y is None else y + part
        return y

    def runtime_fallback(self) -> str | None:
        if kernels.kernels_available():
            return None
        return f"kernels unavailable ({kernels.load_error()}): the int8 part runs as fake-quantised fp32 (reference path)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)
        x_int, extra = self._split(x)
        if self._runtime is None:
            if kernels.kernels_available():
                self._runtime = kernels.prepare_int8(self.qweight, self.scale, None, 8, True)
            else:
                self._runtime = False
                self.set_fallback(self.runtime_fallback())
        if self._runtime is False:
            y = self._int8_reference(x_int)
        else:
            y = kernels.w8a8_linear(x_int, self._runtime, self.bias).to(x.dtype)
        fp = self._floating_part(x, extra)
        return y if fp is None else y + fp

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same computation without the kernels: fake-quantised activations times
        the dequantised int8 weight (equal to the integer path up to float rounding)."""
        x_int, extra = self._split(x)
        y = self._int8_reference(x_int)
        fp = self._floating_part(x, extra)
        return y if fp is None else y + fp

    def _int8_reference(self, x_int: torch.Tensor) -> torch.Tensor:
        xq = fake_quantize_activation(x_int.float(), _INT8_TOKENS)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(xq, self.int8_weight(), bias).to(x_int.dtype)

    _runtime = None   # kernel layout of the int8 part, built on first forward (False: no kernels)

    def drop_runtime(self) -> None:
        self._runtime = None

    @property
    def dense_equivalent(self) -> bool:
        return False   # the input is quantised per token and its outlier columns split off

    def matrix(self, name: str = "") -> CompressedMatrix:
        raise NotNative("LLM.int8() outlier decomposition (int8 tokens with the outlier input columns in "
                        "floating point, found per input) has no native format", dense_ok=False)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, threshold={self.threshold}, "
                f"outlier_dims={self.outlier_index.numel()}")

    def config(self) -> dict:
        return {
            "type": "Int8OutlierLinear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "n_outliers": int(self.outlier_index.numel()),
            "threshold": self.threshold,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_config(cls, cfg: dict, dtype: torch.dtype = torch.float32) -> "Int8OutlierLinear":
        return cls(cfg["in_features"], cfg["out_features"], cfg["n_outliers"], cfg["threshold"], cfg["bias"], dtype)
