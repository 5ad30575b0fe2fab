"""Short CPU training: the loop (``loop.py``) and the hook interface techniques plug into (``hooks.py``)."""

from slimformer.train.hooks import TrainHook
from slimformer.train.loop import TokenBatches, TrainConfig, Trainer, TrainResult

__all__ = ["TokenBatches", "TrainConfig", "TrainHook", "TrainResult", "Trainer"]
