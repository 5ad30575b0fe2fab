"""Tensor parallelism (slimformer.runtime.parallel): correctness and forward time.

    python benchmarks/tensor_parallel.py [--tokens 128] [--repeats 5] [--out benchmarks/results/tensor_parallel.json]

For SmolLM2-135M (9 heads, 3 KV heads, intermediate 1536: TP=3 is the only split
above 1; TP=2 is refused, its error is recorded) and the tiny random Llama (TP=2):
the max abs difference of the TP logits from the single-process model's on one
``--tokens``-token prompt (CPython docs text), whether the argmax agrees at every
position, and the forward (prefill) wall time: single process at 2 threads and at 1
thread (interleaved) vs TP ranks at max(1, 2 // world_size) threads each, loopback
gloo. Median (and min) over ``--repeats`` after one warm-up (TP: rank 0's time, ranks
started together by a barrier; the model is loaded and split before timing). Process
start and model loading are not timed.

On this 2-core machine TP cannot be faster: the ranks share the same two cores and add
two all-reduces per block. TP is for splitting a model over machines or GPUs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

from slimformer.errors import ParallelConfigError  # noqa: E402
from slimformer.models.load import load  # noqa: E402
from slimformer.models.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from slimformer.runtime.parallel import tensor_parallel, tp_forward  # noqa: E402

THREADS = 2


def prompt_ids(tokenizer, n: int) -> torch.Tensor:
    """The first ``n`` tokens of CPython's reference docs (installed with Python)."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics)[:20])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n]
    assert ids.shape[1] == n
    return ids


def single_process(model, ids: torch.Tensor, repeats: int) -> tuple[torch.Tensor, dict[int, list[float]]]:
    """Forward times at 2 and at 1 thread, interleaved repeat by repeat (one warm-up each)."""
    times: dict[int, list[float]] = {THREADS: [], 1: []}
    with torch.inference_mode():
        for _ in range(repeats + 1):
            for threads in times:
                torch.set_num_threads(threads)
                start = time.perf_counter()
                logits = model(input_ids=ids).logits
                times[threads].append(time.perf_counter() - start)
    torch.set_num_threads(THREADS)
    return logits, {k: v[1:] for k, v in times.items()}


def compare(name: str, source: str, model, ids: torch.Tensor, world_size: int, repeats: int) -> dict:
    ref, single_times = single_process(model, ids, repeats)
    start = time.perf_counter()
    got, tp_times = tp_forward(source, ids, world_size, repeats=repeats + 1, return_times=True)
    launch_s = time.perf_counter() - start
    tp_times = tp_times[1:]
    single_2, single_1, tp_s = (statistics.median(t) for t in (single_times[THREADS], single_times[1], tp_times))
    return {
        "model": name, "world_size": world_size, "tokens": ids.shape[1],
        "threads_per_rank": max(1, THREADS // world_size),
        "max_abs_logit_diff": (got - ref).abs().max().item(),
        "max_abs_logit": ref.abs().max().item(),
        "argmax_agrees_at_every_position": bool(torch.equal(got.argmax(-1), ref.argmax(-1))),
        "single_2_threads_forward_s": round(single_2, 4), "single_1_thread_forward_s": round(single_1, 4),
        "tp_forward_s": round(tp_s, 4),
        "tp_over_single_2_threads": round(tp_s / single_2, 3),
        "tp_over_single_1_thread": round(tp_s / single_1, 3),
        "min_s": {"single_2_threads": round(min(single_times[THREADS]), 4),
                  "single_1_thread": round(min(single_times[1]), 4), "tp": round(min(tp_times), 4)},
        "tp_run_wall_s_incl_start_and_load": round(launch_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default="benchmarks/results/tensor_parallel.json")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny_dir = Path(tmp) / "tiny-llama"
        tiny = tiny_model("llama", seed=0)
        tiny.save_pretrained(tiny_dir)
        tiny_tokenizer().save_pretrained(tiny_dir)
        rows.append(compare("tiny-llama (random, 4 heads / 2 KV)", str(tiny_dir), tiny,
                            prompt_ids(tiny_tokenizer(), args.tokens), 2, args.repeats))
        print(json.dumps(rows[-1], indent=1), flush=True)

        model, tokenizer = load("smollm2-135m")
        try:
            tensor_parallel(model, rank=0, world_size=2)
            tp2_error = None
        except ParallelConfigError as exc:
            tp2_error = str(exc)
        # the ranks read a safetensors copy (a GGUF-loaded model refuses save_pretrained)
        smol_dir = Path(tmp) / "smollm2"
        from safetensors.torch import save_model

        model.config.save_pretrained(smol_dir)
        tokenizer.save_pretrained(smol_dir)
        save_model(model, str(smol_dir / "model.safetensors"))
        rows.append(compare("smollm2-135m", str(smol_dir), model, prompt_ids(tokenizer, args.tokens), 3,
                            args.repeats))
        print(json.dumps(rows[-1], indent=1), flush=True)

    result = {
        "benchmark": "tensor_parallel",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": THREADS, "torch": torch.__version__, "python": platform.python_version(),
                    "backend": "gloo (loopback)",
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
                    "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()]},
        "repeats": args.repeats,
        "results": rows,
        "smollm2_tp2": tp2_error,
        "note": ("Forward (prefill) time of one prompt, median after warm-up; TP ranks run "
                 "max(1, 2 // world_size) threads each on the same 2 cores, so TP is slower here by "
                 "construction (shared cores, 2 all-reduces per block, one rank's Python per process). "
                 "It exists for splitting a model over machines or GPUs, not for speed on one small CPU. "
                 "Shared machine: other jobs may have run at the same time."),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
