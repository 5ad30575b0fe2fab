"""InputScaledLinear: a linear layer whose input is multiplied by a fixed per-dimension scale
(SmoothQuant's folding where no preceding norm can absorb it)."""

from __future__ import annotations

import torch
import torch.nn as nn

from slimformer.nn.registry import register_module_type
from slimformer.nn.surgery import is_linear, linear_weight


@register_module_type
class InputScaledLinear(nn.Module):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x * self.input_scale.to(x.dtype))

    def register_forward_pre_hook(self, hook, **kwargs):
        return self.inner.register_forward_pre_hook(hook, **kwargs)

    def register_forward_hook(self, hook, **kwargs):
        return self.inner.register_forward_hook(hook, **kwargs)

    def config(self) -> dict:
        out_features = linear_weight(self.inner).shape[0] if is_linear(self.inner) else self.inner.out_features
        return {
            "type": "InputScaledLinear",
            "in_features": self.input_scale.numel(),
            "out_features": int(out_features),
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
