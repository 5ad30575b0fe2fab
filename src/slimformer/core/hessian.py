"""Second-order layer compression (the Optimal Brain Surgeon family): GPTQ (Frantar et al.
2022) and SparseGPT (Frantar & Alistarh 2023) share everything here.

A layer's squared output error over calibration inputs X is a quadratic form in the
weight error with Hessian H = 2 XᵀX / n, the same for every output row. Both methods
visit the input columns in order; each column's weights are set to their compressed
values (quantised, pruned, or both), and the error this makes is pushed onto the columns
not yet visited, weighted by the inverse Hessian — through the upper Cholesky factor U of
H⁻¹ (H⁻¹ = UᵀU), whose row i is the OBS update restricted to the columns from i on.
Updates inside a block of ``block_size`` columns are applied at once to the rest
(lazy batch updates: the same arithmetic, far fewer passes over the weight).

SparseGPT's masks: unstructured, the pruned weights of each block of columns are chosen
together, by the OBS saliency w² / [H⁻¹]²_jj over the block's weights as updated so far
(adaptive mask selection: the pattern follows the error compensation); N:M, the N
kept of every M columns are chosen when the first of the M is reached.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from slimformer.errors import QuantConfigError, SparsityConfigError
from slimformer.formats.masks import check_nm, check_nm_fits, check_sparsity
from slimformer.formats.primitives import choose_qparams, storable_scale
from slimformer.formats.spec import WeightSpec

_CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(17))   # 1.0 … 0.6
_MAX_DAMPENING_STEPS = 6


class HessianWarning(UserWarning):
    pass


@dataclass
class PreparedHessian:
    inverse_cholesky: torch.Tensor   # upper Cholesky factor of H⁻¹, columns in visiting order
    perm: torch.Tensor | None        # visiting order (act-order), None for 0..K-1
    importance: torch.Tensor         # diag(H) in the original column order (for clip search)
    dead: torch.Tensor               # inputs that were always zero
    dampening: float                 # the dampening finally used (fraction of mean diagonal)


def hessian_sum(x: torch.Tensor) -> torch.Tensor:
    """2 XᵀX over the tokens of ``x`` (``[..., in]``), unnormalised (sums add up)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    return (flat.T @ flat).mul_(2.0)


