"""Fast CPU matmul kernels for quantised Linear layers (weight-only int8/int4, W8A8).

Why our own kernels: on an AVX2 CPU (no AVX-512/VNNI/AMX) torch's
``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` measured 3-6x *slower*
than fp32 F.linear, and no library callable from torch does fast int4/int8 GEMV on
such CPUs. Batch-1 decode is memory-bound, so reading 1 byte (int8) or ~0.6 byte
(int4 + group scales) per weight instead of 4 is the whole win. The kernels are
AVX2+FMA C++ with OpenMP (``kernels.cpp``), built once with g++ into the package's
one native library and loaded via ctypes (``_build.py``; ABI in ``slimformer.h`` and
``abi.py``). numba was measured too (``benchmarks/kernels.py`` →
``benchmarks/results/kernels.json``): its auto-vectorised int8 matvec is on par or
faster only where LLVM can use AVX-512 (the benchmark machine, an AMD EPYC Zen 4,
does report avx512f/vnni even though the target was described as AVX2-only),
and its int4 matvec (nibble unpacking) is ~10x slower than the C++ one; numba
would also add a ~50 MB dependency and seconds of JIT per kernel. The kernels
need AVX2+FMA (any x86-64 CPU from Haswell/Zen 1 on); the library holds one copy
compiled for AVX2 and one for AVX-512, chosen at load from the CPU's features
(``SLIMFORMER_ISA=avx2|avx512`` overrides, :func:`set_isa` switches). Without the
library (no compiler, older CPU, ``SLIMFORMER_DISABLE_KERNELS=1``) every entry point
falls back to :mod:`slimformer.kernels.reference`.

Dispatch by number of tokens M (rows of ``x``):
  * M <= ``SMALL_M``: fused kernels that read each weight row once for all tokens;
  * larger M (prefill): dequantise tiles of rows to fp32 with the C kernel and call
    torch's fp32 GEMM (measured fastest; dequant is a few % of the GEMM);
  * W8A8: activations quantised by our kernel (bit-identical to the reference
    rounding), int8 x int8 -> int32 GEMM by ``torch._int_mm`` (oneDNN; exact, and
    measured ~4x faster than fp32 at M=512 — it may use VNNI where the CPU has
    it) or, when that is missing, our AVX2 maddubs kernel; rescale by our kernel.
  * group-wise W8A8 (ZeroQuant): one fused kernel quantises the tokens in its input
    pass and sums exact int32 group dot products scaled by the group scales (AVX2,
    or AVX-512 VNNI where the CPU has it, chosen at run time); for many tokens on
    AVX2 the tokens are quantised once and each group is one ``torch._int_mm``
    whose int32 result our kernel scales into the fp32 output (``ZQ_INT_MM_MIN_M``).

Runtime layouts (``prepare_*``) differ from the stored format; see ``kernels.cpp``.
Anything a kernel cannot handle falls back to :mod:`slimformer.kernels.reference`
with a warning naming the shape — never a wrong answer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimformer.kernels import abi, reference
from slimformer.kernels import _build

__all__ = [
    "PackedInt8", "PackedInt4", "PackedInt8Groups", "prepare_int8", "prepare_int4", "prepare_int4_q4",
    "prepare_w8a8_groups",
    "int8_linear", "int4_linear", "w8a8_linear", "w8a8_group_linear", "quantize_tokens_int8",
    "library", "available", "unavailable_reason", "isa", "supported_isas", "set_isa", "cpu_features",
    "set_num_threads", "num_threads", "kernels_available", "reference",
]

# ---------------------------------------------------------------------- the library
_lib = None  # ctypes.CDLL once loaded
_error: str | None = None
_threads_override: int | None = None


def get_lib():
    """The loaded library, or None (reason in :func:`unavailable_reason`). Loads it on
    first call; never raises."""
    global _lib, _error
    if _lib is None and _error is None:
        with _build._lock:
            if _lib is None and _error is None:
                try:
                    _lib = _build.load()
                except Exception as exc:  # noqa: BLE001 - any failure means: use the reference
                    _error = str(exc) or type(exc).__name__
    return _lib


def library():
    """The native library (``ctypes.CDLL``, every function declared); raises
    RuntimeError naming the reason when it is unavailable."""
    lib = get_lib()
    if lib is None:
        raise RuntimeError(f"slimformer native library unavailable: {_error}")
    return lib


def available() -> bool:
    """Whether the native library loaded (False with ``SLIMFORMER_DISABLE_KERNELS=1``,
    no compiler, a CPU without AVX2, an ABI mismatch, ...)."""
    return get_lib() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is available)."""
    return None if get_lib() is not None else _error


