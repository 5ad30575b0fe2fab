"""HAWQ (Dong et al. 2019; the trace-based metric of HAWQ-v2): give each layer the bits
it can afford to lose the least.

Sensitivity of layer l is the average Hessian trace, with respect to its weights, of
the distance between the model's output and the full-precision output on calibration data
(KL for language models, see ``_loss``), Tr(H_l)/n_l, estimated with Hutchinson's method (E[vᵀHv] over Rademacher
v; Hv by double back-propagation). Quantising it to b bits is expected to cost
Ω_l(b) = Tr(H_l)/n_l · ‖Q_b(W_l) − W_l‖². Bits are chosen per layer from ``bit_choices``
to minimise Σ Ω_l(b_l) subject to the average bits over the quantised weights being at
most ``budget_bits`` (a multiple-choice knapsack, solved exactly by dynamic programming).

HAWQ only decides: it writes ``plan["bits"]`` (full layer name → bits), and the stage
after it (GPTQ or RTN, with the same granularity) quantises each layer at those bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from slimformer.core.transform import BlockContext, Needs, Transform, register
from slimformer.errors import QuantConfigError
from slimformer.formats.primitives import fake_quantize_weight
from slimformer.formats.spec import WeightSpec
from slimformer.nn.surgery import linear_weight

_DP_UNITS = 20000   # budget resolution of the knapsack (layer sizes are rounded up to it)


@register
@dataclass(frozen=True)
class HAWQ(Transform):
    budget_bits: float = 4.5
    bit_choices: tuple[int, ...] | list = (2, 3, 4, 8)
    symmetric: bool = True
    granularity: Literal["tensor", "channel", "group"] = "channel"
    group_size: int | None = None
    samples: int = 4          # calibration sequences for the trace estimate
    probes: int = 8           # Hutchinson vectors per sequence
    seed: int = 0

    needs = Needs.CALIBRATION

    def __post_init__(self):
        choices = tuple(self.bit_choices)
        object.__setattr__(self, "bit_choices", choices)
        if not choices or any(not isinstance(b, int) or isinstance(b, bool) for b in choices):
            raise QuantConfigError(f"bit_choices must be a list of integers, got {list(choices)!r}")
        for bits in choices:
            self.weight_spec(bits)   # validates the range and the granularity
        if not min(choices) <= self.budget_bits:
            raise QuantConfigError(f"budget_bits {self.budget_bits} is below the smallest choice, {min(choices)} bits")
        if self.samples < 1 or self.probes < 1:
            raise QuantConfigError("samples and probes must be positive")

    def weight_spec(self, bits: int) -> WeightSpec:
        return WeightSpec(bits, self.symmetric, self.granularity, self.group_size)

    def plan_model(self, model: nn.Module, adapter, calib, plan: dict) -> None:
        blocks = adapter.get_blocks(model)
        layers = {f"{adapter.blocks}.{i}.{name}": block.get_submodule(name)
                  for i, block in enumerate(blocks) for name in self.targets.select(adapter.linears, i)}
        traces = hutchinson_traces(model, {n: linear_weight(m) for n, m in layers.items()}, calib[: self.samples],
                                   self.probes, self.seed)
        cost = {}
        for name, module in layers.items():
            weight = linear_weight(module).detach().float()
            per_weight = traces[name] / weight.numel()
            errors = []
            for bits in self.bit_choices:
                try:
                    err = (fake_quantize_weight(weight, self.weight_spec(bits)) - weight).square().sum().item()
                except QuantConfigError as exc:
                    raise QuantConfigError(f"{name}: {exc}") from None
                errors.append(per_weight * err)
            cost[name] = errors
        sizes = {name: linear_weight(m).numel() for name, m in layers.items()}
        bits = allocate_bits(cost, sizes, self.bit_choices, self.budget_bits)
        plan["bits"] = bits
        plan["bits_format"] = (self.granularity, self.group_size, self.symmetric)
        plan["hawq"] = {name: {"hessian_trace": traces[name], "bits": bits[name]} for name in layers}

    def convert(self, block: nn.Module, ctx: BlockContext) -> None:
        """Nothing to change: record each layer's trace and bits."""
        for name in self.targets.select(ctx.adapter.linears, ctx.index):
            facts = ctx.plan["hawq"].get(f"{ctx.prefix}.{name}")
            if facts:
                ctx.report(name, hawq_bits=facts["bits"], hessian_trace=facts["hessian_trace"])


