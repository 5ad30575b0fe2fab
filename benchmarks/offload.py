"""Offloading on SmolLM2-135M fp32: peak resident memory and speed, everything in
memory vs blocks streamed from memory-mapped safetensors under a budget.

    python benchmarks/offload.py [--repeats 3] [--out benchmarks/results/offload.json]

The model (``load("smollm2-135m")``) is written once with ``save_offloadable`` to a
temporary directory; each configuration then runs in a fresh child process, so its
peak RSS (VmHWM) is its own: imports, load, a 128-token prompt forward (median of
``repeats`` after a warm-up) and greedy decoding of 16 tokens after that prompt on the
KV cache (decode tok/s = 1 / median time of one step over ``repeats`` x 15 steps; HF
``generate`` must give the same 16 tokens). Configurations:

* ``full-copy``: every tensor read into ordinary (anonymous) memory, as a normal load;
* ``full-mmap``: ``load_offloaded(dir, None)``: all blocks resident, from the mapping;
* ``offload-P%``: ``load_offloaded(dir, P% of the weight bytes)`` with and without
  prefetch (25% holds one block beside the embeddings: no room to prefetch into).

Each configuration runs ``--rounds`` times, interleaved; the summary takes medians
(peak RSS: the largest).

The files sit in the page cache (read once before the children start), so this
measures the cost of mapping and faulting pages in, not of a disk. All children must
produce the same 16 greedy tokens (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREADS = 2
PROMPT, NEW = 128, 16
BUDGETS = (0.25, 0.35, 0.5)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _load_copied(directory: Path):
    """Everything in anonymous memory: each tensor read with plain file reads straight
    into its own torch buffer (no mapping, no transient second copy)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8,
              "I64": torch.int64, "I32": torch.int32}
    config = AutoConfig.from_pretrained(str(directory))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for path in sorted(directory.glob("*.safetensors")):
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
            base = 8 + header_len
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                tensor = torch.empty(info["shape"], dtype=dtypes[info["dtype"]])
                f.seek(base + start)
                f.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B"))
                assert end - start == tensor.nbytes
                state[key] = tensor
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    assert not missing, missing
    return model.eval()


def child(directory: str, mode: str, budget: int | None, prefetch: bool, repeats: int) -> dict:
    import torch
    import transformers  # noqa: F401  (imports counted in the baseline)

    from slimformer.runtime.offload import load_offloaded

    torch.set_num_threads(THREADS)
    baseline = {"rss_after_imports_bytes": _status("VmRSS"), "hwm_after_imports_bytes": _status("VmHWM")}
    start = time.perf_counter()
    if mode == "full-copy":
        model = _load_copied(Path(directory))
    else:
        model, _ = load_offloaded(directory, budget, prefetch=prefetch)
    load_s = time.perf_counter() - start
    rss_after_load = _status("VmRSS")

    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt)

    def timed(fn) -> list[float]:
        fn()   # warm-up (and: pinned blocks read)
        out = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out

    def decode() -> tuple[list[float], list[int]]:
        """Prefill, then NEW greedy steps on the KV cache, each step timed on its own."""
        out = model(input_ids=prompt, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        steps, tokens = [], [token.item()]
        for _ in range(NEW - 1):
            t = time.perf_counter()
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - t)
            tokens.append(token.item())
        return steps, tokens

    with torch.inference_mode():
        forward = timed(lambda: model(input_ids=prompt, use_cache=False))
        decode()   # warm-up
        steps: list[float] = []
        for _ in range(repeats):
            step_times, tokens = decode()
            steps += step_times
        generated = model.generate(prompt, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                                   do_sample=False, pad_token_id=0)[0, PROMPT:].tolist()
    # Per-step median: robust to a slow spell on a shared machine, unlike
    # differencing two whole generate() calls.
    result = {
        "mode": mode, "budget_bytes": budget, "prefetch_requested": prefetch,
        **baseline,
        "load_s": load_s,
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_bytes": _status("VmHWM"),
        "forward_128_s": statistics.median(forward),
        "forward_128_s_range": [min(forward), max(forward)],
        "decode_step_s": statistics.median(steps),
        "decode_tokens_per_s": 1.0 / statistics.median(steps),
        "decode_step_s_quartiles": statistics.quantiles(steps, n=4),
        "greedy_tokens": generated,
        "greedy_tokens_match_manual_loop": generated == tokens,
        "threads": torch.get_num_threads(),
    }
    offloader = getattr(model, "slimformer_offload", None)
    if offloader is not None:
        result["offload"] = offloader.stats()
    return result


