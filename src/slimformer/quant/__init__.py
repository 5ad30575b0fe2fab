"""Quantisation: specs, primitives, packing, QuantLinear, and the techniques
(each registers its Transform on import)."""

from slimformer.quant import rtn  # noqa: F401  (registers RTN)
from slimformer.quant.modules import QuantLinear
from slimformer.quant.spec import ActSpec, WeightSpec

__all__ = ["ActSpec", "QuantLinear", "WeightSpec"]