# Older names, kept for callers.
kernels_available = available
load_error = unavailable_reason


def _reset() -> None:
    """Forget the loaded library (tests: environment switches are read at load)."""
    global _lib, _error
    _lib, _error = None, None


def cpu_features() -> set[str]:
    """CPU features the library detected (``__builtin_cpu_supports``); empty if unavailable."""
    lib = get_lib()
    if lib is None:
        return set()
    bits = lib.sf_cpu_features()
    return {name for name, bit in abi.CPU_FEATURES.items() if bits & bit}


def supported_isas() -> list[str]:
    """Instruction sets this CPU runs the kernels with (``avx2``, ``avx512``)."""
    lib = get_lib()
    return [] if lib is None else [i for i, v in abi.ISAS.items() if lib.sf_isa_supported(v)]


def isa() -> str | None:
    """The instruction set the kernels run with now (None when unavailable)."""
    lib = get_lib()
    if lib is None:
        return None
    return {v: k for k, v in abi.ISAS.items()}.get(lib.sf_get_isa())


def set_isa(name: str) -> None:
    """Run the kernels with instruction set ``name`` from now on (process-wide; the
    environment's ``SLIMFORMER_ISA`` sets it at load). Raises when unsupported here."""
    lib = library()
    if name not in abi.ISAS:
        raise ValueError(f"unknown instruction set {name!r} (choose from {', '.join(abi.ISAS)})")
    if lib.sf_set_isa(abi.ISAS[name]) != 0:
        raise RuntimeError(f"this CPU cannot run the {name} kernels (it has: {', '.join(sorted(cpu_features()))})")


def num_threads() -> int:
    """Threads the C kernels use: ``torch.get_num_threads()`` (which ``--threads``
    sets), unless :func:`set_num_threads` overrides it."""
    return _threads_override or max(1, torch.get_num_threads())


SMALL_M = {"int8": 8, "int4": 8}  # fused path up to this many tokens (measured: beats dequant+GEMM to M=8)
W8A8_INT_MM_MIN_M = 1  # torch._int_mm for M >= this, else our AVX2 maddubs kernel (measured)
_TILE_BYTES = 8 << 20  # fp32 tile size for the dequantise + GEMM path


def set_num_threads(n: int | None) -> None:
    """Override the C kernels' thread count (None: follow ``torch.get_num_threads()``
    again). torch's own GEMMs always follow ``torch.set_num_threads``."""
    global _threads_override
    _threads_override = None if n is None else max(1, int(n))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _warn_fallback(kind: str, shape, why: str) -> None:
    warnings.warn(f"slimformer.kernels: {kind} weight of shape {tuple(shape)} uses the slow reference path: {why}",
                  RuntimeWarning, stacklevel=3)


def _prep_x(x: torch.Tensor, K: int) -> torch.Tensor:
    if x.shape[-1] != K:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {K}")
    if x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous():
        return x  # decode fast path: no copies
    x2 = x.reshape(-1, K)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    return x2.contiguous()


def _prep_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach().to(torch.float32).contiguous()


