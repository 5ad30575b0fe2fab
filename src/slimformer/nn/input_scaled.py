"""InputScaledLinear: a linear layer whose input is multiplied by a fixed per-dimension scale
(SmoothQuant's folding where no preceding norm can absorb it)."""

from __future__ import annotations

import torch
import torch.nn as nn

from slimformer.formats.matrix import CompressedMatrix, NotNative, from_dense
from slimformer.nn.base import CompressedLinear, _cols, _rows, dense_linear
from slimformer.nn.registry import register_module_type
from slimformer.nn.surgery import is_linear, linear_weight


@register_module_type
class InputScaledLinear(CompressedLinear):
    """``inner(x * input_scale)``: SmoothQuant's scale kept as a per-channel multiply of
    the input where no norm can absorb it (``fold: input``).

    The wrapper stays at the layer's path while later stages swap the layer inside
    (``keeps_inner``, honoured by ``set_module``/``linear_weight``), and hooks registered on
    it go to the inner layer, so their observers see the scaled input the layer reads.
    Buffers: ``input_scale`` (float32, one per input channel), then the inner layer's."""

    keeps_inner = True

    def __init__(self, inner: nn.Module, input_scale: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("input_scale", input_scale.detach().float().clone())

    @property
    def bias(self):
        return getattr(self.inner, "bias", None)

    @property
    def in_features(self) -> int:
        return self.input_scale.numel()

    @property
    def out_features(self) -> int:
        return int(linear_weight(self.inner).shape[0] if is_linear(self.inner) else self.inner.out_features)

    @property
    def dense_equivalent(self) -> bool:
        return getattr(self.inner, "dense_equivalent", True)

    def dequantized_weight(self) -> torch.Tensor:
        """The inner weight with the input scale folded into its columns."""
        inner = linear_weight(self.inner) if is_linear(self.inner) else self.inner.dequantized_weight()
        return inner.detach() * self.input_scale.to(inner.dtype)

    def matrix(self, name: str = "") -> CompressedMatrix:
        """A float inner layer: its weight with the scale folded in (fp32). A compressed one:
        :class:`NotNative` (folding the scale into quantised codes would requantise them)."""
        if is_linear(self.inner):
            return from_dense(name, self.dequantized_weight(), self.bias)
        raise NotNative(f"input scale in front of a {type(self.inner).__name__}: no native format scales the "
                        "input of a quantised layer", dense_ok=self.dense_equivalent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x * self.input_scale.to(x.dtype))

    def shard(self, rank: int, world: int, dim: int, index=None, name: str = "") -> "InputScaledLinear":
        """The inner layer's shard behind the matching part of the input scale (all of it
        for rows, ``start:stop`` for columns)."""
        label = name or "InputScaledLinear"
        start, stop = _cols(self.in_features, rank, world, index, label) if dim == 1 else (0, self.in_features)
        if isinstance(self.inner, CompressedLinear):
            act = getattr(self.inner, "act_spec", None)
            if dim == 1 and act is not None and act.dynamic:
                raise NotNative(f"{label}: the dynamic activation scale of its {type(self.inner).__name__} spans "
                                "the whole scaled input, which no column shard holds", dense_ok=False)
            inner = self.inner.shard(rank, world, dim, index, name=name)
        else:
            weight, bias = linear_weight(self.inner).detach(), self.bias
            if dim == 0:
                rows = _rows(self.out_features, rank, world, index, label)
                inner = dense_linear(weight[rows], None if bias is None else bias[rows])
            else:
                inner = dense_linear(weight[:, start:stop], None)
        return InputScaledLinear(inner, self.input_scale[start:stop])

    def register_forward_pre_hook(self, hook, **kwargs):
        return self.inner.register_forward_pre_hook(hook, **kwargs)

    def register_forward_hook(self, hook, **kwargs):
        return self.inner.register_forward_hook(hook, **kwargs)

    def config(self) -> dict:
        return {
            "type": "InputScaledLinear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            # the float layer rebuilt on load (a quantised inner layer is saved as its own module)
            "layer": "conv1d" if type(self.inner).__name__ == "Conv1D" else "linear",
        }

    @classmethod
    def from_config(cls, cfg: dict, dtype: torch.dtype = torch.float32) -> "InputScaledLinear":
        n_in, n_out = cfg["in_features"], cfg["out_features"]
        if cfg["layer"] == "conv1d":
            from transformers.pytorch_utils import Conv1D

            inner = Conv1D(n_out, n_in).to(dtype)
        else:
            inner = nn.Linear(n_in, n_out, bias=cfg["bias"], dtype=dtype)
        return cls(inner, torch.ones(n_in))
