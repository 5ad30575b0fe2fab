"""The module types a saved model may hold, by class name.

Each type is a :class:`slimformer.nn.base.CompressedLinear` (or, for modules that are not
one matrix, has ``config() -> dict`` and ``from_config(cfg, dtype)``). The registry never
imports the modules that register here; ``slimformer.plugins`` does.
"""

from __future__ import annotations

import torch.nn as nn

from slimformer.errors import ModelLoadError

MODULE_TYPES: dict[str, type[nn.Module]] = {}


def register_module_type(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: compressed directories may hold ``cls``."""
    MODULE_TYPES[cls.__name__] = cls
    return cls


def module_type(name: str | None) -> type[nn.Module]:
    """The registered class called ``name``; a clear error when there is none."""
    if name not in MODULE_TYPES:
        known = ", ".join(sorted(MODULE_TYPES)) or "none: slimformer.plugins.load_builtin() registers the built-in ones"
        raise ModelLoadError(f"unknown module type {name!r} (known: {known})")
    return MODULE_TYPES[name]


def registered_modules() -> tuple[str, ...]:
    """The Python modules that registered the known types: what a fresh worker process
    imports to read the same saved models as this one."""
    return tuple(sorted({cls.__module__ for cls in MODULE_TYPES.values()}))