def _finish(y: torch.Tensor, x: torch.Tensor, N: int) -> torch.Tensor:
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], N)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _dequant_gemm(x2: torch.Tensor, N: int, K: int, bias, dequant) -> torch.Tensor:
    """y = x2 @ W^T with W dequantised tile by tile (``dequant(n0, n1, out)``)."""
    rows = max(64, (_TILE_BYTES // (4 * K)) // 64 * 64)
    if rows >= N:
        w = torch.empty(N, K, dtype=torch.float32)
        dequant(0, N, w)
        return F.linear(x2, w, bias)
    y = torch.empty(x2.shape[0], N, dtype=torch.float32)
    w = torch.empty(rows, K, dtype=torch.float32)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        wt = w[: n1 - n0]
        dequant(n0, n1, wt)
        y[:, n0:n1] = F.linear(x2, wt, None if bias is None else bias[n0:n1])
    return y


# ---------------------------------------------------------------------- int8
@dataclass
class PackedInt8:
    """Runtime int8 layout: ``q = code - 128`` (int8), ``w = (q + corr) * scale``."""

    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N] float32
    corr: torch.Tensor  # [N] float32, integer-valued: 128 - offset - zero
    corr_i: torch.Tensor | None  # [N] int32 (None when the zero-point is not an integer)
    bits: int
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def codes(self) -> torch.Tensor:
        return (self.q.to(torch.int16) + 128).to(torch.uint8)

    def dequantize(self) -> torch.Tensor:
        return (self.q.float() + self.corr[:, None]) * self.scale[:, None]

    def nbytes(self) -> int:
        return self.q.numel() + 8 * self.q.shape[0]


def prepare_int8(codes_u8: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None, bits: int = 8,
                 symmetric: bool = True) -> PackedInt8:
    """Repack stored per-output-channel codes (``[N, K]`` uint8 in ``0..2^bits-1``,
    scale ``[N, 1]`` or ``[1, 1]``, integer zero ``[N, 1]`` or None) for the kernels."""
    if codes_u8.dim() != 2:
        raise ValueError(f"codes must be [out, in], got {tuple(codes_u8.shape)}")
    N, K = codes_u8.shape
    if scale.numel() not in (1, N):
        raise ValueError(f"int8 kernels take one scale per output channel, got scale {tuple(scale.shape)}")
    q = (codes_u8.to(torch.int16) - 128).to(torch.int8).contiguous()
    offset = 2 ** (bits - 1) if symmetric else 0
    z = torch.zeros(N) if zero is None or not zero.numel() else zero.float().reshape(-1).expand(N)
    corr = (128.0 - offset - z).float().contiguous()
    corr_i = corr.round().to(torch.int32) if torch.equal(corr, corr.round()) else None
    s = scale.float().reshape(-1).expand(N).contiguous()
    return PackedInt8(q, s, corr, corr_i, bits, symmetric)


def int8_linear(x: torch.Tensor, packed: PackedInt8, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(W)^T + bias`` for ``x [..., K]``; weight-only int8."""
    N, K = packed.shape
    lib = get_lib()
    if lib is None:
        _warn_fallback("int8", (N, K), f"kernels unavailable ({unavailable_reason()})")
        return F.linear(x.float(), packed.dequantize(), _prep_bias(bias)).to(x.dtype)
    x2, b = _prep_x(x, K), _prep_bias(bias)
    M = x2.shape[0]
    if M <= SMALL_M["int8"]:
        y = torch.empty(M, N, dtype=torch.float32)
        lib.sf_w8_linear(packed.q.data_ptr(), packed.scale.data_ptr(), packed.corr.data_ptr(), x2.data_ptr(),
                         _ptr(b), y.data_ptr(), M, N, K, num_threads())
    else:
        q, s, c = packed.q, packed.scale, packed.corr

        def dequant(n0, n1, out):
            lib.sf_w8_dequant(q[n0].data_ptr(), s[n0].data_ptr(), c[n0].data_ptr(), out.data_ptr(),
                              n1 - n0, K, num_threads())

        y = _dequant_gemm(x2, N, K, b, dequant)
    return _finish(y, x, N)


# ---------------------------------------------------------------------- W8A8
def w8a8_linear(x: torch.Tensor, packed: PackedInt8, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic per-token symmetric int8 activations x int8 weights, int32
    accumulation, rescaled by ``s_x ⊗ s_w`` (same activation rounding as
    ``primitives.fake_quantize_activation``)."""
    N, K = packed.shape
    lib = get_lib()
    if lib is None or packed.corr_i is None:
        why = f"kernels unavailable ({unavailable_reason()})" if lib is None else "non-integer zero-point"
        _warn_fallback("w8a8", (N, K), why)
        return _w8a8_fallback(x, packed, bias)
    x2, b = _prep_x(x, K), _prep_bias(bias)
    M = x2.shape[0]
    qx = torch.empty(M, K, dtype=torch.int8)
    sx = torch.empty(M, dtype=torch.float32)
    qsum = torch.empty(M, dtype=torch.int32)
    lib.sf_quant_act(x2.data_ptr(), qx.data_ptr(), sx.data_ptr(), qsum.data_ptr(), M, K)
    y = torch.empty(M, N, dtype=torch.float32)
    acc = _int_mm(qx, packed.q) if M >= W8A8_INT_MM_MIN_M else None
    if acc is not None:
        lib.sf_w8a8_rescale(acc.data_ptr(), packed.corr_i.data_ptr(), qsum.data_ptr(), sx.data_ptr(),
                            packed.scale.data_ptr(), _ptr(b), y.data_ptr(), M, N, num_threads())
    else:
        lib.sf_w8a8_linear(packed.q.data_ptr(), packed.scale.data_ptr(), packed.corr_i.data_ptr(), qx.data_ptr(),
                           sx.data_ptr(), qsum.data_ptr(), _ptr(b), y.data_ptr(), M, N, K, num_threads())
    return _finish(y, x, N)


_INT_MM_OK: bool | None = None


def _int_mm(qx: torch.Tensor, qw: torch.Tensor) -> torch.Tensor | None:
    """int8 x int8 -> int32 GEMM with torch._int_mm (oneDNN; exact, and ~4x faster
    than fp32 GEMM at M=512 on AVX2). None when this torch lacks it on CPU."""
    global _INT_MM_OK
    if _INT_MM_OK is False:
        return None
    try:
        acc = torch._int_mm(qx, qw.t())
    except (RuntimeError, AttributeError, NotImplementedError):
        _INT_MM_OK = False
        return None
    _INT_MM_OK = True
    return acc.contiguous()


def _w8a8_fallback(x, packed: PackedInt8, bias) -> torch.Tensor:
    q, sx = reference.quantize_activation_per_token(x)
    w = packed.q.double() + packed.corr.double()[:, None]
    acc = (q.double() @ w.t()).float()
    y = acc * (sx * packed.scale[None, :])
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], packed.shape[0]).to(x.dtype)


