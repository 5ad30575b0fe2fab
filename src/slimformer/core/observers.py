"""Calibration observers shared by techniques."""

from __future__ import annotations

import torch
import torch.nn as nn


class InputRangeObserver:
    """Running per-dimension min/max of the inputs of some Linears (forward pre-hooks)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.lo: dict[str, torch.Tensor] = {}
        self.hi: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def observe(_module, args):
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1])
            lo, hi = x.amin(0), x.amax(0)
            self.lo[name] = lo if name not in self.lo else torch.minimum(self.lo[name], lo)
            self.hi[name] = hi if name not in self.hi else torch.maximum(self.hi[name], hi)
        return observe

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
