"""The bases of the module types a saved model holds (``nn/registry.py``).

:class:`CompressedModule`: every registered type. It records ``config()`` /
``from_config(cfg, dtype)`` (what a compressed directory stores to rebuild it), a
``fallback`` reason (None, or why the module runs a slower path than the format asked
for: reports collect these) and :meth:`drop_runtime` (forget caches built from the
buffers: kernel layouts, dequantised weights — called after new weights are loaded or a
streamed block is released).

:class:`CompressedLinear`: a compressed ``[out, in]`` linear layer. It gives the reference
(:meth:`dequantized_weight`), its format description (:meth:`matrix`, a
:class:`~slimformer.formats.matrix.CompressedMatrix`, or :class:`NotNative` with the
reason), and how to shard it (:meth:`shard`).

A module that is not one matrix (``HiddenStateQuant``: a fake-quantisation hook on a block's
hidden state) subclasses :class:`CompressedModule` only: it has no weight to describe,
dequantise or shard.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from slimformer.formats.matrix import CompressedMatrix, NotNative

__all__ = ["CompressedModule", "CompressedLinear", "NotNative", "warn_once", "dense_linear", "link_modules"]

_WARNED: set = set()


def warn_once(key, message: str, stacklevel: int = 3) -> bool:
    """Warn ``message`` (RuntimeWarning) the first time ``key`` is seen in this process."""
    if key in _WARNED:
        return False
    _WARNED.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
    return True


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding exactly ``weight`` ``[out, in]`` (frozen; no random init)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().contiguous().clone(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().contiguous().clone(), requires_grad=False)
    return linear


class CompressedModule(nn.Module):
    """Base of every registered module type (see the module doc)."""

    fallback: str | None = None

    def config(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} does not say how to rebuild itself (config)")

    @classmethod
    def from_config(cls, cfg: dict, dtype: torch.dtype = torch.float32) -> "CompressedModule":
        raise NotImplementedError(f"{cls.__name__} cannot be rebuilt from a config")

    def drop_runtime(self) -> None:
        """Forget whatever was built from the buffers (default: nothing is)."""

    def link(self, model: nn.Module) -> None:
        """Resolve references to other modules of ``model`` (a tied LM head to its embedding),
        once a loader has put every saved module in place (default: there are none)."""

    def runtime_fallback(self) -> str | None:
        """Why this module will run a slower path than its format asked for (None: it will
        not), known before it runs: what the runner records after compressing."""
        return self.fallback

    def set_fallback(self, reason: str) -> None:
        """Record that this module runs a slower path than asked, and warn once per
        (module type, reason) in this process."""
        self.fallback = reason
        warn_once((type(self).__name__, reason), f"slimformer: {type(self).__name__} runs a slower path: {reason}",
                  stacklevel=4)

    def _load_from_state_dict(self, *args, **kwargs):
        self.drop_runtime()   # new weights: caches are rebuilt from them
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self.drop_runtime()   # .to()/.half() moved or cast the buffers the caches came from
        return super()._apply(fn, recurse)


def link_modules(model: nn.Module) -> None:
    """Call :meth:`CompressedModule.link` on every compressed module of ``model``: what a
    loader does after rebuilding the saved modules from their configs."""
    for module in model.modules():
        if isinstance(module, CompressedModule):
            module.link(model)


class CompressedLinear(CompressedModule):
    """A compressed linear layer: ``y ≈ x @ dequantized_weight()ᵀ + bias``.

    Subclasses set ``in_features``/``out_features`` and implement
    :meth:`dequantized_weight`, :meth:`matrix` (or raise :class:`NotNative` from it with the
    reason) and ``config``/``from_config``; :attr:`dense_equivalent` says whether the
    dequantised weight alone computes the layer (weight-only formats) — if not (the input
    is quantised or decomposed too), no runtime may run it as a dense matrix."""

    in_features: int
    out_features: int

    @property
    def dense_equivalent(self) -> bool:
        return True

    def dequantized_weight(self) -> torch.Tensor:
        """The reference dense weight ``[out, in]`` this layer multiplies with."""
        raise NotImplementedError(f"{type(self).__name__} does not give its dequantised weight")

    def matrix(self, name: str = "") -> CompressedMatrix:
        """This layer as a format description the native runtime runs, or
        :class:`NotNative` (with the reason, and whether the dense weight is equivalent)."""
        raise NotImplementedError(f"{type(self).__name__} neither describes itself as a matrix nor says why not")

    def shard(self, rank: int, world: int, dim: int, index=None, name: str = "") -> nn.Module:
        """This rank's part: output rows (``dim=0``; ``index``: a row index tensor, default the
        ``rank``-th of ``world`` equal slices; bias rows kept) or input columns (``dim=1``;
        ``index``: ``(start, stop)``; no bias: it is added once after the partial sums are
        reduced). Default: a dense ``nn.Linear`` of the dequantised weight, the reason
        recorded in its ``fallback`` (and warned once); refused when the dense weight is
        not equivalent (:class:`NotNative`)."""
        label = name or type(self).__name__
        if not self.dense_equivalent:
            raise NotNative(f"{label}: a {type(self).__name__} quantises or decomposes its input, which a dense "
                            "shard would not do", dense_ok=False)
        weight = self.dequantized_weight()
        bias = getattr(self, "bias", None)
        if dim == 0:
            rows = _rows(self.out_features, rank, world, index, label)
            local = dense_linear(weight[rows], None if bias is None else bias[rows])
        else:
            start, stop = _cols(self.in_features, rank, world, index, label)
            local = dense_linear(weight[:, start:stop], None)
        local.fallback = f"{type(self).__name__} has no sharded form: its shard runs dense"
        warn_once((type(self).__name__, local.fallback), f"slimformer: {label}: {local.fallback}")
        return local


def _rows(n: int, rank: int, world: int, index, label: str) -> torch.Tensor:
    if index is not None:
        return torch.as_tensor(index, dtype=torch.long)
    if n % world:
        raise ValueError(f"{label}: world size {world} does not divide its {n} output features")
    per = n // world
    return torch.arange(rank * per, (rank + 1) * per)


def _cols(n: int, rank: int, world: int, index, label: str) -> tuple[int, int]:
    if index is not None:
        return int(index[0]), int(index[1])
    if n % world:
        raise ValueError(f"{label}: world size {world} does not divide its {n} input features")
    per = n // world
    return rank * per, (rank + 1) * per
