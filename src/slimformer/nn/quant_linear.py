"""QuantLinear: a Linear that stores packed integer weights and computes correctly.

``forward`` runs the fast CPU kernels of ``slimformer.kernels`` (weight-only int8,
int2-4 group-wise, dynamic per-token W8A8), prepared for their runtime layout on first
use. ``forward_reference`` unpacks and dequantises the weight and calls ``F.linear``: the
definition the kernels are tested against. Formats no kernel covers (5-8 bits in groups,
static activation scales, activations other than dynamic int8 per token) and a machine
without the kernels run that reference on a dense weight dequantised once and cached; the
module's ``fallback`` says why, and each reason is warned once per process.

Stored layout of the codes (``qweight``), chosen so that the format description and the
saved file agree (``formats/matrix.py``):

- 4-bit codes with ``in_features % 32 == 0``: ``[out, in/2]`` bytes in the Q4 layout
  (``formats.matrix.pack_nibbles``: GGUF's block order, what ``kernels/decoder.cpp``
  reads). :meth:`matrix` hands these bytes over as they are, and a GGUF writer copies them.
  Compressed directories of format version 1 stored them as a flat bit stream; they are
  converted once, when their state dict is loaded (``_load_from_state_dict``), and a flat
  ``qweight`` bound directly (an offloaded v1 directory) is still read correctly.
  The int4 kernels (``kernels/kernels.cpp`` ``sf_w4_linear``/``sf_w4_dequant``) read
  this layout too: ``kernels.prepare_int4_q4`` hands ``qweight`` to them as it is (the
  same storage; no unpacking or repacking at load or first forward). What the first
  forward still builds is small: fp32 copies of the fp16 scales and the uint8
  ``zero + offset`` per group.
- other widths, and 4-bit rows not a multiple of 32: the dense bit stream of
  ``formats.packing`` (2- and 3-bit codes take 2 and 3 bits on disk; the runtime
  unpacks them to nibbles or bytes once, when it prepares a layer: for the int4 kernels,
  into the Q4 layout, a row of ``K % 32 == 16`` codes ending in a 16-code half block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimformer import kernels
from slimformer.errors import QuantConfigError
from slimformer.formats import packing
from slimformer.formats.matrix import (
    Q4,
    Q4_BLOCK,
    Q8,
    Q8A8,
    Q8A8G,
    CompressedMatrix,
    NotNative,
    maybe_half,
    pack_nibbles,
    unpack_nibbles,
)
from slimformer.formats.primitives import (
    dequantize_weight,
    fake_quantize_activation,
    quantize_weight,
)
from slimformer.formats.spec import ActSpec, WeightSpec
from slimformer.nn.base import CompressedLinear, _cols, _rows, warn_once
from slimformer.nn.registry import register_module_type

_TOKEN_A8 = ActSpec(8, True, "token", True)


@register_module_type
class QuantLinear(CompressedLinear):
    """``y = act_q(x) @ dequant(W)ᵀ + b`` with W held as packed ``bits``-bit codes.

    Buffers (what is saved): ``qweight`` (uint8: 4-bit rows of a multiple of 32 codes in
    the Q4 layout ``[out, in/2]``, else the packed bit stream), ``scale`` (float16), ``zero``
    (uint8, asymmetric only), ``bias`` and, for static activation quantisation,
    ``act_scale``/``act_zero``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_spec: WeightSpec,
        act_spec: ActSpec | None = None,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec, self.act_spec = weight_spec, act_spec
        groups = {"tensor": 1, "channel": 1, "group": in_features // (weight_spec.group_size or 1)}
        rows = 1 if weight_spec.granularity == "tensor" else out_features
        n_groups = groups[weight_spec.granularity]
        if self.nibble_layout:
            qweight = torch.zeros(out_features, in_features // 2, dtype=torch.uint8)
        else:
            qweight = torch.zeros(packing.packed_nbytes(in_features * out_features, weight_spec.bits), dtype=torch.uint8)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", torch.ones(rows, n_groups, dtype=torch.float16))
        # Symmetric formats have no zero-point; keep an empty buffer so nothing is stored.
        zero_shape = (0,) if weight_spec.symmetric else (rows, n_groups)
        self.register_buffer("zero", torch.zeros(zero_shape, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        static = act_spec is not None and not act_spec.dynamic
        self.register_buffer("act_scale", torch.ones(()) if static else None)
        self.register_buffer("act_zero", torch.zeros(()) if static else None)
        self.compute_dtype = dtype

    @property
    def nibble_layout(self) -> bool:
        """Whether ``qweight`` is saved in the Q4 layout (else the packed bit stream)."""
        return self.weight_spec.bits == 4 and self.in_features % Q4_BLOCK == 0

    @property
    def dense_equivalent(self) -> bool:
        return self.act_spec is None

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_spec: WeightSpec,
        act_spec: ActSpec | None = None,
        codes: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        zero: torch.Tensor | None = None,
    ) -> "QuantLinear":
        """Build from an ``[out, in]`` float weight. Techniques that choose their own
        codes (GPTQ, ...) pass ``codes``/``scale``/``zero``; otherwise RTN is used."""
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, weight_spec, act_spec, bias is not None, weight.dtype)
        if codes is None:
            codes, scale, zero = quantize_weight(weight, weight_spec)
        module.set_codes(codes)
        module.scale = scale.to(torch.float16).contiguous()
        module.zero = zero.to(torch.uint8).contiguous() if not weight_spec.symmetric else module.zero
        if bias is not None:
            module.bias = bias.detach().clone()
        return module

    def set_codes(self, codes: torch.Tensor) -> None:
        """Store ``[out, in]`` codes in this module's layout."""
        codes = codes.reshape(self.out_features, self.in_features)
        self.qweight = pack_nibbles(codes) if self.nibble_layout else packing.pack(codes, self.weight_spec.bits)
        self.drop_runtime()

    def codes(self) -> torch.Tensor:
        if self.qweight.dim() == 2:
            return unpack_nibbles(self.qweight, self.out_features, self.in_features)
        numel = self.in_features * self.out_features
        return packing.unpack(self.qweight, self.weight_spec.bits, numel).reshape(self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        shape = torch.Size((self.out_features, self.in_features))
        return dequantize_weight(self.codes(), self.scale, self.zero, self.weight_spec, shape).to(self.compute_dtype)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_spec is not None:
            x = fake_quantize_activation(x, self.act_spec, self.act_scale, self.act_zero)
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runtime is None:
            self._runtime = self._prepare_runtime()
        kernel, packed = self._runtime
        if kernel is None:
            # the reference, on a dense weight dequantised once (dropped with new weights)
            if self._weight is None:
                self._weight = self.dequantized_weight()
            if self.act_spec is not None:
                x = fake_quantize_activation(x, self.act_spec, self.act_scale, self.act_zero)
            return F.linear(x, self._weight.to(x.dtype), self.bias)
        return kernel(x, packed, self.bias).to(x.dtype)

    _runtime: tuple | None = None   # (kernel, packed weight), built on first forward
    _weight: torch.Tensor | None = None   # the dense weight of the reference path, built on first use

    def drop_runtime(self) -> None:
        self._runtime = None
        self._weight = None

    def _kernel_path(self) -> tuple[str | None, str | None]:
        """``(kernel, why slower)`` for this format, decided from the format alone (nothing
        is prepared): the kernel that runs it (None: the reference path) and, when the
        layer runs slower than its format could, the reason."""
        spec, act = self.weight_spec, self.act_spec
        if not kernels.kernels_available():
            return None, f"kernels unavailable ({kernels.load_error()}): dense cached weight"
        per_row = spec.granularity != "group"
        if act is not None:
            if act.dynamic and act.bits == 8 and act.symmetric and act.granularity == "token":
                if per_row:
                    return "w8a8", None
                if spec.symmetric:  # group-wise weights (ZeroQuant)
                    return "w8a8-group", None
                return None, ("W8A8 with asymmetric group-wise weights has no kernel: reference path "
                              "(fake-quantised input, cached dense weight)")
            if not act.dynamic:
                return None, ("static activation scales have no kernel: reference path "
                              "(fake-quantised input, cached dense weight)")
            return None, (f"activations a{act.bits}-{act.granularity}{'' if act.symmetric else '-asym'} have no "
                          "kernel (only dynamic symmetric int8 per token): reference path (fake-quantised input, "
                          "cached dense weight)")
        if spec.bits <= 4:
            group = spec.group_size if spec.granularity == "group" else self.in_features
            if self.in_features % 16 or group % 16:
                return "int4", "int4 kernel needs K and group size multiples of 16: reference path"
            return "int4", None
        if per_row:
            return "int8", None
        return None, (f"{spec.bits}-bit group-wise weights have no kernel (int8 kernels take one scale per row): "
                      "reference path (cached dense weight)")

    def runtime_fallback(self) -> str | None:
        return self._kernel_path()[1]

    def _prepare_runtime(self) -> tuple:
        """Pick the kernel for this format and prepare the weight for it (once)."""
        kind, why = self._kernel_path()
        if not kernels.kernels_available():
            warn_once("QuantLinear: no kernels",
                      f"slimformer.kernels unavailable ({kernels.load_error()}); quantised layers run on a dense "
                      "weight dequantised once and cached (more memory, fp32 speed)")
            self.fallback = why
            return None, None
        if why is not None:
            self.set_fallback(why)
        spec = self.weight_spec
        zero = None if spec.symmetric else self.zero
        group = spec.group_size if spec.granularity == "group" else None
        if kind == "w8a8":
            return kernels.w8a8_linear, kernels.prepare_int8(self.codes(), self.scale, zero, spec.bits, spec.symmetric)
        if kind == "w8a8-group":
            return kernels.w8a8_group_linear, kernels.prepare_w8a8_groups(self.codes(), self.scale, group, spec.bits)
        if kind == "int4":
            if self.qweight.dim() == 2:  # the Q4 layout: the kernels read these bytes as they are
                return kernels.int4_linear, kernels.prepare_int4_q4(self.qweight, self.scale, zero, group,
                                                                    spec.symmetric, spec.bits,
                                                                    self.out_features, self.in_features)
            # the bit stream (2-3 bits, rows not a multiple of 32): unpacked to the Q4 layout once
            return kernels.int4_linear, kernels.prepare_int4(self.codes(), self.scale, zero, group, spec.symmetric,
                                                             bits=spec.bits)
        if kind == "int8":
            return kernels.int8_linear, kernels.prepare_int8(self.codes(), self.scale, zero, spec.bits, spec.symmetric)
        return None, None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "qweight"
        stored = state_dict.get(key)
        if stored is not None and stored.dim() == 1 and self.nibble_layout and not stored.is_meta:
            # format version 1 stored 4-bit codes as a flat bit stream: the Q4 layout, once
            codes = packing.unpack(stored, 4, self.in_features * self.out_features)
            state_dict[key] = pack_nibbles(codes.reshape(self.out_features, self.in_features))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        act = "" if self.act_spec is None else f", act=a{self.act_spec.bits}-{self.act_spec.granularity}"
        return f"{self.in_features}, {self.out_features}, {self.weight_spec.describe()}{act}"

    # ------------------------------------------------------------------ description
    def matrix(self, name: str = "") -> CompressedMatrix:
        """This layer as the native runtime's description: the Q4 bytes as stored (no
        repacking) for 2-4 bits, int8 for 5-8 bits, W8A8 kinds for dynamic int8 tokens.
        :class:`NotNative` for activation formats the decoder has no kernel for
        (``dense_ok=False``) and shapes its layouts cannot take (``dense_ok=True``)."""
        label = name or "QuantLinear"
        spec, act = self.weight_spec, self.act_spec
        N, K = self.out_features, self.in_features
        gs = spec.group_size if spec.granularity == "group" else K
        G = K // gs
        bias = None if self.bias is None else self.bias.detach().float().contiguous()
        scale = self.scale.float().reshape(-1, G).expand(N, G).contiguous()
        offset = 2 ** (spec.bits - 1) if spec.symmetric else 0
        zero = self.zero.float().reshape(-1, G).expand(N, G) if self.zero.numel() else torch.zeros(N, G)
        zo = zero + offset  # w = (code - zo) * scale
        info = dict(bits=spec.bits, symmetric=spec.symmetric)
        if act is not None and G > 1 and spec.symmetric and act == _TOKEN_A8:
            # ZeroQuant: signed integer weights (exact in int8 for symmetric codes), group scales
            q = (self.codes().to(torch.int16) - offset).to(torch.int8).contiguous()
            return CompressedMatrix(label, Q8A8G, N, K, gs, q, maybe_half(scale, None)[0], bias=bias, **info)
        if act is not None:
            if not (act.dynamic and act.bits == 8 and act.symmetric and act.granularity == "token" and G == 1):
                raise NotNative(f"no decode kernel for activations {act} with {spec.describe()} weights",
                                dense_ok=False)
            q = (self.codes().to(torch.int16) - 128).to(torch.int8).contiguous()
            corr = (128 - zo[:, 0]).round().to(torch.int32).contiguous()
            return CompressedMatrix(label, Q8A8, N, K, K, q, scale[:, 0].contiguous(), bias=bias, corr=corr, **info)
        if spec.bits <= 4:
            if K % 32 or gs % 32:
                raise NotNative(f"4-bit layout needs K={K} and group size {gs} to be multiples of 32")
            # the stored bytes are the Q4 layout already (2-3-bit codes: unpacked from the bit stream once)
            w = self.qweight if self.qweight.dim() == 2 else pack_nibbles(self.codes())
            scale_h, minv_h = maybe_half(scale, -zo * scale)
            if scale_h.dtype != torch.float16 and torch.equal(scale.half().float(), scale):
                # fp16 scales with integer zero-points (our asymmetric RTN/GPTQ): 3 bytes per group, not 8
                return CompressedMatrix(label, Q4, N, K, gs, w, scale.half().contiguous(), None, bias,
                                        zero=zo.to(torch.uint8).contiguous(), **info)
            return CompressedMatrix(label, Q4, N, K, gs, w, scale_h, minv_h, bias, **info)
        if K % 16 or gs % 16:
            raise NotNative(f"K={K} and group size {gs} must be multiples of 16")
        q = (self.codes().to(torch.int16) - 128).to(torch.int8).contiguous()
        minv = (128 - zo) * scale
        return CompressedMatrix(label, Q8, N, K, gs, q, *maybe_half(scale, minv if minv.any() else None), bias, **info)

    # ------------------------------------------------------------------ sharding
    def shard(self, rank: int, world: int, dim: int, index=None, name: str = "",
              keep_activation: bool = True) -> "QuantLinear":
        """This rank's rows (``dim=0``) or input columns (``dim=1``, no bias) in packed form:
        codes, scales and zero-points sliced, no requantisation. A column cut must fall on
        a quantisation-group boundary. ``keep_activation=False`` drops the activation
        quantisation (a caller that quantises the whole input across ranks itself)."""
        label = name or "QuantLinear"
        spec = self.weight_spec
        codes, scale, zero = self.codes(), self.scale, self.zero
        per_tensor = spec.granularity == "tensor"
        bias = self.bias
        if dim == 0:
            rows = _rows(self.out_features, rank, world, index, label)
            codes = codes[rows]
            if not per_tensor:
                scale = scale[rows]
                zero = zero[rows] if zero.numel() else zero
            bias = None if bias is None else bias[rows]
        else:
            start, stop = _cols(self.in_features, rank, world, index, label)
            act = self.act_spec
            if keep_activation and act is not None and act.dynamic and stop - start < self.in_features:
                raise NotNative(f"{label}: its dynamic activation scale is taken over the whole input, which a "
                                "column shard does not hold (shard with keep_activation=False and quantise the "
                                "input across ranks)", dense_ok=False)
            codes = codes[:, start:stop]
            if spec.granularity == "group":
                gs = spec.group_size
                if start % gs or stop % gs:
                    raise ValueError(
                        f"{label}: column split of a {self.in_features}-input QuantLinear at {start}:{stop} "
                        f"is not on a boundary of its {gs}-column quantisation groups")
                scale = scale[:, start // gs: stop // gs]
                zero = zero[:, start // gs: stop // gs] if zero.numel() else zero
            bias = None
        act_spec = self.act_spec if keep_activation else None
        out_features, in_features = codes.shape
        shard = QuantLinear(in_features, out_features, spec, act_spec, bias is not None, self.compute_dtype)
        shard.set_codes(codes.contiguous())
        shard.scale = scale.contiguous().clone()
        if zero.numel():
            shard.zero = zero.contiguous().clone()
        if bias is not None:
            shard.bias = bias.detach().contiguous().clone()
        if act_spec is not None and not act_spec.dynamic:
            # static per-tensor activation scale: elementwise, so it applies to any slice
            shard.act_scale, shard.act_zero = self.act_scale.clone(), self.act_zero.clone()
        return shard

    # ------------------------------------------------------------------ saving
    def config(self) -> dict:
        """What a saved directory records to rebuild this module."""
        return {
            "type": "QuantLinear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "weight": self.weight_spec.to_dict(),
            "act": None if self.act_spec is None else self.act_spec.to_dict(),
        }

    @classmethod
    def from_config(cls, cfg: dict, dtype: torch.dtype = torch.float32) -> "QuantLinear":
        act = ActSpec(**cfg["act"]) if cfg.get("act") else None
        spec = WeightSpec(**cfg["weight"])
        if spec.granularity == "group" and cfg["in_features"] % spec.group_size:
            # what a saved module never holds: its kernels would refuse it at the first forward
            raise QuantConfigError(f"weight.group_size {spec.group_size} does not divide in_features "
                                   f"{cfg['in_features']}")
        return cls(cfg["in_features"], cfg["out_features"], spec, act, cfg["bias"], dtype)
