"""Small helpers to read and swap modules, shared by every technique and the loader."""

from __future__ import annotations

import torch
import torch.nn as nn


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of a Linear, or of GPT-2's Conv1D (stored ``[in, out]``)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D":
        return module.weight.t()
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
