"""Cost measurements: stored bytes, peak resident memory, prefill and decode speed.

Speed follows MEASURING.md: warm-up, median of repeats; decode rate =
(N − 1) / (t(N new tokens) − t(1 new token)) so prefill and set-up cancel out.
``measure_in_subprocess`` runs the speed and memory measurement in a fresh process,
so each model's peak RSS is its own (load + measurement), not the comparer's.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def peak_rss_bytes() -> int:
    """Peak resident memory of this process. ``VmHWM`` first: a child started by fork +
    exec reports its parent's size at fork time in ``ru_maxrss``, but a fresh ``VmHWM``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def source_bytes(source: str | os.PathLike) -> int | None:
    """Bytes of the files a model is loaded from (GGUF file, safetensors files)."""
    from slimformer.models.builtin import BUILTINS, builtin_path

    path = builtin_path(str(source)) if str(source) in BUILTINS else Path(source)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        files = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))
        return sum(f.stat().st_size for f in files) or None
    return None


def in_memory_bytes(model) -> int:
    """Bytes the model takes when saved as safetensors (shared tensors once)."""
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_model(model, str(path))
        return path.stat().st_size


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


@torch.inference_mode()
def measure_speed(model, prompt_len: int = 512, new_tokens: int = 32, repeats: int = 3,
                  decode: bool = True, prefill: bool = True, engine: str = "auto") -> dict:
    """Prefill tokens/s over a ``prompt_len`` prompt; decode tokens/s at batch 1,
    greedy, ``new_tokens`` forced (EOS ignored), after an 8-token prompt, through the
    runtime's one generation loop. ``engine``: ``native`` (slimformer.runtime), ``hf``
    (the model's own forward and cache) or ``auto`` (native when its library loads and
    it supports the model; else hf, with a warning saying why). Encoders (no decode)
    time one plain forward."""
    from slimformer.models.adapters import adapter_for
    from slimformer.runtime.engine import build_engine
    from slimformer.runtime.loop import run_greedy

    adapter = adapter_for(model)
    vocab = adapter.decoder_spec(model).vocab if adapter.is_decoder else model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    runner, name = build_engine(model, engine) if adapter.is_decoder else (None, "hf")
    result: dict = {"engine": name}
    prompt_len = min(prompt_len, adapter.context_length(model.config, default=prompt_len))  # no positions past it
    result["prefill_prompt_len"] = prompt_len
    if prefill:
        ids = torch.randint(0, vocab, (1, prompt_len), generator=generator)
        if runner is not None:
            seq = ids[0].tolist()
            times = _time(lambda: runner.prefill(runner.new_session(1, prompt_len), [seq]), repeats)
        else:
            times = _time(lambda: model(input_ids=ids), repeats)
        result["prefill_tokens_per_s"] = prompt_len / statistics.median(times)
        result["prefill_tokens_per_s_range"] = [prompt_len / max(times), prompt_len / min(times)]
    if decode:
        prompt = torch.randint(0, vocab, (8,), generator=generator).tolist()
        one = statistics.median(_time(lambda: run_greedy(runner, prompt, 1), repeats))
        many = _time(lambda: run_greedy(runner, prompt, new_tokens), repeats)
        rates = [(new_tokens - 1) / max(t - one, 1e-9) for t in many]
        result["decode_tokens_per_s"] = statistics.median(rates)
        result["decode_tokens_per_s_range"] = [min(rates), max(rates)]
        result["decode_latency_ms"] = 1000.0 / result["decode_tokens_per_s"]
    return result


def measure_in_subprocess(source: str, prompt_len: int = 512, new_tokens: int = 32, repeats: int = 3,
                          threads: int | None = None, timeout: float = 1800) -> dict:
    """Speed and peak RSS of ``source`` (anything ``slimformer.load`` takes), measured in a child."""
    # The child is a fresh program: like the CLI, it loads the plugins before reading a saved model.
    child = ("import sys; from slimformer.plugins import load_builtin; load_builtin(); "
             "from slimformer.eval.cost import _child; _child(sys.argv[1:])")
    cmd = [sys.executable, "-c", child, str(source), str(prompt_len), str(new_tokens), str(repeats)]
    env = dict(os.environ)
    if threads:
        env["SLIMFORMER_THREADS"] = str(threads)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"speed measurement of {source} failed: {tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(argv: list[str]) -> None:
    from slimformer.models.load import load

    source, prompt_len, new_tokens, repeats = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    if os.environ.get("SLIMFORMER_THREADS"):
        torch.set_num_threads(int(os.environ["SLIMFORMER_THREADS"]))
    from slimformer.models.adapters import adapter_for

    model, _ = load(source)
    result = measure_speed(model, prompt_len, new_tokens, repeats, decode=adapter_for(model).is_decoder)
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result))