def run_child(directory: Path, mode: str, budget: int | None, prefetch: bool, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(directory), mode, str(budget), str(int(prefetch)), str(repeats)]
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONWARNINGS="ignore")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="children per configuration, interleaved")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "offload.json"))
    args = parser.parse_args()

    import torch

    from slimformer.models.load import load
    from slimformer.runtime.offload import save_offloadable

    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "smollm2-135m"
        model, tokenizer = load("smollm2-135m")
        save_offloadable(model, directory, tokenizer)
        del model
        meta = json.loads((directory / "offload.json").read_text())
        weight_bytes = meta["non_block_bytes"] + sum(meta["block_bytes"])
        for path in directory.glob("*.safetensors"):   # into the page cache
            path.read_bytes()

        configs = [("full-copy", None, False), ("full-mmap", None, False)]
        for fraction in BUDGETS:
            budget = int(fraction * weight_bytes)
            slots = (budget - meta["non_block_bytes"]) // max(meta["block_bytes"])
            # One slot leaves nowhere to prefetch into: that budget runs without.
            for prefetch in ((True, False) if slots >= 2 else (False,)):
                configs.append((f"offload-{round(fraction * 100)}%", budget, prefetch))
        rows = []
        # Rounds interleave the configurations, so a slow spell on a shared machine
        # lands on all of them rather than on one.
        for round_ in range(args.rounds):
            for mode, budget, prefetch in configs:
                row = run_child(directory, mode, budget, prefetch, args.repeats)
                row["name"] = mode + ("" if mode.startswith("full") else (" prefetch" if prefetch else " no-prefetch"))
                row["round"] = round_
                row["loadavg_1min"] = os.getloadavg()[0]
                rows.append(row)
                print(f"{row['name']:<26} peak {row['peak_rss_bytes'] / 2**20:7.1f} MiB  "
                      f"(imports {row['hwm_after_imports_bytes'] / 2**20:6.1f})  "
                      f"fwd128 {row['forward_128_s'] * 1000:7.1f} ms  decode {row['decode_tokens_per_s']:6.2f} tok/s"
                      + (f"  slots {row['offload']['capacity']} pinned {row['offload']['pinned']}"
                         if "offload" in row else ""), flush=True)

    same = all(r["greedy_tokens"] == rows[0]["greedy_tokens"] and r["greedy_tokens_match_manual_loop"]
               for r in rows)
    summary = []
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        first = mine[0]
        summary.append({
            "name": name,
            "budget_bytes": first["budget_bytes"],
            "budget_fraction_of_weights": None if first["budget_bytes"] is None else first["budget_bytes"] / weight_bytes,
            "resident_block_slots": first.get("offload", {}).get("capacity", meta["num_blocks"]),
            "pinned_blocks": first.get("offload", {}).get("pinned"),
            "prefetch": first.get("offload", {}).get("prefetch", False),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in mine),
            "rss_after_imports_bytes": statistics.median(r["rss_after_imports_bytes"] for r in mine),
            "peak_rss_over_imports_bytes": max(r["peak_rss_bytes"] - r["rss_after_imports_bytes"] for r in mine),
            "forward_128_s": statistics.median(r["forward_128_s"] for r in mine),
            "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in mine),
            "load_s": statistics.median(r["load_s"] for r in mine),
        })
    full = summary[0]
    for s in summary:
        s["peak_rss_vs_full_copy"] = s["peak_rss_bytes"] / full["peak_rss_bytes"]
        s["forward_time_vs_full_copy"] = s["forward_128_s"] / full["forward_128_s"]
        s["decode_rate_vs_full_copy"] = s["decode_tokens_per_s"] / full["decode_tokens_per_s"]
    result = {
        "benchmark": "offload",
        "model": "smollm2-135m fp32",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": THREADS, "torch": torch.__version__, "python": platform.python_version(),
                    "loadavg_at_end": os.getloadavg()},
        "setup": {"prompt_tokens": PROMPT, "new_tokens": NEW, "repeats": args.repeats, "rounds": args.rounds,
                  "page_cache": "warm (files read once before the children)"},
        "weight_bytes": weight_bytes,
        "non_block_bytes": meta["non_block_bytes"],
        "block_bytes": max(meta["block_bytes"]),
        "num_blocks": meta["num_blocks"],
        "greedy_tokens_identical": same,
        "summary": summary,
        "runs": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for s in summary:
        print(f"{s['name']:<26} peak {s['peak_rss_bytes'] / 2**20:7.1f} MiB ({s['peak_rss_vs_full_copy']:.2f}x)  "
              f"fwd128 {s['forward_time_vs_full_copy']:.2f}x  decode {s['decode_rate_vs_full_copy']:.2f}x")
    print(f"greedy tokens identical across runs: {same}; wrote {args.out}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, directory, mode, budget, prefetch, repeats = sys.argv
        print(json.dumps(child(directory, mode, None if budget == "None" else int(budget),
                               prefetch == "1", int(repeats))))
    else:
        main()
