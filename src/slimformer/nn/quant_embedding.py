"""An int8 token-embedding table, and the tied LM head that multiplies with the same codes.

:class:`QuantEmbedding` replaces an ``nn.Embedding`` ``[vocab, hidden]``: ``qweight`` holds
signed int8 codes (symmetric, no offset), ``scale`` float16 scales, one per row
(``group_size=None``) or one per ``group_size`` columns of a row. ``w = code * scale``.
Both layouts are GGUF Q8_0 exactly: groups of 32 are its blocks as they are, and one scale
per row is a Q8_0 block scale repeated along the row. The codes are chosen by
``formats.primitives.quantize_weight`` (round to nearest against the stored float16 scale,
the same rounding as ``QuantLinear``), shifted from its unsigned storage to signed.

``forward(input_ids)`` looks up the rows and dequantises only those (no dense copy of the
table). :meth:`QuantEmbedding.matrix` describes the table as a ``Q8``
:class:`~slimformer.formats.matrix.CompressedMatrix` sharing ``qweight``'s storage: what
the native decoder looks rows up in (and multiplies with, tied) and what an exporter
writes as Q8_0.

:class:`QuantTiedHead` is a tied LM head (``config.tie_word_embeddings``): it holds no
tensors, only a reference to the embedding module, so the codes exist once in memory and
once on disk. A saved directory records which module it reads (``embedding``), and the
loader re-links it (:meth:`QuantTiedHead.link`) once every module is in place. Its forward
runs ``slimformer.kernels``' int8 per-row kernel on the embedding's own codes when the
table has one scale per row; a table in groups (no int8 kernel takes group scales) or a
machine without the kernels multiplies tile by tile (rows dequantised per call, never the
whole table at once): slower, recorded in ``fallback`` and warned once.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimformer import kernels
from slimformer.errors import ModelLoadError, QuantConfigError
from slimformer.formats.matrix import Q8, CompressedMatrix, NotNative
from slimformer.formats.primitives import quantize_weight
from slimformer.formats.spec import WeightSpec
from slimformer.nn.base import CompressedLinear, CompressedModule
from slimformer.nn.registry import register_module_type

_TILE_BYTES = 8 << 20   # fp32 rows dequantised at a time by the tiled head fallback


def embedding_spec(num_columns: int, group_size: int | None) -> WeightSpec:
    """The 8-bit symmetric weight format of a table: per row, or groups of ``group_size``."""
    if group_size is None:
        return WeightSpec(8, True, "channel")
    if group_size < 1 or num_columns % group_size:
        raise QuantConfigError(f"group_size {group_size} does not divide the embedding's {num_columns} columns")
    return WeightSpec(8, True, "group", group_size)


def quantize_table(weight: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[V, H]`` float table -> (signed int8 codes ``[V, H]``, float16 scales ``[V, G]``)."""
    codes, scale, _ = quantize_weight(weight.detach().float(), embedding_spec(weight.shape[1], group_size))
    signed = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
    return signed, scale.to(torch.float16).contiguous()