# ---------------------------------------------------------------------- int4
@dataclass
class PackedInt4:
    """Runtime int4 layout: the Q4 layout QuantLinear stores and the decoder reads
    (:func:`slimformer.formats.matrix.pack_nibbles`: per row, every 32 codes in 16 bytes,
    ``byte j = c[j] | c[j+16] << 4``); a row of ``K % 32 == 16`` codes ends in a half block
    (16 codes in 8 bytes, ``byte j = c[j] | c[j+8] << 4``). ``w = (c - zo) * scale`` per
    group. ``fast`` is False for shapes the kernel cannot take: then ``packed`` holds the
    plain codes ``[N, K]`` and the reference path is used."""

    packed: torch.Tensor  # [N, K/2] uint8 (or [N, K] codes when not fast)
    scale: torch.Tensor  # [N, G] float32
    zo: torch.Tensor  # [N, G] uint8: offset + zero
    group_size: int
    symmetric: bool
    N: int
    K: int
    fast: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        return (self.N, self.K)

    def codes(self) -> torch.Tensor:
        if not self.fast:
            return self.packed
        return _unpack_q4(self.packed, self.N, self.K)

    def dequantize(self) -> torch.Tensor:
        c = self.codes().float().reshape(self.N, -1, self.group_size)
        return ((c - self.zo.float()[..., None]) * self.scale[..., None]).reshape(self.N, self.K)

    def nbytes(self) -> int:
        return self.packed.numel() + self.scale.numel() * 4 + self.zo.numel()


