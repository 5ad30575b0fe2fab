"""Small helpers to read and swap modules, shared by every technique and the loader."""

from __future__ import annotations

import torch
import torch.nn as nn


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``.

    Two protocols let a technique change what a path computes in a way that later
    stages and save/load keep:
    - a wrapper at ``name`` with ``keeps_inner = True`` (SmoothQuant's ``fold: input``
      scaling) stays in place: the new module becomes its ``inner`` layer;
    - a module with ``attach_to_parent(parent)`` is handed its parent once placed (e.g. to
      quantise the parent's output through a hook, which no saved file can hold).
    """
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    current = parent._modules.get(child)
    if getattr(current, "keeps_inner", False) and not getattr(module, "keeps_inner", False):
        parent, child = current, "inner"
    setattr(parent, child, module)
    attach = getattr(module, "attach_to_parent", None)
    if callable(attach):
        attach(parent)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of a Linear, or of GPT-2's Conv1D (stored ``[in, out]``);
    through a ``keeps_inner`` wrapper, that of its inner layer."""
    if getattr(module, "keeps_inner", False):
        return linear_weight(module.inner)
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D":
        return module.weight.t()
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
