"""The engine protocol, the Hugging Face engine, and engine selection.

An :class:`Engine` runs a decoder over a :class:`Session` (its KV cache for a batch):
``prefill`` fills the cache with one prompt per row and returns each row's next-token
logits, ``decode`` appends one token per row and returns the next logits. The one
generation loop (:mod:`slimformer.runtime.loop`) drives any engine; two implement it:

* :class:`~slimformer.runtime.decoder.NativeDecoder` (``native``): packed prefill and the
  fused C++ decode step over a preallocated cache, for the families its adapter describes;
* :class:`HFEngine` (``hf``): the model's own forward and cache, for every decoder.

:func:`build_engine` picks one: ``auto`` takes native when the library loads and the
model's features are supported, else warns (naming why) and takes hf.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from slimformer.errors import SlimformerError
from slimformer.models.adapters.base import adapter_for
from slimformer.runtime import ENGINES
from slimformer.runtime.decoder import (
    GenerationError,
    NativeDecoder,
    check_supported,
    native_available,
)
from slimformer.runtime.weights import UnsupportedFormat


@runtime_checkable
class Session(Protocol):
    """A KV cache for up to ``batch`` sequences of up to ``max_len`` tokens;
    ``lengths[b]`` is how many tokens row ``b`` holds."""

    batch: int
    max_len: int
    lengths: list[int]


@runtime_checkable
class Engine(Protocol):
    """What the generation loop, the benchmarks and speed measurement drive."""

    max_positions: int

    def new_session(self, batch: int, max_len: int) -> Session: ...

    def prefill(self, session: Session, seqs: list[list[int]]) -> torch.Tensor:
        """One prompt per session row (from position 0) -> logits ``[len(seqs), vocab]``."""

    def decode(self, session: Session, tokens: list[int]) -> torch.Tensor:
        """One token for each of the first ``len(tokens)`` rows -> logits ``[len(tokens), vocab]``."""

    def describe(self) -> dict: ...


# ----------------------------------------------------------------------- HF engine
@dataclass
class HFSession:
    """The HF engine's session: the model's own cache and the left-padded attention mask."""

    batch: int
    max_len: int
    lengths: list[int] = field(default_factory=list)
    past: Any = None
    mask: torch.Tensor | None = None


class HFEngine:
    """The model's own forward and KV cache; left-padded batches with explicit positions.
    Runs on the model's device (tensor-parallel ranks may hold theirs on a GPU)."""

    name = "hf"

    def __init__(self, model):
        self.model = model
        self.max_positions = adapter_for(model).context_length(model.config)
        first = next(iter(model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")

    def describe(self) -> dict:
        return {"engine": "hf", "model": type(self.model).__name__}

    def new_session(self, batch: int, max_len: int) -> HFSession:
        if max_len > self.max_positions:
            raise GenerationError(f"{max_len} tokens exceed the model's context of {self.max_positions}")
        return HFSession(batch, max_len, [0] * batch)

    @torch.inference_mode()
    def prefill(self, sess: HFSession, seqs: list[list[int]]) -> torch.Tensor:
        longest = max(len(s) for s in seqs)
        pad = 0
        ids = torch.tensor([[pad] * (longest - len(s)) + s for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (longest - len(s)) + [1] * len(s) for s in seqs], device=self.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=True)
        sess.past, sess.mask = out.past_key_values, mask
        for b, s in enumerate(seqs):
            sess.lengths[b] = len(s)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def decode(self, sess: HFSession, tokens: list[int]) -> torch.Tensor:
        mask = torch.cat([sess.mask, torch.ones(len(tokens), 1, dtype=sess.mask.dtype, device=self.device)], dim=1)
        out = self.model(input_ids=torch.tensor(tokens, device=self.device)[:, None], attention_mask=mask,
                         position_ids=mask.sum(-1, keepdim=True) - 1, past_key_values=sess.past, use_cache=True)
        sess.past, sess.mask = out.past_key_values, mask
        for b in range(len(tokens)):
            sess.lengths[b] += 1
        return out.logits[:, -1].float()


# ----------------------------------------------------------------------- selection
def build_engine(model, engine: str = "auto", *, gguf_path: str | Path | None = None, activations: str = "fp32",
                 head: str = "model", warn: bool = True) -> tuple[Engine, str]:
    """``(engine, name)`` for ``model``. ``native`` raises GenerationError (one line) when
    the native library is unavailable or the model has a feature it cannot run; ``auto``
    then falls back to ``hf`` with a RuntimeWarning naming why."""
    if engine not in ENGINES:
        raise GenerationError(f"unknown engine '{engine}' (choose from {', '.join(ENGINES)})")
    if engine in ("auto", "native"):
        ok, why = native_available()
        if ok:
            try:
                check_supported(model)
                return NativeDecoder.from_model(model, gguf_path=gguf_path, activations=activations,
                                                head=head), "native"
            except (UnsupportedFormat, SlimformerError, RuntimeError) as exc:
                why = str(exc)
        if engine == "native":
            raise GenerationError(f"native engine cannot run this model: {why}")
        if warn:
            warnings.warn(f"engine auto: using the Hugging Face engine ({why})", RuntimeWarning, stacklevel=2)
    return HFEngine(model), "hf"
