from slimformer.models.adapters import families as _families  # noqa: F401  (registers)
from slimformer.models.adapters.base import (
    Adapter,
    NormGroup,
    adapter_for,
    register_adapter,
    supported_model_types,
)

__all__ = ["Adapter", "NormGroup", "adapter_for", "register_adapter", "supported_model_types"]
