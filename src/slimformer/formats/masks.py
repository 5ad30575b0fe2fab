"""Sparsity masks: which weights of a ``[out, in]`` matrix are kept (``True``) or pruned.

Three kinds, all scored by magnitude unless the caller passes other scores:
- unstructured, layer-wise: each layer keeps its own top ``1 - sparsity`` fraction;
- unstructured, global: one threshold over all layers, so sensitive (large-weight)
  layers keep more than others;
- N:M: in every group of M consecutive *input* weights of a row, N are kept (the
  layout sparse tensor cores and our compressed storage read).
"""

from __future__ import annotations

import torch

from slimformer.errors import SparsityConfigError


def check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise SparsityConfigError(f"sparsity must be in [0, 1), got {sparsity!r}")


def check_nm(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or n < 1 or m < 2:
        raise SparsityConfigError(f"N:M sparsity needs integers 1 <= N < M, got {n}:{m}")
    if n >= m:
        raise SparsityConfigError(f"N:M sparsity needs N < M, got {n}:{m}")


def check_nm_fits(name: str, in_features: int, m: int) -> None:
    if in_features % m:
        raise SparsityConfigError(f"{name}: M={m} does not divide its input size {in_features}")


def magnitude_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the ``round((1 - sparsity) * numel)`` largest ``|scores|`` (ties broken by position)."""
    check_sparsity(sparsity)
    flat = scores.detach().abs().flatten()
    keep = flat.numel() - int(round(sparsity * flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if keep > 0:
        mask[flat.float().topk(keep, sorted=False).indices] = True
    return mask.view_as(scores)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the ``in - round(sparsity * in)`` largest ``|scores|`` of every row (output)
    of ``[out, in]``: each output compares only its own weights (Wanda's comparison group)."""
    check_sparsity(sparsity)
    rows, cols = scores.shape
    keep = cols - int(round(sparsity * cols))
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    if keep > 0:
        mask.scatter_(1, scores.detach().abs().float().topk(keep, dim=1, sorted=False).indices, True)
    return mask


def global_threshold(scores: list[torch.Tensor], sparsity: float) -> float:
    """The magnitude below which weights are pruned so that ``sparsity`` of all of ``scores``
    together goes (one threshold for every layer)."""
    check_sparsity(sparsity)
    flat = torch.cat([s.detach().abs().flatten().float() for s in scores])
    prune = int(round(sparsity * flat.numel()))
    if prune == 0:
        return float("-inf")
    return float(flat.kthvalue(prune).values)


def threshold_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    return scores.detach().abs() > threshold


def nm_mask(scores: torch.Tensor, n: int, m: int, name: str = "weight") -> torch.Tensor:
    """Keep the ``n`` largest ``|scores|`` in every group of ``m`` consecutive input columns."""
    check_nm(n, m)
    rows, cols = scores.shape
    check_nm_fits(name, cols, m)
    groups = scores.detach().abs().float().reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return mask.reshape(rows, cols)


def is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether at most ``n`` of every ``m`` consecutive input weights are non-zero."""
    rows, cols = weight.shape
    if cols % m:
        return False
    return bool(((weight != 0).reshape(rows, cols // m, m).sum(-1) <= n).all())


def kept_magnitude(weight: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of the total ``|weight|`` the mask keeps (what channel permutation raises)."""
    total = weight.detach().abs().sum()
    return float((weight.detach().abs() * mask).sum() / total) if total > 0 else 1.0


def sparsity_of(mask: torch.Tensor) -> float:
    return 1.0 - float(mask.float().mean())
