"""The one home of quantisation arithmetic: choose parameters, quantise, dequantise.

Weights are ``[out, in]``. Scales/zero-points have shape ``[out, n_groups]``
(per-channel: one group spanning all columns; per-tensor: a ``[1, 1]`` broadcast).
Asymmetric quantisation uses an integer zero-point, like GGUF's Q4_1 family.
Scales are stored in float16 and zero-points in uint8 (as GGUF stores its block
scales), so codes are chosen against the float16-rounded scale.
"""

from __future__ import annotations

import torch

from slimformer.errors import QuantConfigError
from slimformer.formats.spec import ActSpec, WeightSpec

_EPS = 1e-12
_MIN_STORED_SCALE = 2.0**-24   # the smallest float16 subnormal: a stored scale is never 0


def group_view(weight: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """``[out, in]`` → ``[out, n_groups, group]`` (or ``[1, 1, out*in]`` per tensor)."""
    out_features, in_features = weight.shape
    if spec.granularity == "tensor":
        return weight.reshape(1, 1, -1)
    if spec.granularity == "channel":
        return weight.reshape(out_features, 1, in_features)
    if in_features % spec.group_size:
        raise QuantConfigError(
            f"group_size {spec.group_size} does not divide the layer's {in_features} input columns"
        )
    return weight.reshape(out_features, in_features // spec.group_size, spec.group_size)


def choose_qparams(grouped: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scale and integer zero-point over the last dimension."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        absmax = grouped.abs().amax(dim=-1)
        scale = (absmax / qmax).clamp_min(_EPS)
        zero = torch.zeros_like(scale)
    else:
        qmax = 2**bits - 1
        lo = grouped.amin(dim=-1).clamp_max(0)  # the grid always holds 0 exactly
        hi = grouped.amax(dim=-1).clamp_min(0)
        scale = ((hi - lo) / qmax).clamp_min(_EPS)
        zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def _round_up_to_float16(scale: torch.Tensor) -> torch.Tensor:
    """The nearest float16 value not below ``scale``: the grid still spans the range."""
    half = scale.to(torch.float16)
    up = torch.nextafter(half, torch.full_like(half, float("inf")))
    return torch.where(half.float() < scale, up, half).float()


def storable_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scale as it will be stored: float16, never zero, rounded up so the grid still
    spans the range it was chosen for (codes must be chosen against this value)."""
    return _round_up_to_float16(scale.clamp_min(_MIN_STORED_SCALE))


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward (bit for bit), identity gradient (straight-through)."""
    return torch.round(x).detach() + (x - x.detach())


def ste_value(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward (bit for bit), the gradient of ``x`` (straight-through):
    e.g. a learned scale used at its stored float16 value."""
    return value.detach() + (x - x.detach())


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in the forward (bit for bit), gradient multiplied by ``factor`` (LSQ)."""
    y = x * factor
    return x.detach() + (y - y.detach())


def quantize_grouped(grouped: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: WeightSpec,
                     rounding=torch.round) -> torch.Tensor:
    """The integer grid values ``clamp(round(w / scale) + zero)`` of a grouped weight
    ``[rows, groups, group]`` (float tensor holding integers; signed for symmetric formats)
    against a given (already storable) scale and integer zero-point ``[rows, groups]``.
    ``rounding=ste_round`` gives the same values with straight-through gradients (QAT)."""
    q = rounding(grouped / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    return q.clamp(spec.qmin, spec.qmax)


def codes_from_grid(q: torch.Tensor, spec: WeightSpec, shape: torch.Size) -> torch.Tensor:
    """Grid values → stored uint8 codes ``[out, in]`` (symmetric codes offset by ``2^(bits-1)``)."""
    offset = 2 ** (spec.bits - 1) if spec.symmetric else 0
    return (q.detach() + offset).to(torch.uint8).reshape(shape)


def quantize_weight(
    weight: torch.Tensor, spec: WeightSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round to nearest. Returns (codes ``[out, in]`` as uint8 in ``0..2^bits-1``,
    scale ``[out|1, groups]`` (float32 holding float16 values), zero ``[out|1, groups]``
    (integers)) — codes are stored unsigned; symmetric codes are offset by ``2^(bits-1)``."""
    w = weight.detach().float()
    grouped = group_view(w, spec)
    scale, zero = choose_qparams(grouped, spec.bits, spec.symmetric)
    scale = storable_scale(scale)
    codes = codes_from_grid(quantize_grouped(grouped, scale, zero, spec), spec, weight.shape)
    return codes, scale, zero


def dequantize_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: WeightSpec, shape: torch.Size
) -> torch.Tensor:
    """``(codes − offset − zero) × scale``, in place on one float buffer (this runs in
    every forward of the reference QuantLinear, so fewer passes matter)."""
    offset = 2 ** (spec.bits - 1) if spec.symmetric else 0
    q = group_view(codes.reshape(shape).to(torch.float32), spec)
    if zero is not None and zero.numel():
        q.sub_(zero.float().unsqueeze(-1) + offset)
    elif offset:
        q.sub_(offset)
    return q.mul_(scale.float().unsqueeze(-1)).reshape(shape)


def fake_quantize_weight(weight: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """Quantise and dequantise (same dtype as the input)."""
    codes, scale, zero = quantize_weight(weight, spec)
    return dequantize_weight(codes, scale, zero, spec, weight.shape).to(weight.dtype)


def activation_scale(x: torch.Tensor, spec: ActSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic parameters for activations ``[..., features]``: per token (last dim
    reduced) or per tensor."""
    flat = x.detach().float()
    grouped = flat.reshape(1, -1) if spec.granularity == "tensor" else flat.reshape(-1, flat.shape[-1])
    scale, zero = choose_qparams(grouped, spec.bits, spec.symmetric)
    if spec.granularity == "tensor":
        return scale.reshape(()), zero.reshape(())
    return scale.reshape(*x.shape[:-1], 1), zero.reshape(*x.shape[:-1], 1)


def fake_quantize_activation(
    x: torch.Tensor, spec: ActSpec, static_scale: torch.Tensor | None = None,
    static_zero: torch.Tensor | None = None, rounding=torch.round,
) -> torch.Tensor:
    """Quantise-dequantise activations; static parameters when given, else dynamic.
    ``rounding=ste_round`` (QAT): the same values, straight-through gradients to ``x`` inside
    the clipping range and LSQ gradients to a learned ``static_scale``."""
    if static_scale is not None:
        scale = static_scale
        zero = static_zero if static_zero is not None else torch.zeros_like(static_scale)
    else:
        scale, zero = activation_scale(x, spec)
    lo, hi = (spec.qmin, spec.qmax)
    q = (rounding(x.float() / scale) + zero).clamp(lo, hi)
    return ((q - zero) * scale).to(x.dtype)


def static_act_params(lo: float, hi: float, spec: ActSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scale and zero-point covering the observed range [lo, hi]."""
    from slimformer.formats.primitives import choose_qparams

    observed = torch.tensor([[min(lo, 0.0), max(hi, 0.0)]])
    if spec.symmetric:
        observed = observed.abs()
    scale, zero = choose_qparams(observed, spec.bits, spec.symmetric)
    return scale.reshape(()), zero.reshape(())