def hutchinson_traces(model: nn.Module, weights: dict[str, torch.Tensor], calib: torch.Tensor, probes: int,
                      seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Tr(∂²L/∂W²) for each weight in ``weights`` (L: see ``_loss``) on the sequences of
    ``calib``, averaged
    over sequences, by Hutchinson's estimator with ``probes`` Rademacher vectors each."""
    params = list(weights.values())
    saved = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    generator = torch.Generator().manual_seed(seed)
    totals = torch.zeros(len(params), dtype=torch.float64)
    try:
        # SDPA's fused CPU kernels have no double backward; the math backend is plain ops.
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), tqdm(total=len(calib) * probes, desc="HAWQ Hessian traces", unit="probe",
                                       disable=not progress, leave=False) as bar:
            for ids in calib:
                loss = _loss(model, ids[None], _reference_output(model, ids[None]))
                grads = torch.autograd.grad(loss, params, create_graph=True)
                for _ in range(probes):
                    vs = [torch.randint(0, 2, p.shape, generator=generator).to(p.dtype).mul_(2).sub_(1) for p in params]
                    hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
                    totals += torch.tensor([(hv * v).sum().item() for hv, v in zip(hvs, vs)], dtype=torch.float64)
                    bar.update()
                del grads, loss
    finally:
        for p, flag in zip(model.parameters(), saved):
            p.requires_grad_(flag)
    totals /= len(calib) * probes
    return {name: max(float(t), 0.0) for name, t in zip(weights, totals)}


def _loss(model: nn.Module, ids: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """How far the output is from the full-precision output: KL divergence of the next-token
    distributions (decoders), mean squared difference (encoders). At the original weights it
    is zero with zero gradient, and its Hessian there is positive semi-definite (Fisher /
    Gauss-Newton), so every Hutchinson sample vᵀHv is ≥ 0: it measures how much a weight
    perturbation moves the output. (The task loss's Hessian is indefinite away from a
    minimum, and its trace estimates come out negative for some layers.)"""
    out = _output(model(input_ids=ids))
    if out.dim() == 3 and hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        return nn.functional.kl_div(out[0].float().log_softmax(-1), reference[0].float().log_softmax(-1),
                                    log_target=True, reduction="batchmean")
    return (out - reference).square().mean()


def _output(out) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _reference_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _output(model(input_ids=ids)).detach()


def allocate_bits(cost: dict[str, list[float]], sizes: dict[str, int], choices: tuple[int, ...],
                  budget_bits: float) -> dict[str, int]:
    """Choose one of ``choices`` per layer minimising Σ cost under Σ bits·size ≤ budget·Σ size.

    Exact dynamic programming over the budget in ``_DP_UNITS`` steps; each layer's size is
    rounded *up* to a step, so the result never exceeds the budget."""
    names = list(cost)
    total = sum(sizes.values())
    capacity_bits = budget_bits * total
    unit = capacity_bits / _DP_UNITS
    cap = _DP_UNITS
    inf = float("inf")
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    choice_of = np.zeros((len(names), cap + 1), dtype=np.int8)
    for li, name in enumerate(names):
        new = np.full(cap + 1, inf)
        for ci, bits in enumerate(choices):
            weight = int(np.ceil(bits * sizes[name] / unit - 1e-9))
            if weight > cap:
                continue
            candidate = np.full(cap + 1, inf)
            candidate[weight:] = best[: cap + 1 - weight] + cost[name][ci]
            better = candidate < new
            new[better] = candidate[better]
            choice_of[li][better] = ci
        best = new
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        raise QuantConfigError(f"budget_bits {budget_bits} cannot hold every layer at {min(choices)} bits")
    bits = {}
    for li in range(len(names) - 1, -1, -1):
        ci = int(choice_of[li][end])
        bits[names[li]] = choices[ci]
        end -= int(np.ceil(choices[ci] * sizes[names[li]] / unit - 1e-9))
    return dict(reversed(list(bits.items())))


def average_bits(bits: dict[str, int], sizes: dict[str, int]) -> float:
    return sum(bits[n] * sizes[n] for n in bits) / sum(sizes[n] for n in bits)
