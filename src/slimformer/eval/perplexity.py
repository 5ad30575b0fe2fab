"""Perplexity over token windows, and agreement (KL, top-1) with a reference model
computed in the same pass."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0].float()


@torch.inference_mode()
def perplexity(model, windows, reference=None, progress: bool = True, desc: str = "perplexity") -> dict:
    """``windows``: ``(ids, first scored position)`` pairs from :func:`eval_windows`.

    Returns ``perplexity`` = exp(mean NLL over scored positions), ``tokens`` scored,
    ``nll``; with a ``reference`` model also ``kl`` = mean KL(reference ‖ model) of the
    next-token distributions and ``top1_agreement`` over the same positions.
    """
    nll_sum, count, kl_sum, agree = 0.0, 0, 0.0, 0
    for ids, first in tqdm(windows, desc=desc, unit="window", disable=not progress):
        logp = F.log_softmax(_logits(model, ids)[first - 1:-1], dim=-1)   # predicts ids[first:]
        targets = ids[first:]
        nll_sum += -logp.gather(1, targets.unsqueeze(1)).sum().item()
        count += targets.numel()
        if reference is not None:
            ref_logp = F.log_softmax(_logits(reference, ids)[first - 1:-1], dim=-1)
            kl_sum += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
    if count == 0:
        return {"perplexity": None, "tokens": 0, "nll": None}
    result = {"perplexity": math.exp(nll_sum / count), "tokens": count, "nll": nll_sum / count}
    if reference is not None:
        result.update(kl=kl_sum / count, top1_agreement=agree / count)
    return result
