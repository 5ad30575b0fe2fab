"""Compressed storage for pruned linear layers, with real byte counts.

``SparseLinear`` holds a pruned ``[out, in]`` weight in one of three formats (buffers,
so a compressed directory saves exactly these bytes):

- ``nm``: N:M sparsity. ``values`` ``[out, in/M*N]``: the N kept values of every group
  of M consecutive inputs; ``positions``: where each sits inside its group, packed into
  ``ceil(log2 M)`` bits (2 bits for M=4, 3 for M=8) with ``slimformer.formats.packing``.
  2:4 in fp16 is ``0.5*numel*2 + numel/2*2/8`` bytes: 1.125 bytes per weight.
- ``bitmap``: ``bitmap`` one bit per weight (uint8, packed), ``values`` the non-zeros in
  row-major order. ``numel/8 + nnz*value_bytes``: best at low sparsity.
- ``csr``: ``crow_indices`` (int32, out+1), ``col_indices`` (int16 when in <= 32767,
  else int32), ``values``. ``4*(out+1) + nnz*(index_bytes + value_bytes)``: smaller than
  the bitmap below 1/16 density (int16 indices: 2 bytes per non-zero against 1 bit per
  weight), whatever the value dtype.

For N:M the metadata is ``N*ceil(log2 M)/M`` bits per weight: below the bitmap's 1 bit
for 2:4 (equal) and 1:4 (0.5), above it for 4:8 (1.5); ``format="auto"`` still stores an
N:M weight as ``nm`` (fixed-size groups, the layout N:M kernels read).

``forward`` multiplies with the dense weight, rebuilt once and cached (not saved),
except where torch's CSR matmul measured faster on this CPU (fp32; one token at 90%
sparsity, or 70% on weights larger than L2; several tokens at 95%): see
``use_sparse_path`` and ``benchmarks/results/sparse_matmul.json``.
"""

from __future__ import annotations

import math
import typing
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from slimformer.errors import SparsityConfigError
from slimformer.formats import packing
from slimformer.formats.masks import check_nm, check_nm_fits, is_nm
from slimformer.formats.matrix import CompressedMatrix, NotNative
from slimformer.nn.base import CompressedLinear
from slimformer.nn.registry import register_module_type
from slimformer.nn.surgery import is_linear, linear_weight, set_module

FORMATS = ("nm", "bitmap", "csr")
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INT16_MAX_COLUMNS = 32767   # int16 column indices reach column 32767

# When torch's CSR matmul (MKL sparse BLAS; fp32 only: no fp16/bf16 CPU kernel) beats
# dense F.linear, measured on this CPU (2-core AMD EPYC, 1 MiB L2 per core) for
# SmolLM2's projections, over several runs of benchmarks/sparse_matmul.py (the last in
# benchmarks/results/sparse_matmul.json). csr/dense time:
# - one token (decode, torch.mv): 90-95% sparsity 0.25-0.6x in every shape; 70% 0.5-0.8x
#   on weights larger than L2 (1536x576, 576x1536) but a tie on 576x576 (0.75-1.1x);
#   50% and 2:4 from 0.65x (1536x576) to 1.25x (576x576);
# - 16 or 512 tokens (sparse.mm): 95% 0.4-1.05x (never clearly slower); 90% anywhere from
#   0.5x to 1.3x (576x576 at 512 tokens flips between runs); 70% 0.8-1.3x at 16 tokens and
#   ~2x slower at 512; 50% and 2:4 1.1-4x slower.
# The rule keeps the wins that held in every run, so it never picks the slower path; the
# ties and run-dependent cases stay dense. Caveat: with another process busy on the other
# core, MKL's 2-thread sparse kernels sometimes wait a scheduler slice (3-12 ms for one
# token, where dense takes 0.03-0.25 ms), seen in runs on this machine under load.
DECODE_MAX_DENSITY = 0.12
DECODE_MAX_DENSITY_LARGE = 0.35   # for weights of at least LARGE_WEIGHT elements
LARGE_WEIGHT = 1 << 19            # 2 MiB of fp32: this CPU's L2 (both cores)
MANY_TOKENS_MAX_DENSITY = 0.06


