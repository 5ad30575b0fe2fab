"""Decode and prefill speed of the native runtime, side by side with Hugging Face eager
and llama.cpp, by the protocol of ``../shared/MEASURING.md``:

* decode tokens/s at batch 1: greedy after a short prompt, ``n`` new tokens forced;
  rate = (n - 1) / (time for n new tokens - time for 1), so prefill and set-up cancel;
* prefill tokens/s: one forward over a ``prompt_len``-token prompt that fills the cache;
* every engine is timed in the same run, round-robin (one warm-up round, then the
  median, min and max of ``repeats`` rounds), so machine drift hits all alike;
* streaming read bandwidth (sum over a 1 GiB fp32 buffer) gives each path's roofline:
  bandwidth / bytes of weights read per decoded token.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from slimformer.errors import SlimformerError
from slimformer.runtime.decoder import NativeDecoder
from slimformer.runtime.loop import run_greedy
from slimformer.util.paths import public_name

COMPETITORS = ("hf", "llama.cpp")


@dataclass
class Timed:
    """One engine: ``run(ids, n)`` prefills ``ids`` and greedily decodes ``n`` tokens."""

    name: str
    run: Callable[[list[int], int], None]
    bytes_per_token: int | None = None
    info: dict = field(default_factory=dict)


def native_timed(name: str, decoder: NativeDecoder, info: dict | None = None) -> Timed:
    """The native engine through the one generation loop (greedy, batch 1)."""
    return Timed(name, functools.partial(run_greedy, decoder), decoder.weight_bytes_per_token(),
                 {**decoder.describe(), **(info or {})})


def hf_timed(model, name: str = "hf eager fp32") -> Timed:
    @torch.inference_mode()
    def run(ids: list[int], n: int) -> None:
        x = torch.tensor([ids])
        if n == 0:
            model(x, use_cache=True)
            return
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0)

    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    emb = getattr(model.get_input_embeddings(), "weight", None)   # None: an int8 QuantEmbedding (no Parameter)
    head = model.get_output_embeddings()
    tied = emb is None or (head is not None and getattr(head, "weight", None) is emb)
    read = weights - (0 if tied else emb.numel() * emb.element_size())  # the embedding is looked up, not read
    return Timed(name, run, read, {"engine": "transformers eager"})


def llama_cpp_timed(gguf_path: str, threads: int, context: int = 1024) -> Timed:
    """llama-cpp-python on the same GGUF (``pip install llama-cpp-python``)."""
    try:
        import llama_cpp
    except ImportError:
        raise SlimformerError("--vs llama.cpp needs llama-cpp-python: pip install llama-cpp-python") from None
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=context, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    return Timed("llama.cpp", functools.partial(run_greedy, _LlamaCppEngine(llm, context)), None,
                 {"engine": f"llama-cpp-python {llama_cpp.__version__}", "gguf": public_name(gguf_path)})


class _LlamaCppEngine:
    """llama-cpp-python behind the engine protocol (batch 1), so it is timed through the
    same loop as ours. Logits are views of llama.cpp's own score rows (no copy)."""

    def __init__(self, llm, context: int):
        self.llm, self.max_positions = llm, context

    def describe(self) -> dict:
        return {"engine": "llama.cpp"}

    def new_session(self, batch: int, max_len: int):
        if batch != 1:
            raise SlimformerError("the llama.cpp engine runs batch 1")
        self.llm.reset()
        return self.llm

    def _last(self) -> torch.Tensor:
        return torch.from_numpy(self.llm.scores[self.llm.n_tokens - 1])[None]

    def prefill(self, sess, seqs: list[list[int]]) -> torch.Tensor:
        self.llm.eval(seqs[0])
        return self._last()

    def decode(self, sess, tokens: list[int]) -> torch.Tensor:
        self.llm.eval(tokens)
        return self._last()


def prompt_of_length(tokenizer, n: int) -> list[int]:
    """``n`` token ids of real text (the built-in corpus, repeated if short)."""
    from slimformer.data import load_text

    ids = tokenizer(load_text("pydoc").text[: 40 * n]).input_ids
    if not ids:
        raise SlimformerError("the tokenizer produced no tokens for the prefill prompt")
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def dequantised_counterpart(model, decoder: NativeDecoder):
    """The Hugging Face model computing what ``decoder`` encodes, the reference way:
    QuantLinear layers dequantise then ``F.linear`` (``forward_reference``), and an LM head
    the runtime rounded itself is replaced by its dequantised weight. Changes ``model``."""
    from slimformer.nn.quant_linear import QuantLinear

    from slimformer.nn.quant_embedding import QuantTiedHead

    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantTiedHead)):
            m.forward = m.forward_reference
    head = model.get_output_embeddings()
    if head is not None and decoder.lm_head.kind != 0 and isinstance(head, torch.nn.Linear):
        head.weight = torch.nn.Parameter(decoder.lm_head.dequantize().clone(), requires_grad=False)
    return model


def stream_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (sum over a ``gib`` GiB fp32 buffer, torch's threads)."""
    buf = torch.ones(int(gib * (1 << 30)) // 4)
    buf.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    return buf.numel() * 4 / statistics.median(times)


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def run_benchmark(engines: list[Timed], prompt_ids: list[int], prefill_ids: list[int] | None, new_tokens: int = 128,
                  repeats: int = 3, decode: bool = True, progress: bool = True) -> dict:
    """Round-robin timing of ``engines``; returns per-engine decode/prefill tokens/s stats."""
    if decode and new_tokens < 2:
        raise SlimformerError("decode timing needs at least 2 new tokens")
    from tqdm.auto import tqdm

    dec: dict[str, list[float]] = {e.name: [] for e in engines}
    pre: dict[str, list[float]] = {e.name: [] for e in engines}
    rounds = tqdm(range(repeats + 1), desc="bench rounds", disable=not progress)
    for r in rounds:  # round 0 is the warm-up
        for e in engines:
            if decode:
                t0 = time.perf_counter()
                e.run(prompt_ids, 1)
                t1 = time.perf_counter()
                e.run(prompt_ids, new_tokens)
                t2 = time.perf_counter()
                if r:
                    dec[e.name].append((new_tokens - 1) / ((t2 - t1) - (t1 - t0)))
            if prefill_ids is not None:
                t0 = time.perf_counter()
                e.run(prefill_ids, 1)
                if r:
                    pre[e.name].append(len(prefill_ids) / (time.perf_counter() - t0))
    out = {}
    for e in engines:
        row = {"bytes_per_token": e.bytes_per_token, **e.info}
        if dec[e.name]:
            row["decode_tok_s"] = _stats(dec[e.name])
        if pre[e.name]:
            row["prefill_tok_s"] = _stats(pre[e.name])
        out[e.name] = row
    return out


def add_roofline(results: dict, bandwidth: float) -> None:
    """Roofline tokens/s and the fraction of it each decode rate reaches."""
    for row in results.values():
        b = row.get("bytes_per_token")
        if b and "decode_tok_s" in row:
            row["roofline_tok_s"] = bandwidth / b
            row["roofline_fraction"] = row["decode_tok_s"]["median"] / row["roofline_tok_s"]
