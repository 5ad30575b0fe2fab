"""Activation outlier analysis (LLM.int8()'s emergent features): per projection input,
the per-channel max |x| over calibration data, and how many channels are outliers
(max ≥ 6, or ≥ 20× the median channel's max)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from slimformer.models.adapters import adapter_for

ABS_THRESHOLD = 6.0
RELATIVE_THRESHOLD = 20.0


@torch.inference_mode()
def channel_absmax(model, calib: torch.Tensor, progress: bool = True) -> dict[str, torch.Tensor]:
    """Per input channel max |x| of every block projection, over ``calib`` ``[n, seqlen]``."""
    adapter = adapter_for(model)
    stats: dict[str, torch.Tensor] = {}
    handles = []
    for index, block in enumerate(adapter.get_blocks(model)):
        for name, module in adapter.block_linears(block).items():
            key = f"{adapter.blocks}.{index}.{name}"

            def observe(_module, args, key=key):
                amax = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
                stats[key] = amax if key not in stats else torch.maximum(stats[key], amax)

            handles.append(module.register_forward_pre_hook(observe))
    try:
        for sample in tqdm(calib, desc="outliers", unit="sample", disable=not progress):
            model(input_ids=sample.unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
    return stats


def outlier_table(stats: dict[str, torch.Tensor]) -> list[dict]:
    rows = []
    for layer, amax in stats.items():
        median = amax.median().item()
        rows.append({
            "layer": layer,
            "max_abs": amax.max().item(),
            "median_channel_max": median,
            "channels": amax.numel(),
            "channels_ge_6": int((amax >= ABS_THRESHOLD).sum()),
            "channels_ge_20x_median": int((amax >= RELATIVE_THRESHOLD * median).sum()),
            "top_channels": torch.topk(amax, min(3, amax.numel())).indices.tolist(),
        })
    return rows