def use_sparse_path(density: float, tokens: int, numel: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the measured rule above picks torch's CSR matmul for a weight of ``numel``
    elements with ``density`` non-zeros, multiplied by ``tokens`` rows of ``dtype``."""
    if device.type != "cpu" or dtype != torch.float32 or tokens < 1:
        return False
    if tokens == 1:
        return density <= (DECODE_MAX_DENSITY_LARGE if numel >= LARGE_WEIGHT else DECODE_MAX_DENSITY)
    return density <= MANY_TOKENS_MAX_DENSITY


def csr_linear(x: torch.Tensor, weight_csr: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with W a torch ``sparse_csr`` tensor: ``(W @ xᵀ)ᵀ``, made
    contiguous because callers ``view`` projection outputs (Llama's q/k/v)."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == 1:   # decode: the matrix-vector kernel (faster than mm with one column)
        out = torch.mv(weight_csr, flat[0]).unsqueeze(0)
    else:
        out = torch.sparse.mm(weight_csr, flat.t()).t().contiguous()
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], weight_csr.shape[0])


def position_bits(m: int) -> int:
    """Bits per kept weight's position inside its group of ``m``."""
    return max(1, math.ceil(math.log2(m)))


def format_bytes(fmt: str, out_features: int, in_features: int, nnz: int, value_bytes: int,
                 n: int | None = None, m: int | None = None) -> int:
    """Bytes of a weight (no bias) stored in ``fmt``; what ``stored_bytes`` returns."""
    numel = out_features * in_features
    if fmt == "nm":
        kept = numel // m * n
        return kept * value_bytes + packing.packed_nbytes(kept, position_bits(m))
    if fmt == "bitmap":
        return packing.packed_nbytes(numel, 1) + nnz * value_bytes
    if fmt == "csr":
        index_bytes = 2 if in_features <= INT16_MAX_COLUMNS else 4
        return 4 * (out_features + 1) + nnz * (index_bytes + value_bytes)
    raise SparsityConfigError(f"unknown sparse storage format {fmt!r} (choose from {', '.join(FORMATS)})")


def _storage_dtype(dtype, weight_dtype: torch.dtype, name: str) -> torch.dtype:
    if dtype is None:
        dtype = weight_dtype
    if isinstance(dtype, str):
        dtype = STORAGE_DTYPES.get(dtype, dtype)
    if dtype not in STORAGE_DTYPES.values():
        raise SparsityConfigError(f"{name}: storage dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@register_module_type
class SparseLinear(CompressedLinear):
    """``y = x @ Wᵀ + b`` with W held in a compressed sparse format (see module docstring).

    ``nnz`` (bitmap, csr) and ``n``, ``m`` (nm) fix the buffer shapes, so ``from_config``
    can rebuild an empty module that a saved state dict then fills.
    """

    def __init__(self, in_features: int, out_features: int, format: str, *, nnz: int = 0,
                 n: int | None = None, m: int | None = None, bias: bool = False,
                 storage_dtype: torch.dtype = torch.float32, dtype: torch.dtype = torch.float32):
        super().__init__()
        if format not in FORMATS:
            raise SparsityConfigError(f"unknown sparse storage format {format!r} (choose from {', '.join(FORMATS)})")
        self.in_features, self.out_features, self.format = in_features, out_features, format
        self.n, self.m, self.nnz = n, m, nnz
        self.compute_dtype = dtype
        if format == "nm":
            kept = out_features * in_features // m * n
            self.nnz = kept   # stored slots, zeros included when a group keeps fewer than N
            self.register_buffer("values", torch.zeros(out_features, in_features // m * n, dtype=storage_dtype))
            self.register_buffer("positions", torch.zeros(packing.packed_nbytes(kept, position_bits(m)), dtype=torch.uint8))
        elif format == "bitmap":
            numel = out_features * in_features
            self.register_buffer("bitmap", torch.zeros(packing.packed_nbytes(numel, 1), dtype=torch.uint8))
            self.register_buffer("values", torch.zeros(nnz, dtype=storage_dtype))
        else:
            index_dtype = torch.int16 if in_features <= INT16_MAX_COLUMNS else torch.int32
            self.register_buffer("crow_indices", torch.zeros(out_features + 1, dtype=torch.int32))
            self.register_buffer("col_indices", torch.zeros(nnz, dtype=index_dtype))
            self.register_buffer("values", torch.zeros(nnz, dtype=storage_dtype))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.values.dtype   # follows .half() / .to(dtype) of the module

    # Runtime copies (not buffers: never saved, rebuilt after .to() or a state-dict load).
    _dense: torch.Tensor | None = None   # the dense weight, in the dtype of the last input
    _csr: torch.Tensor | None = None     # torch sparse_csr (int32 indices, fp32) for use_sparse_path

    @classmethod
    def from_linear(cls, linear: nn.Module, format: str = "auto", n: int | None = None, m: int | None = None,
                    dtype: torch.dtype | str | None = None, name: str = "linear") -> SparseLinear:
        """Compress a pruned ``nn.Linear`` (or GPT-2 ``Conv1D``). ``format="auto"``: ``nm`` when
        ``n``, ``m`` are given and the weight is N:M, else the smaller of bitmap and csr.
        ``dtype``: storage dtype of the values (default: the weight's). ``name`` appears in errors."""
        while getattr(linear, "keeps_inner", False):
            linear = linear.inner
        if not is_linear(linear):
            raise SparsityConfigError(f"{name}: {type(linear).__name__} is not a linear layer")
        weight = linear_weight(linear).detach()
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_weight(weight, bias, format, n, m, dtype, name)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, format: str = "auto",
                    n: int | None = None, m: int | None = None, dtype: torch.dtype | str | None = None,
                    name: str = "weight") -> SparseLinear:
        """As ``from_linear``, from an ``[out, in]`` weight and optional bias."""
        if format not in ("auto", *FORMATS):
            raise SparsityConfigError(f"{name}: unknown sparse storage format {format!r} "
                                      f"(choose from auto, {', '.join(FORMATS)})")
        if weight.dim() != 2 or not weight.is_floating_point():
            raise SparsityConfigError(f"{name}: expected a 2-D floating-point weight, got {tuple(weight.shape)} {weight.dtype}")
        if (n is None) != (m is None):
            raise SparsityConfigError(f"{name}: give both n and m for N:M storage, got n={n}, m={m}")
        if format == "nm" and n is None:
            raise SparsityConfigError(f"{name}: format 'nm' needs n and m")
        weight = weight.detach()
        storage = _storage_dtype(dtype, weight.dtype, name)
        out_features, in_features = weight.shape
        if n is not None:
            try:
                check_nm(n, m)
            except SparsityConfigError as exc:
                raise SparsityConfigError(f"{name}: {exc}") from None
            if position_bits(m) > 8:
                raise SparsityConfigError(f"{name}: M={m} too large for N:M storage (positions are packed in at most 8 bits)")
        if format == "nm":
            check_nm_fits(name, in_features, m)
            if not is_nm(weight, n, m):
                groups = (weight != 0).reshape(out_features, in_features // m, m).sum(-1)
                row, group = (groups > n).nonzero()[0].tolist()
                raise SparsityConfigError(f"{name}: weight is not {n}:{m} sparse (row {row}, group {group} "
                                          f"has {int(groups[row, group])} non-zeros)")
        if format == "auto":
            if n is not None and is_nm(weight, n, m):
                format = "nm"
            else:
                nnz = int((weight != 0).sum())
                size = {f: format_bytes(f, out_features, in_features, nnz, storage.itemsize) for f in ("bitmap", "csr")}
                format = min(size, key=size.get)
        return cls._pack(weight, bias, format, n, m, storage)

    @classmethod
    def _pack(cls, weight, bias, format, n, m, storage) -> SparseLinear:
        out_features, in_features = weight.shape
        values = weight.to(storage)
        nz = weight != 0
        nnz = int(nz.sum())
        module = cls(in_features, out_features, format, nnz=nnz, n=n if format == "nm" else None,
                     m=m if format == "nm" else None, bias=bias is not None, storage_dtype=storage, dtype=weight.dtype)
        if format == "nm":
            groups = weight.abs().reshape(out_features, in_features // m, m)
            # The N largest |w| per group cover every non-zero (at most N of them); sorted
            # positions make the encoding unique. Zero-valued slots are stored as 0.
            pos = groups.float().topk(n, dim=-1).indices.sort(dim=-1).values
            kept = values.reshape(out_features, in_features // m, m).gather(-1, pos)
            module.values = kept.reshape(out_features, -1).contiguous()
            module.positions = packing.pack(pos.to(torch.uint8), position_bits(m))
        elif format == "bitmap":
            module.bitmap = packing.pack(nz.to(torch.uint8), 1)
            module.values = values[nz].contiguous()
        else:
            counts = nz.sum(dim=1, dtype=torch.int32)
            crow = torch.zeros(out_features + 1, dtype=torch.int32, device=weight.device)
            crow[1:] = counts.cumsum(0)
            module.crow_indices = crow
            module.col_indices = nz.nonzero()[:, 1].to(module.col_indices.dtype)
            module.values = values[nz].contiguous()
        if bias is not None:
            module.bias = bias.detach().clone()
        return module

    def dense_weight(self) -> torch.Tensor:
        """The ``[out, in]`` weight, rebuilt exactly from storage, in the compute dtype."""
        rows, cols = self.out_features, self.in_features
        values = self.values.to(self.compute_dtype)
        dense = torch.zeros(rows, cols, dtype=self.compute_dtype, device=values.device)
        if self.format == "nm":
            groups = cols // self.m
            pos = packing.unpack(self.positions, position_bits(self.m), rows * groups * self.n)
            pos = pos.reshape(rows, groups, self.n).long()
            dense.view(rows, groups, self.m).scatter_(-1, pos, values.reshape(rows, groups, self.n))
        elif self.format == "bitmap":
            mask = packing.unpack(self.bitmap, 1, rows * cols).bool().reshape(rows, cols)
            dense[mask] = values
        else:
            counts = self.crow_indices.diff().long()
            row = torch.repeat_interleave(torch.arange(rows, device=values.device), counts)
            dense[row, self.col_indices.long()] = values
        return dense

    def density(self) -> float:
        """Fraction of weights stored as non-zero (N:M: N/M, the slots)."""
        return self.nnz / (self.in_features * self.out_features)

    def stored_bytes(self) -> int:
        """Real bytes of the stored tensors (weight storage and bias)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def dense_bytes(self) -> int:
        """Bytes of the same layer as a dense ``nn.Linear`` in the compute dtype."""
        numel = self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)
        return numel * self.compute_dtype.itemsize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if use_sparse_path(self.density(), tokens, self.in_features * self.out_features, x.dtype, x.device):
            if self._csr is None:
                self._csr = self._runtime_csr()
            return csr_linear(x, self._csr, bias)
        if self._dense is None or self._dense.dtype != x.dtype or self._dense.device != x.device:
            self._dense = self.dense_weight().to(device=x.device, dtype=x.dtype)
        return F.linear(x, self._dense, bias)

    def _runtime_csr(self) -> torch.Tensor:
        # MKL's sparse kernels take int32 indices without a per-call conversion.
        dense = self.dense_weight().float()
        nz = dense != 0
        crow = torch.zeros(self.out_features + 1, dtype=torch.int32, device=dense.device)
        crow[1:] = nz.sum(dim=1, dtype=torch.int32).cumsum(0)
        col = nz.nonzero()[:, 1].int()
        with warnings.catch_warnings():   # "CSR support is in beta": once per process, not actionable
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(crow, col, dense[nz], dense.shape, check_invariants=False)

    def drop_runtime(self) -> None:
        self._dense = self._csr = None   # new weights, or .to()/.half() moved or cast the storage

    def dequantized_weight(self) -> torch.Tensor:
        return self.dense_weight()

    def matrix(self, name: str = "") -> CompressedMatrix:
        raise NotNative(f"{self.format} sparse storage has no native format: the native engine runs its dense "
                        "weight", dense_ok=True)

    def extra_repr(self) -> str:
        fmt = f"{self.n}:{self.m}" if self.format == "nm" else self.format
        return (f"{self.in_features}, {self.out_features}, format={fmt}, density={self.density():.3f}, "
                f"values={_dtype_name(self.storage_dtype)}, bias={self.bias is not None}")

    def config(self) -> dict:
        """What a saved directory records to rebuild this module."""
        return {
            "type": "SparseLinear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "format": self.format,
            "nnz": self.nnz,
            "n": self.n,
            "m": self.m,
            "bias": self.bias is not None,
            "storage_dtype": _dtype_name(self.storage_dtype),
        }

    @classmethod
    def from_config(cls, cfg: dict, dtype: torch.dtype = torch.float32) -> SparseLinear:
        return cls(cfg["in_features"], cfg["out_features"], cfg["format"], nnz=cfg["nnz"], n=cfg["n"], m=cfg["m"],
                   bias=cfg["bias"], storage_dtype=STORAGE_DTYPES[cfg["storage_dtype"]], dtype=dtype)


def sparsify_linears(model: nn.Module, names_or_filter: typing.Iterable[str] | typing.Callable[[str, nn.Module], bool],
                     format: str = "auto", n: int | None = None, m: int | None = None,
                     dtype: torch.dtype | str | None = None) -> dict[str, tuple[int, int]]:
    """Swap pruned linear layers of ``model`` for ``SparseLinear``.

    ``names_or_filter``: dotted module names, or ``filter(name, module) -> bool`` over the
    model's linear layers. Returns ``{name: (dense_bytes, stored_bytes)}`` per swapped layer.
    """
    if callable(names_or_filter):
        names = [name for name, mod in model.named_modules()
                 if is_linear(mod) and not isinstance(mod, SparseLinear) and names_or_filter(name, mod)]
    else:
        names = list(names_or_filter)
        if isinstance(names_or_filter, str):
            names = [names_or_filter]
    sizes = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise SparsityConfigError(f"{name}: no such module in the model") from None
        sparse = SparseLinear.from_linear(module, format, n, m, dtype, name=name)
        set_module(model, name, sparse)
        sizes[name] = (sparse.dense_bytes(), sparse.stored_bytes())
    return sizes
