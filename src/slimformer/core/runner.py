"""Runs a recipe over a model, block by block.

Without calibration data each Transform converts each block in turn. With it, the
inputs of the first block are captured once, then for every block and every
Transform in recipe order: prepare → forward the calibration inputs through the
block (observers record) → convert; finally the block's outputs, computed by the
already-compressed block, become the next block's inputs. Only one block's
activations are held at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from slimformer.core.transform import BlockContext, Needs, Transform
from slimformer.errors import DataError
from slimformer.models.adapters import adapter_for


@dataclass
class RunResult:
    seconds: float
    fallbacks: list[str] = field(default_factory=list)


class _StopForward(Exception):
    pass


class _InputCatcher(nn.Module):
    """Stands in for block 0 to record what the model feeds it, then stops the forward."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.hidden: list[torch.Tensor] = []
        self.kwargs: dict | None = None

    def forward(self, hidden_states, *args, **kwargs):
        self.hidden.append(hidden_states.detach())
        if self.kwargs is None:
            # Same length, no padding: masks and position tensors are the same for every batch.
            self.kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
            self.kwargs["use_cache"] = False
        raise _StopForward


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.inference_mode()
def capture_block_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], dict]:
    adapter = adapter_for(model)
    blocks = adapter.get_blocks(model)
    catcher = _InputCatcher(blocks[0])
    blocks[0] = catcher
    try:
        for start in range(0, calib.shape[0], batch_size):
            try:
                model(input_ids=calib[start:start + batch_size], use_cache=False)
            except _StopForward:
                pass
    finally:
        blocks[0] = catcher.block
    return catcher.hidden, catcher.kwargs or {}


@torch.inference_mode()
def _forward_block(block: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    return [_block_output(block(h, **kwargs)) for h in inputs]


def run_transforms(
    model: nn.Module,
    transforms: list[Transform],
    calib: torch.Tensor | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> RunResult:
    """Apply ``transforms`` in order to every block of ``model``.

    ``calib``: ``[n, seqlen]`` token ids, required when any Transform needs calibration.
    """
    start = time.perf_counter()
    adapter = adapter_for(model)
    blocks = adapter.get_blocks(model)
    needs_data = any(t.requires() is Needs.CALIBRATION for t in transforms)
    if any(t.requires() is Needs.TRAINING for t in transforms):
        raise NotImplementedError("training Transforms run through the training loop, not run_transforms")
    if needs_data and (calib is None or calib.numel() == 0):
        raise DataError("this recipe needs calibration data (--calib)")

    inputs, kwargs = capture_block_inputs(model, calib, batch_size) if needs_data else ([], {})
    fallbacks: list[str] = []
    states: dict[int, dict] = {id(t): {} for t in transforms}
    # leave=False: a failure mid-way prints only the error, not a stale bar.
    with tqdm(total=len(blocks), desc="compressing", unit="block", disable=not progress, leave=False) as bar:
        for index, block in enumerate(blocks):
            for transform in transforms:
                ctx = BlockContext(model, adapter, index, f"{adapter.blocks}.{index}", states[id(transform)], fallbacks)
                if transform.requires() is Needs.CALIBRATION:
                    transform.prepare(block, ctx)
                    _forward_block(block, inputs, kwargs)
                transform.convert(block, ctx)
            if needs_data and index + 1 < len(blocks):
                inputs = _forward_block(block, inputs, kwargs)
            bar.update()
    for transform in transforms:
        transform.finish(model, adapter)
    return RunResult(time.perf_counter() - start, fallbacks)
