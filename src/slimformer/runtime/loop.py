"""The one generation loop: prefill, then pick a token per row and decode, until
``max_new_tokens`` or every row has hit a stop token. Greedy or sampled, batches,
any :class:`~slimformer.runtime.engine.Engine`.

Used by :class:`~slimformer.runtime.generate.Generator` (and so ``slimformer generate``),
:mod:`slimformer.runtime.bench`, :func:`slimformer.eval.cost.measure_speed` and
:func:`slimformer.runtime.parallel.greedy_generate` (tensor parallelism).

Per step it costs one ``pick`` (an argmax over ``[B, vocab]`` when greedy), one
``.tolist()`` and a Python pass over the batch: no tensor is allocated beyond what
the engine's ``decode`` and ``pick`` return.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator

import torch

Pick = Callable[[torch.Tensor], list[int]]


def greedy(logits: torch.Tensor) -> list[int]:
    """The most likely token of each row of ``logits [B, vocab]`` (first maximum on ties)."""
    return logits.argmax(-1).tolist()


def token_steps(engine, seqs: list[list[int]], max_new_tokens: int, pick: Pick = greedy,
                stop_ids: Collection[int] = (), session=None) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of each sequence (None once it has stopped).

    ``pick`` turns the logits ``[B, vocab]`` into one token per row (greedy by default;
    a sampler, or a pick that agrees across tensor-parallel ranks). A row stops after
    yielding a token in ``stop_ids``; finished rows keep decoding (their tokens are not
    yielded) so the batch keeps its shape. ``session``: an engine session to fill
    (default: a new one sized for the prompts plus ``max_new_tokens``)."""
    if max_new_tokens < 1 or not seqs:
        return
    sess = session if session is not None else engine.new_session(
        len(seqs), max(len(s) for s in seqs) + max_new_tokens)
    logits = engine.prefill(sess, seqs)
    n = len(seqs)
    done = [False] * n
    live = n
    last = max_new_tokens - 1
    for step in range(max_new_tokens):
        nxt = pick(logits)
        if live == n and not stop_ids:  # the common case: nobody stopped, nothing can stop
            yield nxt
        else:
            out: list[int | None] = []
            for b, t in enumerate(nxt):
                if done[b]:
                    out.append(None)
                    continue
                out.append(t)
                if t in stop_ids:
                    done[b] = True
                    live -= 1
            yield out
            if not live:
                return
        if step == last:
            return
        logits = engine.decode(sess, nxt)


def generate_ids(engine, seqs: list[list[int]], max_new_tokens: int, pick: Pick = greedy,
                 stop_ids: Collection[int] = ()) -> list[list[int]]:
    """The new tokens of each sequence (a stop token included, nothing after it)."""
    new: list[list[int]] = [[] for _ in seqs]
    for step in token_steps(engine, seqs, max_new_tokens, pick, stop_ids):
        for b, t in enumerate(step):
            if t is not None:
                new[b].append(t)
    return new


def run_greedy(engine, ids: list[int], new_tokens: int) -> None:
    """Prefill ``ids`` and greedily decode ``new_tokens`` tokens, batch 1, no stop: the
    workload the speed measurements time."""
    for _ in token_steps(engine, [ids], new_tokens):
        pass
