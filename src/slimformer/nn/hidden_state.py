"""HiddenStateQuant: fake-quantises a hidden state at one point of a block (mixed 16/8)."""

from __future__ import annotations

import torch
from torch import nn

from slimformer.formats.primitives import (
    fake_quantize_activation,
)
from slimformer.nn.base import CompressedModule
from slimformer.nn.peg import ActGrid
from slimformer.nn.registry import register_module_type


@register_module_type
class HiddenStateQuant(CompressedModule):
    """Static per-tensor fake quantisation of its parent module's output (``where:
    output``) or first input (``where: input``), applied by a hook on the parent that
    :meth:`attach_to_parent` installs whenever the module is placed (``set_module``:
    while compressing and when a saved model is loaded).

    Buffers: ``scale``, ``zero`` (float32 scalars).

    Not a :class:`~slimformer.nn.base.CompressedLinear`: it holds no matrix (nothing to
    dequantise, describe or shard), only an activation grid applied through a hook; a
    runtime that cannot apply it must refuse the model (see ``not_native``)."""

    not_native = "fake-quantises a block's hidden state through a hook: no native engine runs it"

    def __init__(self, grid: ActGrid, where: str):
        super().__init__()
        if where not in ("input", "output"):
            raise ValueError(f"where must be input or output, got {where!r}")
        self.grid, self.where = grid, where
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_activation(x, self.grid, self.scale, self.zero)

    def attach_to_parent(self, parent: nn.Module) -> None:
        hooks = parent._forward_hooks if self.where == "output" else parent._forward_pre_hooks
        if any(getattr(hook, "__self__", None) is self for hook in hooks.values()):
            return
        if self.where == "output":
            parent.register_forward_hook(self._quantize_output)
        else:
            parent.register_forward_pre_hook(self._quantize_input)

    def _quantize_output(self, _module, _args, output):
        if isinstance(output, tuple):   # blocks of older transformers return (hidden, ...)
            return (self(output[0]),) + output[1:]
        return self(output)

    def _quantize_input(self, _module, args):
        return (self(args[0]),) + tuple(args[1:])

    def extra_repr(self) -> str:
        return f"a{self.grid.bits}-static, {self.where}"

    def config(self) -> dict:
        return {"type": "HiddenStateQuant", "act": self.grid.to_dict(), "where": self.where}

    @classmethod
    def from_config(cls, cfg: dict, dtype: torch.dtype = torch.float32) -> "HiddenStateQuant":
        return cls(ActGrid(**cfg["act"]), cfg["where"])