@register_module_type
class QuantEmbedding(CompressedModule):
    """``nn.Embedding`` with int8 codes ``qweight [V, H]`` and float16 ``scale [V, H/gs]``."""

    not_native = ("an embedding table is looked up, not multiplied: the native decoder takes it through "
                  "QuantEmbedding.matrix() as its embedding (and tied LM head)")

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int | None = None,
                 padding_idx: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        embedding_spec(embedding_dim, group_size)   # validate
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.group_size, self.padding_idx = group_size, padding_idx
        groups = 1 if group_size is None else embedding_dim // group_size
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings, groups, dtype=torch.float16))
        self.compute_dtype = dtype

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int | None = None,
                   padding_idx: int | None = None) -> "QuantEmbedding":
        """Round a ``[V, H]`` table to nearest (symmetric int8, float16 scales)."""
        V, H = weight.shape
        module = cls(V, H, group_size, padding_idx, weight.dtype)
        module.qweight, module.scale = quantize_table(weight, group_size)
        return module

    @property
    def gs(self) -> int:
        return self.group_size or self.embedding_dim

    @property
    def groups(self) -> int:
        return self.embedding_dim // self.gs

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        codes = self.qweight[input_ids]                      # [..., H] int8: only the rows asked for
        scale = self.scale[input_ids].float()                # [..., G]
        rows = codes.float().unflatten(-1, (self.groups, self.gs)) * scale[..., None]
        return rows.flatten(-2).to(self.compute_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The whole table ``[V, H]`` (the reference; the forward never builds it)."""
        w = self.qweight.float().reshape(self.num_embeddings, self.groups, self.gs) * self.scale.float()[..., None]
        return w.reshape(self.num_embeddings, self.embedding_dim).to(self.compute_dtype)

    def matrix(self, name: str = "", group_size: int | None = None) -> CompressedMatrix:
        """The table as a ``Q8`` description (``N`` = vocab, ``K`` = hidden): the stored codes
        and float16 scales themselves, no copy; ``w = code * scale``. ``group_size``: the same
        weights described in groups of that many columns, each scale repeated over the groups
        it covers (exact; ``group_size=32`` of a per-row table gives GGUF Q8_0 blocks)."""
        label = name or "QuantEmbedding"
        desc = CompressedMatrix(label, Q8, self.num_embeddings, self.embedding_dim, self.gs,
                                self.qweight, self.scale, bits=8, symmetric=True)
        if group_size is None or group_size == self.gs:
            return desc
        if group_size < 1 or self.gs % group_size:
            raise NotNative(f"{label}: its scales cover {self.gs} columns each, which groups of {group_size} "
                            "do not divide")
        return desc.replace(gs=group_size, scale=self.scale.repeat_interleave(self.gs // group_size, dim=1))

    def nbytes(self) -> int:
        return self.qweight.numel() + 2 * self.scale.numel()

    def extra_repr(self) -> str:
        gran = "row" if self.group_size is None else f"g{self.group_size}"
        return f"{self.num_embeddings}, {self.embedding_dim}, int8-{gran}"

    def config(self) -> dict:
        return {"type": "QuantEmbedding", "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "group_size": self.group_size, "padding_idx": self.padding_idx}

    @classmethod
    def from_config(cls, cfg: dict, dtype: torch.dtype = torch.float32) -> "QuantEmbedding":
        return cls(cfg["num_embeddings"], cfg["embedding_dim"], cfg.get("group_size"), cfg.get("padding_idx"), dtype)


@register_module_type
class QuantTiedHead(CompressedLinear):
    """An LM head tied to a :class:`QuantEmbedding`: ``logits = x @ table^T (+ bias)`` on the
    embedding's own codes (a reference, not a copy; see the module doc)."""

    def __init__(self, embedding_path: str, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.embedding_path = embedding_path
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.compute_dtype = dtype
        # Not a submodule: the table is saved once, under the embedding's name.
        object.__setattr__(self, "_embedding", None)

    @classmethod
    def tie(cls, embedding: QuantEmbedding, embedding_path: str, bias: torch.Tensor | None = None) -> "QuantTiedHead":
        head = cls(embedding_path, embedding.embedding_dim, embedding.num_embeddings, bias is not None,
                   embedding.compute_dtype)
        if bias is not None:
            head.bias = bias.detach().clone()
        head.bind(embedding)
        return head

    def bind(self, embedding: nn.Module) -> None:
        if not isinstance(embedding, QuantEmbedding):
            raise ModelLoadError(f"QuantTiedHead: {self.embedding_path} is a {type(embedding).__name__}, "
                                 "not a QuantEmbedding")
        if (embedding.num_embeddings, embedding.embedding_dim) != (self.out_features, self.in_features):
            raise ModelLoadError(f"QuantTiedHead: {self.embedding_path} is [{embedding.num_embeddings}, "
                                 f"{embedding.embedding_dim}], the head [{self.out_features}, {self.in_features}]")
        object.__setattr__(self, "_embedding", embedding)
        self.drop_runtime()

    def link(self, model: nn.Module) -> None:
        try:
            embedding = model.get_submodule(self.embedding_path)
        except AttributeError:
            raise ModelLoadError(f"QuantTiedHead: the model has no module {self.embedding_path}") from None
        self.bind(embedding)

    @property
    def embedding(self) -> QuantEmbedding:
        if self._embedding is None:
            raise ModelLoadError(f"QuantTiedHead tied to {self.embedding_path} was not linked to it "
                                 "(nn.base.link_modules after loading)")
        return self._embedding

    # ------------------------------------------------------------------ compute
    def dequantized_weight(self) -> torch.Tensor:
        return self.embedding.dequantized_weight()

    def _kernel_path(self) -> tuple[str | None, str | None]:
        if not kernels.kernels_available():
            return None, f"kernels unavailable ({kernels.load_error()}): the head multiplies tile by tile (fp32)"
        if self.embedding.group_size is not None:
            return None, (f"int8 groups of {self.embedding.group_size} have no int8 kernel in slimformer.kernels "
                          "(one scale per row): the head multiplies tile by tile (fp32); the native decoder "
                          "runs it natively")
        return "int8", None

    def runtime_fallback(self) -> str | None:
        return self._kernel_path()[1]

    _runtime: tuple | None = None   # (the embedding's qweight it was built from, PackedInt8)

    def drop_runtime(self) -> None:
        self._runtime = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.embedding
        kind, why = self._kernel_path()
        if kind is None:
            if why is not None:
                self.set_fallback(why)
            return self._tiled(x)
        if self._runtime is None or self._runtime[0] is not emb.qweight:
            # the embedding's codes as they are (the kernel's q = code, corr = 0): no copy of the table
            N = emb.num_embeddings
            packed = kernels.PackedInt8(emb.qweight, emb.scale.float().reshape(N).contiguous(), torch.zeros(N),
                                        torch.zeros(N, dtype=torch.int32), 8, True)
            self._runtime = (emb.qweight, packed)
        return kernels.int8_linear(x, self._runtime[1], self.bias).to(x.dtype)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.embedding
        N, K = self.out_features, self.in_features
        x2 = x.reshape(-1, K).float()
        rows = max(64, _TILE_BYTES // (4 * K))
        y = torch.empty(x2.shape[0], N, dtype=torch.float32)
        for n0 in range(0, N, rows):
            n1 = min(N, n0 + rows)
            w = emb.qweight[n0:n1].float().reshape(n1 - n0, emb.groups, emb.gs) * emb.scale[n0:n1].float()[..., None]
            y[:, n0:n1] = x2 @ w.reshape(n1 - n0, K).t()
        if self.bias is not None:
            y += self.bias.float()
        return y.reshape(*x.shape[:-1], N).to(x.dtype)

    # ------------------------------------------------------------------ description
    def matrix(self, name: str = "", group_size: int | None = None) -> CompressedMatrix:
        """The embedding's ``Q8`` description (the same storage), with this head's bias
        (``group_size``: see :meth:`QuantEmbedding.matrix`)."""
        desc = self.embedding.matrix(name or "QuantTiedHead", group_size)
        if desc.K % 16 or desc.gs % 16:
            raise NotNative(f"int8 decode kernels need K={desc.K} and group size {desc.gs} to be multiples of 16")
        if self.bias is not None:
            desc = desc.replace(bias=self.bias.detach().float().contiguous())
        return desc

    def extra_repr(self) -> str:
        return f"tied to {self.embedding_path}, {self.in_features}, {self.out_features}"

    def config(self) -> dict:
        return {"type": "QuantTiedHead", "embedding": self.embedding_path, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_config(cls, cfg: dict, dtype: torch.dtype = torch.float32) -> "QuantTiedHead":
        return cls(cfg["embedding"], cfg["in_features"], cfg["out_features"], cfg.get("bias", False), dtype)
