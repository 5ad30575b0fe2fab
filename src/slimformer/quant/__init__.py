"""Quantisation: specs, primitives, packing, QuantLinear, and the techniques.

Every module of this package that defines a technique registers its Transform (and,
if it has one, its module type for saved models) on import; importing the package
imports them all, so a recipe can name any of them.
"""

import importlib
import pkgutil

from slimformer.quant.modules import QuantLinear
from slimformer.quant.spec import ActSpec, WeightSpec

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["ActSpec", "QuantLinear", "WeightSpec"]
