"""FakeQuantLinear: the training-time twin of :class:`~slimformer.nn.quant_linear.QuantLinear`.

It holds the float latent weight (a Parameter), the bias, the weight format and optionally
an activation format. Its forward computes with the weight the deployed ``QuantLinear``
will hold: grid values ``clamp(round(W / s) + z)`` against the float16-stored scale ``s``
and integer zero-point ``z`` (``formats/primitives.quantize_grouped``, the arithmetic RTN
and GPTQ use), dequantised as ``(q − z) · s`` — bit for bit the weight
``QuantLinear.dequantized_weight`` rebuilds from the codes :meth:`to_quant_linear` writes.
Gradients pass straight through the rounding (STE) and stop outside the clipping range.

Scales: fixed (from the initialisation: RTN min/max, or the scales of a ``QuantLinear``
such as GPTQ's result), or learned (LSQ, Esser et al. 2020): the latent scale is
``s₀ · exp(ρ · θ)`` with the parameter θ (starting at 0, so the first forward uses ``s₀``
exactly); ``ρ`` (``scale_lr_ratio``) multiplies the step Adam takes on log s relative to the
weights' learning rate — the trainer has one learning rate, so this is how the scales get
their own. The forward uses the latent scale rounded up to float16 (``storable_scale``, what
the saved file holds) with a straight-through gradient, and the gradient reaching the scale is
multiplied by 1/√(n·Q_P) (n weights per scale, Q_P the grid's positive end), as in LSQ (Adam
is insensitive to that constant; it matters for clipping and plain SGD).
Zero-points (asymmetric formats) stay the integers they were initialised with.

Activations: dynamic per token (no parameters; straight-through) or static per tensor:
a learned clipping value α (PACT-style, trained with the LSQ gradient of the step
``α / Q_P``), initialised from the range the first training batch shows; symmetric only.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimformer.errors import QuantConfigError
from slimformer.formats.primitives import (
    choose_qparams,
    codes_from_grid,
    fake_quantize_activation,
    grad_scale,
    group_view,
    quantize_grouped,
    ste_round,
    ste_value,
    storable_scale,
)
from slimformer.formats.spec import ActSpec, WeightSpec
from slimformer.nn.quant_linear import QuantLinear
from slimformer.nn.surgery import linear_weight

# A stored scale of 2^-24 (float16's smallest) is the floor storable_scale clamps to: a
# learned scale below it has collapsed.
MIN_SCALE = 2.0**-24


class FakeQuantLinear(nn.Module):
    """``y = fq_a(x) @ fq_w(W)ᵀ + b`` with straight-through gradients (see the module doc)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, weight_spec: WeightSpec,
                 act_spec: ActSpec | None = None, *, scale: torch.Tensor | None = None,
                 zero: torch.Tensor | None = None, learn_scale: bool = False, scale_lr_ratio: float = 1.0,
                 learn_act_clip: bool = False):
        """``weight`` ``[out, in]``; ``scale``/``zero`` ``[out|1, groups]`` as ``quantize_weight``
        returns them (default: RTN's min/max choice on ``weight``)."""
        super().__init__()
        out_features, in_features = weight.shape
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec, self.act_spec = weight_spec, act_spec
        grouped = group_view(weight.detach().float(), weight_spec)   # refuses a group size that does not divide
        if scale is None:
            scale, zero = choose_qparams(grouped, weight_spec.bits, weight_spec.symmetric)
            scale = storable_scale(scale)
        if zero is None or not zero.numel():
            zero = torch.zeros_like(scale)
        expected = grouped.shape[:2]
        if tuple(scale.shape) != tuple(expected) or tuple(zero.shape) != tuple(expected):
            raise QuantConfigError(f"scale/zero of shape {tuple(scale.shape)}/{tuple(zero.shape)} do not fit "
                                   f"{weight_spec.describe()} on a [{out_features}, {in_features}] weight")
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.register_buffer("scale_init", storable_scale(scale.float()).clone())
        self.register_buffer("zero", zero.float().round().clone())
        self.learn_scale, self.scale_lr_ratio = learn_scale, float(scale_lr_ratio)
        self.log_scale = nn.Parameter(torch.zeros_like(self.scale_init)) if learn_scale else None
        per_scale = grouped.shape[-1]
        self._scale_grad = 1.0 / math.sqrt(per_scale * weight_spec.qmax)
        static = act_spec is not None and not act_spec.dynamic
        if static and not act_spec.symmetric:
            raise QuantConfigError("QAT learns static activation clipping for symmetric formats only "
                                   "(act_symmetric: true)")
        self.learn_act_clip = static and learn_act_clip
        # static activations: the clip value α (step α / Q_P), set from the first batch (act_ready)
        self.register_buffer("act_clip_init", torch.ones(()) if static else None)
        self.register_buffer("act_ready", torch.zeros((), dtype=torch.bool) if static else None)
        self.act_log_clip = nn.Parameter(torch.zeros(())) if self.learn_act_clip else None
        self._observe: list[float] | None = None   # running max |x| while the first batch calibrates

    # ------------------------------------------------------------------ parameters
    def latent_scale(self) -> torch.Tensor:
        """The float scale being learned (``scale_init`` when scales are fixed)."""
        if self.log_scale is None:
            return self.scale_init
        return self.scale_init * torch.exp(self.log_scale * self.scale_lr_ratio)

    def forward_scale(self) -> torch.Tensor:
        """The scale the forward uses: the latent one as it will be stored (float16, rounded up)."""
        latent = self.latent_scale()
        if self.log_scale is None:
            return latent
        latent = grad_scale(latent, self._scale_grad)
        return ste_value(latent, storable_scale(latent.detach()))

    def fake_quant_weight(self) -> torch.Tensor:
        scale = self.forward_scale()
        grouped = group_view(self.weight, self.weight_spec)
        q = quantize_grouped(grouped, scale, self.zero, self.weight_spec, rounding=ste_round)
        return ((q - self.zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(self.weight.shape)

    def act_scale(self) -> torch.Tensor | None:
        """The static activation step ``α / Q_P`` (float32, as ``QuantLinear.act_scale`` stores it)."""
        if self.act_clip_init is None:
            return None
        clip = self.act_clip_init
        if self.act_log_clip is not None:
            clip = clip * torch.exp(self.act_log_clip * self.scale_lr_ratio)
            clip = grad_scale(clip, 1.0 / math.sqrt(self.in_features * self.act_spec.qmax))
        return clip / self.act_spec.qmax

    # ------------------------------------------------------------------ forward
    def start_observing(self) -> None:
        self._observe = [0.0]

    def finish_observing(self) -> None:
        """Set the clip value from the observed range (once; a resumed run loads it)."""
        seen, self._observe = self._observe, None
        if seen is None or self.act_clip_init is None:
            return
        with torch.no_grad():
            self.act_clip_init.fill_(max(seen[0], 1e-8))
            self.act_ready.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_spec is not None:
            if self._observe is not None:
                self._observe[0] = max(self._observe[0], float(x.detach().abs().max()))
            elif self.act_spec.dynamic:
                x = fake_quantize_activation(x, self.act_spec, rounding=ste_round)
            else:
                if not bool(self.act_ready):
                    raise QuantConfigError("FakeQuantLinear: static activation range not calibrated "
                                           "(run a batch between start_observing and finish_observing)")
                x = fake_quantize_activation(x, self.act_spec, self.act_scale(), torch.zeros(()),
                                             rounding=ste_round)
        return F.linear(x, self.fake_quant_weight().to(x.dtype), self.bias)

    # ------------------------------------------------------------------ deployment
    @torch.no_grad()
    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes ``[out, in]`` uint8, stored scale, zero) — exactly what the forward uses."""
        scale = self.forward_scale().detach()
        grouped = group_view(self.weight.detach(), self.weight_spec)
        q = quantize_grouped(grouped, scale, self.zero, self.weight_spec)
        return codes_from_grid(q, self.weight_spec, self.weight.shape), scale, self.zero

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        """The deployed ``QuantLinear`` with the codes and scales this forward uses."""
        codes, scale, zero = self.quantized()
        bias = None if self.bias is None else self.bias.detach()
        module = QuantLinear.from_float(self.weight.detach(), bias, self.weight_spec, self.act_spec,
                                        codes=codes, scale=scale, zero=zero)
        if self.act_clip_init is not None:
            module.act_scale = self.act_scale().detach().float().reshape(()).clone()
            module.act_zero = torch.zeros(())
        return module

    @classmethod
    def from_module(cls, module: nn.Module, weight_spec: WeightSpec, act_spec: ActSpec | None = None,
                    **kwargs) -> "FakeQuantLinear":
        """From a float Linear (RTN initialisation) or a ``QuantLinear`` of the same format
        (latent weight = its dequantised weight, its scales and zero-points: the first forward
        reproduces it exactly)."""
        if isinstance(module, QuantLinear):
            if module.weight_spec != weight_spec:
                raise QuantConfigError(f"the layer is {module.weight_spec.describe()} already; QAT was asked for "
                                       f"{weight_spec.describe()} (give QAT the same format)")
            if module.act_spec is not None and module.act_spec != act_spec:
                raise QuantConfigError(f"the layer quantises its inputs as {module.act_spec}; QAT was asked for "
                                       f"{act_spec}")
            zero = module.zero.float() if module.zero.numel() else None
            fq = cls(module.dequantized_weight().float(), module.bias, weight_spec, act_spec,
                     scale=module.scale.float(), zero=zero, **kwargs)
            if fq.act_clip_init is not None and module.act_scale is not None:
                if module.act_zero is not None and float(module.act_zero) != 0:
                    raise QuantConfigError("QAT starts static activations from symmetric scales only")
                fq.act_clip_init.fill_(float(module.act_scale) * act_spec.qmax)
                fq.act_ready.fill_(True)
            return fq
        bias = getattr(module, "bias", None)
        return cls(linear_weight(module).detach(), bias, weight_spec, act_spec, **kwargs)

    def extra_repr(self) -> str:
        act = "" if self.act_spec is None else f", act=a{self.act_spec.bits}-{self.act_spec.granularity}"
        learned = ", learned scales" if self.log_scale is not None else ""
        return f"{self.in_features}, {self.out_features}, {self.weight_spec.describe()}{act}{learned}"