def hessian_of(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """H = 2 XᵀX / n and n, the number of tokens."""
    tokens = x.numel() // x.shape[-1]
    return hessian_sum(x).div_(tokens), tokens


def accumulate(store: dict, key: str, x: torch.Tensor) -> None:
    """Add ``x``'s 2XᵀX and token count to ``store[key]`` (two-pass calibration)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    total, count = store.get(key, (torch.zeros(flat.shape[1], flat.shape[1]), 0))
    store[key] = (total.addmm_(flat.T, flat, alpha=2.0), count + flat.shape[0])


def prepare_hessian(hessian: torch.Tensor, act_order: bool, dampening: float, label: str = "layer") -> PreparedHessian:
    """Dampen, (act-order) permute, and factor H⁻¹ = UᵀU. The factorisation runs in
    float64: cheap at these sizes, and it keeps nearly singular Hessians usable. An
    ill-conditioned Hessian gets more dampening, with a warning naming the layer."""
    H = hessian.detach().double().clone()
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    importance = diag.float().clone()
    perm = torch.argsort(diag, descending=True) if act_order else None
    if perm is not None:
        H = H[perm][:, perm]
    mean_diag = H.diagonal().mean().item()
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    fraction = dampening
    for step in range(_MAX_DAMPENING_STEPS):
        L, info = torch.linalg.cholesky_ex(H + fraction * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                if step:
                    warnings.warn(f"{label}: the calibration Hessian is ill-conditioned; dampening raised from "
                                  f"{dampening:g} to {fraction:g} of its mean diagonal", HessianWarning, stacklevel=3)
                return PreparedHessian(U.float(), perm, importance, dead, fraction)
        fraction *= 10
    raise QuantConfigError(f"{label}: the calibration Hessian is singular even with dampening {fraction / 10:g}; "
                           "use more calibration data")


def clip_params(w: torch.Tensor, spec: WeightSpec, importance: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point for each row of ``w`` ([rows, cols]), as stored (float16
    scale): min/max, or the clipping ratio with the least importance-weighted error
    (``importance``: the Hessian diagonal of the columns, a cheap proxy of the output error)."""
    scale, zero = choose_qparams(w, spec.bits, spec.symmetric)
    scale = storable_scale(scale)
    if importance is None:
        return scale, zero
    best_err = None
    lo_all, hi_all = w.amin(dim=1).clamp_max(0), w.amax(dim=1).clamp_min(0)
    for ratio in _CLIP_GRID:
        if spec.symmetric:
            s = storable_scale(torch.maximum(-lo_all, hi_all) * ratio / spec.qmax)
            z = torch.zeros_like(s)
        else:
            s = storable_scale((hi_all - lo_all) * ratio / spec.qmax)
            z = torch.round(-lo_all * ratio / s).clamp(0, spec.qmax)
        q = (torch.round(w / s[:, None]) + z[:, None]).clamp(spec.qmin, spec.qmax)
        err = ((q - z[:, None]) * s[:, None] - w).square_() @ importance
        if best_err is None:
            best_err, scale, zero = err, s, z
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


@dataclass
class Compressed:
    """What :func:`obs_compress` made of a weight ``[out, in]`` (original column order)."""

    weight: torch.Tensor                 # the compressed weight as floats (pruned zeros, dequantised values)
    mask: torch.Tensor | None = None     # kept weights (True), when pruning
    codes: torch.Tensor | None = None    # uint8 stored codes (symmetric offset by 2^(bits-1)), when quantising
    scale: torch.Tensor | None = None    # [out|1, groups]
    zero: torch.Tensor | None = None     # [out|1, groups]


def obs_compress(weight: torch.Tensor, prepared: PreparedHessian, spec: WeightSpec | None = None, *,
                 block_size: int = 128, static_groups: bool = True, clip_search: bool = True,
                 sparsity: float = 0.0, n: int = 0, m: int = 0, row_splits: list[int] | None = None,
                 name: str = "layer") -> Compressed:
    """Compress ``weight`` column by column with error feedback: quantise to ``spec``
    (GPTQ), prune to ``sparsity`` unstructured or ``n``:``m`` (SparseGPT), or both
    (SparseGPT's joint mode: pruned weights take the zero code, kept ones are quantised).

    Without ``spec``, the weight is pruned (``sparsity`` 0 prunes nothing and returns it
    unchanged). Unstructured: each block of ``block_size`` columns prunes its share of the
    weights (cumulative rounding, so the layer prunes exactly ``round(sparsity · numel)``);
    ``row_splits`` (row counts of layers stacked in ``weight``, sharing one Hessian) makes
    that share per layer. N:M: in every ``m`` consecutive input columns of a row, ``n`` are kept."""
    W = weight.detach().float().clone()
    N, K = W.shape
    nm = n > 0
    prune = nm or spec is None
    if nm:
        check_nm(n, m)
        check_nm_fits(name, K, m)
        if block_size % m:
            raise SparsityConfigError(f"{name}: block_size {block_size} is not a multiple of M={m}")
    else:
        check_sparsity(sparsity)
    if prune and prepared.perm is not None:
        raise SparsityConfigError(f"{name}: pruning visits columns in their own order (no act_order)")
    segments = list(row_splits) if row_splits else [N]
    if sum(segments) != N:
        raise ValueError(f"row_splits {segments} do not add up to the {N} rows")
    W[:, prepared.dead] = 0

    quant = spec is not None
    if quant:
        group = spec.group_size if spec.granularity == "group" else K
        if K % group:
            raise QuantConfigError(f"group_size {group} does not divide the layer's {K} input columns")
        n_groups = K // group
        rows = 1 if spec.granularity == "tensor" else N
        importance = prepared.importance if clip_search else None
        scale = torch.empty(rows, n_groups)
        zero = torch.zeros(rows, n_groups)
        # Ranges fixed up front: per tensor, per channel, or static groups (original order).
        upfront = spec.granularity != "group" or static_groups
        if spec.granularity == "tensor":
            imp = None if importance is None else importance.repeat(N)
            s, z = clip_params(W.reshape(1, -1), spec, imp)
            scale[:], zero[:] = s[:, None], z[:, None]
        elif upfront:
            for g in range(n_groups):
                cols = slice(g * group, (g + 1) * group)
                scale[:, g], zero[:, g] = clip_params(W[:, cols], spec, None if importance is None else importance[cols])
        codes = torch.empty(N, K, dtype=torch.uint8)
        offset = 2 ** (spec.bits - 1) if spec.symmetric else 0
        qmin, qmax = spec.qmin, spec.qmax

    perm = prepared.perm
    if perm is not None:
        W = W[:, perm]
    order = perm if perm is not None else torch.arange(K)
    if quant:
        group_of = (order // group).tolist()
        codes_t = torch.empty(K, N, dtype=torch.uint8)
    U = prepared.inverse_cholesky
    # Transposed ([in, out]): a column of W is a contiguous row here, and each update
    # below runs over contiguous memory (3-5x faster than strided columns on a CPU).
    Wt = W.t().contiguous()
    mask_t = torch.ones(K, N, dtype=torch.bool) if prune else None
    for start in range(0, K, block_size):
        stop = min(start + block_size, K)
        W1 = Wt[start:stop].clone()
        err_block = torch.empty_like(W1)
        U1 = U[start:stop, start:stop]
        inv_diag_sq = U1.diagonal().square()
        keep1 = mask_t[start:stop] if prune else None   # a view: written in place
        if prune and not nm:
            # this block's share of the pruned weights, smallest saliency w² / [H⁻¹]²_jj first
            first = 0
            for rows_of in segments:
                part = slice(first, first + rows_of)
                first += rows_of
                count = round(sparsity * rows_of * stop) - round(sparsity * rows_of * start)
                if count:
                    saliency = (W1[:, part].square() / inv_diag_sq[:, None]).t().flatten()
                    keep = torch.ones(saliency.numel(), dtype=torch.bool)
                    keep[saliency.topk(count, largest=False, sorted=False).indices] = False
                    keep1[:, part] = keep.view(rows_of, -1).t()
        # Two-level lazy updates: each column updates only the rest of its sub-block of
        # ``inner`` columns; a sub-block's errors reach the rest of the block in one matmul.
        # (Dynamic quantisation groups read columns ahead, so they keep column-wide updates.)
        width = stop - start
        inner = width if quant and not upfront else max(m, 16 // m * m) if nm else 16
        for sub in range(0, width, inner):
            sub_stop = min(sub + inner, width)
            for i in range(sub, sub_stop):
                col = start + i
                w = W1[i]
                if nm and i % m == 0:
                    saliency = W1[i:i + m].square() / inv_diag_sq[i:i + m, None]
                    keep1[i:i + m].scatter_(0, saliency.topk(m - n, dim=0, largest=False).indices, False)
                if quant:
                    g = group_of[col]
                    if not upfront and col % group == 0:   # dynamic groups: range from the updated weights
                        cols = slice(col, col + group)
                        rest = W1[i:i + group] if i + group <= width else torch.cat([W1[i:], Wt[stop:col + group]])
                        scale[:, g], zero[:, g] = clip_params(rest.t(), spec,
                                                              None if importance is None else importance[cols])
                    s = scale[:, g] if rows == N else scale[0, g].expand(N)
                    z = zero[:, g] if rows == N else zero[0, g].expand(N)
                    q = torch.round(w / s).add_(z).clamp_(qmin, qmax)
                    if prune:
                        q = torch.where(keep1[i], q, z)   # the zero code: dequantises to exactly 0
                    codes_t[int(order[col])] = (q + offset).to(torch.uint8)
                    new = (q - z) * s
                else:
                    new = w * keep1[i]
                err = (w - new) / U1[i, i]
                W1[i:sub_stop].addr_(U1[i, i:sub_stop], err, alpha=-1.0)
                W1[i] = new
                err_block[i] = err
            if sub_stop < width:
                W1[sub_stop:].addmm_(U1[sub:sub_stop, sub_stop:].t(), err_block[sub:sub_stop], alpha=-1.0)
        Wt[start:stop] = W1
        if stop < K:
            Wt[stop:].addmm_(U[start:stop, stop:].t(), err_block, alpha=-1.0)
    W = Wt.t()
    mask = mask_t.t().contiguous() if prune else None
    if perm is not None:
        W = W[:, torch.argsort(perm)]
    W = W.contiguous()
    if not quant:
        return Compressed(W, mask)
    return Compressed(W, mask, codes_t.t().contiguous(), scale, zero)


def layer_output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    """‖W X − Ŵ X‖_F / ‖W X‖_F over inputs ``x`` ([tokens, in])."""
    ref = x @ weight.T
    return (torch.linalg.matrix_norm(ref - x @ approx.T) / torch.linalg.matrix_norm(ref)).item()


__all__ = ["Compressed", "HessianWarning", "PreparedHessian", "accumulate", "clip_params", "hessian_of",
           "hessian_sum", "layer_output_error", "obs_compress", "prepare_hessian"]
