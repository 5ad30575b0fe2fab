"""Text generation: greedy and sampling, stop tokens and strings, streaming, batches.

Two engines (:mod:`slimformer.runtime.engine`) behind the one loop
(:func:`slimformer.runtime.loop.token_steps`):
  * ``native``: :class:`~slimformer.runtime.decoder.NativeDecoder` (Llama family), packed
    prefill and the fused C++ decode step over a preallocated KV cache;
  * ``hf``: the model's own forward with its KV cache, for every other architecture
    (and for layer formats the native decoder has no kernel for).
``engine="auto"`` picks native when it can run the model and says why when it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from slimformer.runtime.decoder import GenerationError, gguf_source_path
from slimformer.runtime.engine import HFEngine, build_engine
from slimformer.runtime.loop import token_steps

__all__ = ["Generation", "Generator", "HFEngine", "SamplingConfig", "generate", "sample_next", "stop_token_ids"]


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature`` 0 means greedy. ``top_k`` 0 and ``top_p`` 1 switch those filters off."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    truncate: bool = False  # drop the start of a prompt that does not fit, instead of an error

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SamplingConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise GenerationError(f"unknown sampling option '{unknown[0]}' (known: {', '.join(sorted(known))})")
        return cls(**kwargs)


@dataclass
class Generation:
    prompt: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "length", "eos" or "stop"


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row of ``logits [B, vocab]``: argmax when greedy, else temperature,
    top-k then top-p (nucleus) filtering and one multinomial draw."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < scores.shape[-1]:
        kth = torch.topk(scores, cfg.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum - sorted_scores.softmax(-1) >= cfg.top_p  # keep the smallest prefix reaching top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]


# ----------------------------------------------------------------------- generator
@dataclass
class Generator:
    """A model ready to generate: tokenizer, engine and stop tokens."""

    engine: object
    tokenizer: object
    engine_name: str
    eos_ids: set[int] = field(default_factory=set)

    @classmethod
    def from_model(cls, model, tokenizer, engine: str = "auto", gguf_path: str | Path | None = None,
                   activations: str = "fp32") -> "Generator":
        """``gguf_path``: run that GGUF file's own quantised blocks (native engine only);
        ``activations``: ``fp32`` or ``int8`` decode arithmetic (see NativeDecoder.from_model)."""
        runner, name = build_engine(model, engine, gguf_path=gguf_path, activations=activations)
        return cls(runner, tokenizer, name, stop_token_ids(model, tokenizer))

    @classmethod
    def from_source(cls, source: str, engine: str = "auto", weights: str = "auto", trust_pickle: bool = False,
                    activations: str = "fp32") -> "Generator":
        """Load ``source`` (built-in, directory, .gguf, compressed dir). ``weights``: for a
        GGUF source, ``auto``/``gguf`` run its quantised blocks directly, ``dequantized`` runs fp32."""
        from slimformer.models.load import load

        if weights not in ("auto", "gguf", "dequantized"):
            raise GenerationError(f"unknown weights '{weights}' (choose from auto, gguf, dequantized)")
        model, tokenizer = load(source, trust_pickle=trust_pickle)
        gguf = gguf_source_path(source) if weights != "dequantized" else None
        if weights == "gguf" and gguf is None:
            raise GenerationError(f"{source} is not a GGUF model, so --weights gguf does not apply")
        return cls.from_model(model, tokenizer, engine, gguf_path=gguf if engine != "hf" else None,
                              activations=activations)

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: str | list[int], cfg: SamplingConfig) -> list[int]:
        ids = list(prompt) if not isinstance(prompt, str) else self.tokenizer(prompt).input_ids
        if not ids:
            raise GenerationError("empty prompt: give at least one token")
        context = self.engine.max_positions
        room = context - cfg.max_new_tokens
        if len(ids) > room:
            if not cfg.truncate or room < 1:
                raise GenerationError(f"prompt of {len(ids)} tokens + {cfg.max_new_tokens} new tokens exceeds the "
                                      f"model's context of {context} (shorten it, lower max_new_tokens, or truncate)")
            ids = ids[-room:]
        return ids

    # ------------------------------------------------------------------ the loop
    def stream_tokens(self, prompts: list, cfg: SamplingConfig) -> Iterator[list[int | None]]:
        """Yield, per step, the new token of each prompt (None once it has finished)."""
        seqs = [self.encode(p, cfg) for p in prompts]
        gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
        stops = () if cfg.ignore_eos else frozenset(self.eos_ids)
        def pick(logits: torch.Tensor) -> list[int]:
            return sample_next(logits, cfg, gen).tolist()

        yield from token_steps(self.engine, seqs, cfg.max_new_tokens, pick, stops)

    def generate(self, prompts: str | list, **sampling) -> list[Generation]:
        """Generate for one prompt or a batch (strings or token-id lists)."""
        cfg = SamplingConfig.from_kwargs(**sampling)
        batch = [prompts] if isinstance(prompts, str) or _is_ids(prompts) else list(prompts)
        if not batch:
            raise GenerationError("no prompts given")
        new: list[list[int]] = [[] for _ in batch]
        stopped = [None] * len(batch)
        for step_tokens in self.stream_tokens(batch, cfg):
            for b, t in enumerate(step_tokens):
                if t is None or stopped[b]:
                    continue
                new[b].append(t)
                if cfg.stop and _find_stop(self._text(new[b]), cfg.stop) is not None:
                    stopped[b] = "stop"
            if all(stopped):
                break
        results = []
        for b, p in enumerate(batch):
            ids = new[b]
            text = self._text(ids)
            reason = stopped[b] or ("eos" if ids and ids[-1] in self.eos_ids and not cfg.ignore_eos else "length")
            if reason == "stop":
                text = text[: _find_stop(text, cfg.stop)]
            elif reason == "eos":
                text = self._text(ids[:-1])
            results.append(Generation(p if isinstance(p, str) else "", text, ids, len(self.encode(p, cfg)), reason))
        return results

    def stream(self, prompt: str, **sampling) -> Iterator[str]:
        """Yield text pieces of one prompt's continuation as they are decoded."""
        cfg = SamplingConfig.from_kwargs(**sampling)
        ids: list[int] = []
        emitted = ""
        for (t,) in self.stream_tokens([prompt], cfg):
            if t is None or (t in self.eos_ids and not cfg.ignore_eos):
                break
            ids.append(t)
            text = self._text(ids)
            if text.endswith("\ufffd"):  # a multi-byte character is still incomplete
                continue
            cut = _find_stop(text, cfg.stop) if cfg.stop else None
            if cut is not None:
                if cut > len(emitted):
                    yield text[len(emitted):cut]
                return
            if len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def _is_ids(x) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(t, int) for t in x)


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def stop_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    for source in (getattr(gen_cfg, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(t) for t in source)
    return ids


def generate(model_or_source, prompts: str | list, tokenizer=None, engine: str = "auto", **sampling) -> list[Generation]:
    """One-call generation: ``slimformer.generate("smollm2-135m", "Hello", max_new_tokens=32)``.
    ``model_or_source`` is a source string (see :func:`slimformer.load`) or a loaded model
    (then pass ``tokenizer``)."""
    if isinstance(model_or_source, (str, Path)):
        gen = Generator.from_source(str(model_or_source), engine=engine)
    else:
        if tokenizer is None:
            raise GenerationError("pass the tokenizer with a loaded model")
        gen = Generator.from_model(model_or_source, tokenizer, engine)
    return gen.generate(prompts, **sampling)
