from slimformer.models.adapters import families as _families  # noqa: F401  (registers)
from slimformer.models.adapters.base import (
    Adapter,
    DecoderSpec,
    NormGroup,
    adapter_for,
    register_adapter,
    supported_model_types,
)

__all__ = ["Adapter", "DecoderSpec", "NormGroup", "adapter_for", "register_adapter", "supported_model_types"]