def _pack_q4(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes 0..15 (``K % 16 == 0``) -> ``[N, K/2]`` bytes in the Q4 layout, a
    trailing half block when ``K % 32 == 16``."""
    N, K = codes.shape
    K32 = K - K % 32
    c = codes.to(torch.uint8)
    full = c[:, :K32].reshape(N, K32 // 32, 2, 16)
    parts = [(full[:, :, 0, :] | (full[:, :, 1, :] << 4)).reshape(N, K32 // 2)]
    if K32 < K:
        tail = c[:, K32:].reshape(N, 2, 8)
        parts.append(tail[:, 0, :] | (tail[:, 1, :] << 4))
    return torch.cat(parts, dim=1).contiguous() if len(parts) > 1 else parts[0].contiguous()


def _unpack_q4(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Inverse of :func:`_pack_q4`: ``[N, K]`` uint8 codes."""
    K32 = K - K % 32
    b = packed.reshape(N, K // 2)
    full = b[:, :K32 // 2].reshape(N, K32 // 32, 16)
    parts = [torch.cat([full & 0xF, full >> 4], dim=-1).reshape(N, K32)]
    if K32 < K:
        tail = b[:, K32 // 2:]
        parts.append(torch.cat([tail & 0xF, tail >> 4], dim=-1))
    return torch.cat(parts, dim=1)


def _int4_params(N: int, K: int, scale, zero, group_size, symmetric: bool, bits: int):
    """Group size, ``[N, G]`` float32 scales, ``[N, G]`` float zo = zero + offset, and why
    the kernel cannot take this format (None: it can)."""
    if not 2 <= bits <= 4:
        raise ValueError(f"prepare_int4 takes 2- to 4-bit codes, got bits={bits}")
    gs = K if group_size is None else int(group_size)
    if K % gs:
        raise ValueError(f"group_size {gs} does not divide {K} input columns")
    G = K // gs
    scale = scale.float().reshape(-1, G).expand(N, G).contiguous()
    offset = 2 ** (bits - 1) if symmetric else 0
    z = torch.zeros(N, G) if zero is None or not zero.numel() else zero.float().reshape(-1, G).expand(N, G)
    zo_f = z + offset
    ok_zero = torch.equal(zo_f, zo_f.round()) and float(zo_f.min()) >= 0 and float(zo_f.max()) <= 255
    why = None
    if K % 16 or gs % 16:
        why = f"K={K} and group size {gs} must be multiples of 16"
    elif not ok_zero:
        why = "zero-points are not integers in 0..255"
    return gs, scale, zo_f, why


def prepare_int4(codes_u8: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int | None,
                 symmetric: bool, bits: int = 4) -> PackedInt4:
    """Pack 2- to 4-bit codes (``[N, K]`` uint8 in 0..15, unpacked) into the kernels'
    layout (the Q4 layout), with scale ``[N, G]``, integer zero ``[N, G]`` (asymmetric) or
    None; ``group_size`` None or K means per-channel. ``bits`` 2 or 3 also work (codes
    are < 16; symmetric offset ``2^(bits-1)``) at 4-bit speed. Bytes already in the Q4
    layout (QuantLinear's ``qweight``) go through :func:`prepare_int4_q4` instead, as they are."""
    if codes_u8.dim() != 2:
        raise ValueError(f"codes must be [out, in], got {tuple(codes_u8.shape)}")
    if not 2 <= bits <= 4:
        raise ValueError(f"prepare_int4 takes 2- to 4-bit codes, got bits={bits}")
    if codes_u8.numel() and int(codes_u8.max()) >= 2**bits:
        raise ValueError(f"codes exceed {2**bits - 1}: are they {bits}-bit and unpacked?")
    N, K = codes_u8.shape
    gs, scale, zo_f, why = _int4_params(N, K, scale, zero, group_size, symmetric, bits)
    if why is not None:
        _warn_fallback("int4", (N, K), why)
        return PackedInt4(codes_u8.contiguous(), scale, zo_f.contiguous(), gs, symmetric, N, K, fast=False)
    return PackedInt4(_pack_q4(codes_u8), scale, zo_f.to(torch.uint8).contiguous(), gs, symmetric, N, K)


def prepare_int4_q4(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int | None,
                    symmetric: bool, bits: int, N: int, K: int) -> PackedInt4:
    """Take codes stored in the Q4 layout (``[N, K/2]`` uint8, ``K % 32 == 0``:
    :func:`slimformer.formats.matrix.pack_nibbles`, QuantLinear's ``qweight``) as they
    are: the kernels read these very bytes (``packed`` is ``qweight`` itself when it is
    contiguous uint8; nothing is unpacked or repacked). Other arguments as
    :func:`prepare_int4`; shapes the kernel cannot take fall back to the reference path
    (with a warning), on codes unpacked once."""
    if K % 32 or tuple(qweight.shape) != (N, K // 2) or qweight.dtype != torch.uint8:
        raise ValueError(f"the Q4 layout of [{N}, {K}] codes is [{N}, {K // 2}] uint8 with K % 32 == 0, "
                         f"got {tuple(qweight.shape)} {qweight.dtype}")
    gs, scale, zo_f, why = _int4_params(N, K, scale, zero, group_size, symmetric, bits)
    if bits < 4 and qweight.numel():
        top = max(int((qweight & 0xF).max()), int((qweight >> 4).max()))
        if top >= 2**bits:
            raise ValueError(f"codes exceed {2**bits - 1}: are they {bits}-bit?")
    if why is not None:
        _warn_fallback("int4", (N, K), why)
        return PackedInt4(_unpack_q4(qweight, N, K), scale, zo_f.contiguous(), gs, symmetric, N, K, fast=False)
    return PackedInt4(qweight.contiguous(), scale, zo_f.to(torch.uint8).contiguous(), gs, symmetric, N, K)


def int4_linear(x: torch.Tensor, packed: PackedInt4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(W)^T + bias`` for ``x [..., K]``; weight-only 4-bit, group-wise."""
    N, K = packed.shape
    lib = get_lib()
    if lib is None or not packed.fast:
        if lib is None:
            _warn_fallback("int4", (N, K), f"kernels unavailable ({unavailable_reason()})")
        return F.linear(x.float(), packed.dequantize(), _prep_bias(bias)).to(x.dtype)
    x2, b = _prep_x(x, K), _prep_bias(bias)
    M, gs = x2.shape[0], packed.group_size
    if M <= SMALL_M["int4"]:
        y = torch.empty(M, N, dtype=torch.float32)
        lib.sf_w4_linear(packed.packed.data_ptr(), packed.scale.data_ptr(), packed.zo.data_ptr(), x2.data_ptr(),
                         _ptr(b), y.data_ptr(), M, N, K, gs, num_threads())
    else:
        p, s, z = packed.packed, packed.scale, packed.zo

        def dequant(n0, n1, out):
            lib.sf_w4_dequant(p[n0].data_ptr(), s[n0].data_ptr(), z[n0].data_ptr(), out.data_ptr(),
                              n1 - n0, K, gs, num_threads())

        y = _dequant_gemm(x2, N, K, b, dequant)
    return _finish(y, x, N)


# ---------------------------------------------------------------------- W8A8, group-wise weights
# ZeroQuant's format: symmetric weights with one scale per group of input columns and
# dynamic per-token symmetric int8 activations. The row-wise W8A8 path factors the
# weight scale out of the whole row; with group scales each group's integer dot
# product must be scaled separately, so it gets its own kernels (``kernels.cpp``).
# From this many tokens, per fused kernel: quantise the tokens once, then one
# torch._int_mm per group (None: never). Measured on SmolLM2 shapes (benchmarks/
# zeroquant.py, an AVX-512 VNNI CPU where oneDNN's _int_mm uses VNNI too): the VNNI
# fused kernel is as fast as per-group _int_mm at M=512 and faster below; the AVX2
# one runs at about fp32 GEMM speed, which per-group _int_mm beats from M~32.
ZQ_INT_MM_MIN_M: dict[str, int | None] = {"avx2": 32, "vnni": None}


@dataclass
class PackedInt8Groups:
    """Runtime layout for group-wise W8A8: signed integer weights ``q = code - 2^(bits-1)``,
    ``w = q * scale[n, g]`` over groups of ``group_size`` columns. The AVX2 kernel and
    per-group _int_mm read ``q [N, K]``; the VNNI kernel reads ``wv``/``sv`` instead
    (8 rows interleaved by 4 columns, ``w + 128`` as bytes; see ``sf_zqv_linear``), and
    then ``q`` is not kept (one copy of the weights)."""

    N: int
    K: int
    scale: torch.Tensor  # [N, G] float32
    scale_t: torch.Tensor  # [G, N] float32: one contiguous row per group (GEMM epilogue)
    group_size: int
    bits: int
    isa: str  # "avx2" | "vnni": which fused kernel
    q: torch.Tensor | None = None  # [N, K] int8 (avx2)
    wv: torch.Tensor | None = None  # [ceil(N/8), K/4, 8, 4] uint8 (vnni)
    sv: torch.Tensor | None = None  # [ceil(N/8), G, 8] float32 (vnni)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.N, self.K)

    def signed_weights(self) -> torch.Tensor:
        """``q [N, K]`` int8 (rebuilt from the VNNI layout when not kept)."""
        if self.q is not None:
            return self.q
        rows = self.wv.permute(0, 2, 1, 3).reshape(-1, self.K)[: self.N]
        return (rows.to(torch.int16) - 128).to(torch.int8)

    def codes(self) -> torch.Tensor:
        return (self.signed_weights().to(torch.int16) + 2 ** (self.bits - 1)).to(torch.uint8)

    def dequantize(self) -> torch.Tensor:
        q = self.signed_weights().float().reshape(self.N, -1, self.group_size)
        return (q * self.scale[..., None]).reshape(self.N, self.K)

    def nbytes(self) -> int:
        return self.N * self.K + self.scale.numel() * 4


def prepare_w8a8_groups(codes_u8: torch.Tensor, scale: torch.Tensor, group_size: int, bits: int = 8,
                        isa: str | None = None) -> PackedInt8Groups:
    """Repack stored symmetric group-wise codes (``[N, K]`` uint8 in ``0..2^bits-1``,
    scale ``[N, K/group_size]``) for :func:`w8a8_group_linear`. ``isa``: the fused
    kernel to prepare for (default: the best this CPU runs, see :func:`zq_isa`)."""
    if codes_u8.dim() != 2:
        raise ValueError(f"codes must be [out, in], got {tuple(codes_u8.shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2..8, got {bits}")
    N, K = codes_u8.shape
    if group_size < 1 or K % group_size:
        raise ValueError(f"group_size {group_size} does not divide {K} input columns")
    G = K // group_size
    if scale.numel() != N * G:
        raise ValueError(f"expected {N}x{G} group scales, got {tuple(scale.shape)}")
    isa = zq_isa() if isa is None else isa
    if isa not in ("avx2", "vnni") or (isa == "vnni" and zq_isa() != "vnni"):
        raise ValueError(f"instruction set {isa!r} is not available here (best: {zq_isa()})")
    if group_size % 4:
        isa = "avx2"  # the VNNI layout takes 4 columns at a time
    q = (codes_u8.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8).contiguous()
    s = scale.float().reshape(N, G).contiguous()
    packed = PackedInt8Groups(N, K, s, s.t().contiguous(), int(group_size), bits, isa)
    if isa == "avx2":
        packed.q = q
    else:
        rows = -(-N // 8) * 8
        wu = torch.full((rows, K), 128, dtype=torch.uint8)
        wu[:N] = (q.to(torch.int16) + 128).to(torch.uint8)
        packed.wv = wu.reshape(rows // 8, 8, K // 4, 4).permute(0, 2, 1, 3).contiguous()
        sp = torch.zeros(rows, G)
        sp[:N] = s
        packed.sv = sp.reshape(rows // 8, 8, G).permute(0, 2, 1).contiguous()
    return packed


def _zq_lib():
    """The kernel library (or None); kept as a name for the group-wise W8A8 paths."""
    return get_lib()


def zq_isa() -> str:
    """The best fused group-wise W8A8 kernel this CPU runs: ``vnni`` (AVX-512 VNNI,
    when the kernels run with the ``avx512`` instruction set) or ``avx2``."""
    lib = _zq_lib()
    vnni = lib is not None and lib.sf_zq_has_vnni() and lib.sf_get_isa() == abi.ISAS["avx512"]
    return "vnni" if vnni else "avx2"


def quantize_tokens_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric int8 codes ``[M, K]`` and scales ``[M]`` of ``x [..., K]``
    by the kernels' own quantiser (the codes of ``primitives.fake_quantize_activation``)."""
    K = x.shape[-1]
    x2 = _prep_x(x, K)
    M = x2.shape[0]
    lib = _zq_lib()
    if lib is None:
        q, sx = reference.quantize_activation_per_token(x2)
        return q.to(torch.int8), sx.reshape(M)
    qx = torch.empty(M, K, dtype=torch.int8)
    sx = torch.empty(M, dtype=torch.float32)
    lib.sf_zq_quant_act(x2.data_ptr(), qx.data_ptr(), sx.data_ptr(), M, K, num_threads())
    return qx, sx


def w8a8_group_linear(x: torch.Tensor, packed: PackedInt8Groups, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``fake_quant_token(x) @ dequant(W)^T + bias`` computed in integers: per token
    and output row, each group's int8 x int8 dot product is exact, scaled by the
    group's weight scale and summed in fp32, and the token's scale applied last."""
    N, K = packed.shape
    lib = _zq_lib()
    if lib is None:
        _warn_fallback("w8a8-group", (N, K), f"kernels unavailable ({unavailable_reason()})")
        return _w8a8_group_fallback(x, packed, bias)
    x2, b = _prep_x(x, K), _prep_bias(bias)
    M, gs = x2.shape[0], packed.group_size
    y = torch.empty(M, N, dtype=torch.float32)
    large = ZQ_INT_MM_MIN_M.get(packed.isa)
    if large is not None and M >= large and _w8a8_group_gemm(lib, x2, packed, b, y):
        pass
    elif packed.isa == "vnni":
        lib.sf_zqv_linear(packed.wv.data_ptr(), packed.sv.data_ptr(), x2.data_ptr(), _ptr(b), y.data_ptr(),
                          M, N, K, gs, num_threads())
    else:
        lib.sf_zq_linear(packed.q.data_ptr(), packed.scale.data_ptr(), x2.data_ptr(), _ptr(b), y.data_ptr(),
                         M, N, K, gs, num_threads())
    return _finish(y, x, N)


def _w8a8_group_gemm(lib, x2: torch.Tensor, packed: PackedInt8Groups, b, y: torch.Tensor) -> bool:
    """Large M: quantise the tokens once, then per group an int32 GEMM (torch._int_mm)
    scaled into ``y`` by our epilogue. False when this torch has no CPU _int_mm."""
    global _INT_MM_OK
    if _INT_MM_OK is False:
        return False
    (M, K), (N, gs) = x2.shape, (packed.shape[0], packed.group_size)
    qx = torch.empty(M, K, dtype=torch.int8)
    sx = torch.empty(M, dtype=torch.float32)
    lib.sf_zq_quant_act(x2.data_ptr(), qx.data_ptr(), sx.data_ptr(), M, K, num_threads())
    acc = torch.empty(M, N, dtype=torch.int32)
    G, qw = K // gs, packed.signed_weights()
    for g in range(G):
        cols = slice(g * gs, (g + 1) * gs)
        try:
            torch._int_mm(qx[:, cols], qw[:, cols].t(), out=acc)
        except (RuntimeError, AttributeError, NotImplementedError):
            _INT_MM_OK = False
            return False
        lib.sf_zq_accumulate(acc.data_ptr(), packed.scale_t[g].data_ptr(), y.data_ptr(), sx.data_ptr(), _ptr(b),
                             M, N, int(g == 0), int(g == G - 1), num_threads())
    return True


def _w8a8_group_fallback(x, packed: PackedInt8Groups, bias) -> torch.Tensor:
    N, K = packed.shape
    q, sx = reference.quantize_activation_per_token(x)
    gs = packed.group_size
    # exact integer dot product per group (float64 holds them exactly), then the scales
    per_group = torch.einsum("mgk,ngk->mng", q.double().reshape(-1, K // gs, gs),
                             packed.signed_weights().double().reshape(N, K // gs, gs))
    y = (per_group * packed.scale.double()[None]).sum(-1).float() * sx
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], N).to(x.dtype)
