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


def _native_decoder(model):
    """The native runtime for ``model`` if it can run it (Llama family), else None."""
    from slimformer.errors import SlimformerError
    from slimformer.runtime.decoder import NativeDecoder, check_supported
    from slimformer.runtime.weights import UnsupportedFormat

    try:
        check_supported(model)
        return NativeDecoder.from_model(model)
    except (SlimformerError, UnsupportedFormat, RuntimeError):
        return None


@torch.inference_mode()
def measure_speed(model, prompt_len: int = 512, new_tokens: int = 32, repeats: int = 3,
                  decode: bool = True, prefill: bool = True, engine: str = "auto") -> dict:
    """Prefill tokens/s over a ``prompt_len`` prompt; decode tokens/s at batch 1,
    greedy, ``new_tokens`` forced (EOS ignored), after an 8-token prompt. ``engine``:
    ``native`` (slimformer.runtime), ``hf`` (model.generate) or ``auto`` (native when
    the runtime supports the model)."""
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    native = _native_decoder(model) if engine in ("auto", "native") else None
    result: dict = {"engine": "native" if native is not None else "hf"}
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if context and prompt_len > context:
        prompt_len = context  # no model has positions past its context
    result["prefill_prompt_len"] = prompt_len
    if prefill:
        ids = torch.randint(0, vocab, (1, prompt_len), generator=generator)
        if native is not None:
            times = _time(lambda: native.prefill(native.new_session(1, prompt_len), [ids[0].tolist()]), repeats)
        else:
            times = _time(lambda: model(input_ids=ids, use_cache=True), repeats)
        result["prefill_tokens_per_s"] = prompt_len / statistics.median(times)
        result["prefill_tokens_per_s_range"] = [prompt_len / max(times), prompt_len / min(times)]
    if decode:
        prompt = torch.randint(0, vocab, (1, 8), generator=generator)

        def generate(n):
            if native is not None:
                sess = native.new_session(1, 8 + n)
                tok = int(native.prefill(sess, [prompt[0].tolist()])[0].argmax())
                for _ in range(n - 1):
                    tok = int(native.decode(sess, [tok])[0].argmax())
                return
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)

        one = statistics.median(_time(lambda: generate(1), repeats))
        many = _time(lambda: generate(new_tokens), repeats)
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

