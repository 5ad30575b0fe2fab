from slimformer.models.load import load

__all__ = ["load"]
