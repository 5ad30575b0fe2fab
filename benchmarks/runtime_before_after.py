"""The native runtime's speed on two commits, in one round-robin (issue 12's check that a
refactor did not slow decode or prefill).

Each round runs one fresh process per commit (alternating which goes first); a process
loads SmolLM2-135M, builds the variants of ``benchmarks/runtime.py`` (fp32, RTN int8 / int4
with the int8 LM head, the GGUF's own Q4_1 blocks, W8A8, and the int8-activation decode
paths) and times, per variant, greedy decode (128 new tokens after a short prompt,
(n-1)/(t(n)-t(1)) as in ``runtime.bench``) and prefill (one 512-token forward). Medians
over every timed repeat of every round; the range is min–max over rounds.

    python benchmarks/runtime_before_after.py --before <commit> [--after WORKTREE] [--rounds 3]

The "before" commit is checked out into a temporary git worktree; "after" is this working
tree. Writes benchmarks/results/runtime_before_after.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs inside each commit's process: only API that both sides have (load, compress,
# NativeDecoder.from_model and its new_session / prefill / decode).
PROBE = r'''
import json, statistics, sys, time
import torch
torch.set_num_threads(2)
import slimformer
try:
    from slimformer.plugins import load_builtin
    load_builtin()
except ImportError:
    pass
from slimformer.runtime.decoder import NativeDecoder, gguf_source_path

repeats, new_tokens, prompt_len = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
model, tok = slimformer.load("smollm2-135m")
gguf = gguf_source_path("smollm2-135m")
variants = {}
for name, recipe, use_gguf in [("fp32", None, False), ("int8 (W8 per channel)", "rtn-w8", False),
                               ("int4 g32 asym", "rtn-w4-g32", False), ("int4 g64", "rtn-w4-g64", False),
                               ("GGUF Q4_1 + Q8_0 head", None, True), ("W8A8 (per-token act)", "rtn-w8a8", False)]:
    m = model if recipe is None else slimformer.compress((model, tok), recipe, progress=False).model
    head = "model" if (use_gguf or recipe is None) else "int8"
    kw = dict(gguf_path=gguf if use_gguf else None, head=head)
    variants[name] = NativeDecoder.from_model(m, **kw)
    if (recipe is not None and "a8" not in recipe) or use_gguf:
        variants[name + ", int8 act"] = NativeDecoder.from_model(m, activations="int8", **kw)

prompt = tok("The capital of France is").input_ids
long_prompt = (tok("The quick brown fox jumps over the lazy dog. " * 200).input_ids)[:prompt_len]

def decode(dec, n):
    sess = dec.new_session(1, len(prompt) + n)
    t = int(dec.prefill(sess, [list(prompt)])[0].argmax())
    for _ in range(n - 1):
        t = int(dec.decode(sess, [t])[0].argmax())

def timed(fn):
    t0 = time.perf_counter(); fn(); return time.perf_counter() - t0

out = {}
for name, dec in variants.items():
    decode(dec, 4)                                             # warm-up
    dec.prefill(dec.new_session(1, prompt_len), [long_prompt])
    one = statistics.median(timed(lambda: decode(dec, 1)) for _ in range(repeats))
    rates = [(new_tokens - 1) / max(timed(lambda: decode(dec, new_tokens)) - one, 1e-9) for _ in range(repeats)]
    prefill = [prompt_len / timed(lambda: dec.prefill(dec.new_session(1, prompt_len), [long_prompt]))
               for _ in range(repeats)]
    out[name] = {"decode_tok_s": rates, "prefill_tok_s": prefill}
print(json.dumps(out))
'''


def run_side(src: Path, repeats: int, new_tokens: int, prompt_len: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", PROBE, str(repeats), str(new_tokens), str(prompt_len)],
                          capture_output=True, text=True, env=env, cwd=src.parent, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"probe failed in {src}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="commit to compare against (e.g. the commit before the change)")
    ap.add_argument("--after", default=str(ROOT), help="working tree of the new code (default: this one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats per variant per process")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "runtime_before_after.json"))
    args = ap.parse_args()

    before_sha = subprocess.run(["git", "rev-parse", args.before], capture_output=True, text=True, cwd=ROOT,
                                check=True).stdout.strip()
    after = Path(args.after).resolve()
    after_sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=after,
                               check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "src"], capture_output=True, text=True,
                                cwd=after).stdout.strip())
    samples: dict[str, dict[str, dict[str, list]]] = {"before": {}, "after": {}}
    loads = []
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="slimformer-before-") as tmp:
        worktree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), before_sha], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            sides = {"before": worktree / "src", "after": after / "src"}
            for r in range(args.rounds):
                order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
                for side in order:
                    loads.append(load_average())
                    result = run_side(sides[side], args.repeats, args.new_tokens, args.prompt_len)
                    for variant, measures in result.items():
                        slot = samples[side].setdefault(variant, {})
                        for measure, values in measures.items():
                            slot.setdefault(measure, []).append(values)
                    print(f"round {r + 1} {side}: " + ", ".join(
                        f"{v} {statistics.median(m['decode_tok_s']):.0f}" for v, m in result.items()), file=sys.stderr)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)

    rows = {}
    for variant in samples["after"]:
        row = {}
        for measure in ("decode_tok_s", "prefill_tok_s"):
            per_side = {}
            for side in ("before", "after"):
                rounds = samples[side].get(variant, {}).get(measure, [])
                flat = [v for rnd in rounds for v in rnd]
                medians = [statistics.median(rnd) for rnd in rounds]
                per_side[side] = {"median": statistics.median(flat) if flat else None,
                                  "round_medians": medians}
            b, a = per_side["before"]["median"], per_side["after"]["median"]
            spread = [abs(x / statistics.median(per_side[s]["round_medians"]) - 1)
                      for s in ("before", "after") for x in per_side[s]["round_medians"]]
            row[measure] = {**per_side, "after_over_before": a / b if a and b else None,
                            "round_to_round_noise": max(spread) if spread else None}
        rows[variant] = row
    payload = {
        "benchmark": "runtime_before_after",
        "date": datetime.date.today().isoformat(),
        "before": before_sha, "after": after_sha + (" + uncommitted changes" if dirty else ""),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "threads": 2,
                    "cpu": platform.processor() or platform.machine(),
                    "load_average_1min_at_each_process_start": loads},
        "protocol": {"rounds": args.rounds, "repeats_per_process": args.repeats, "new_tokens": args.new_tokens,
                     "prompt_len": args.prompt_len,
                     "order": "round-robin: one fresh process per commit per round, alternating which goes first",
                     "noise": "round_to_round_noise = largest deviation of one round's median from the median "
                              "of that side's round medians, over both sides"},
        "rows": rows,
        "seconds": time.time() - start,
    }
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    for variant, row in rows.items():
        print(f"{variant:34s} decode x{row['decode_tok_s']['after_over_before']:.3f} "
              f"(noise {row['decode_tok_s']['round_to_round_noise']:.3f})  "
              f"prefill x{row['prefill_tok_s']['after_over_before']:.3f} "
              f"(noise {row['prefill_tok_s']['round_to_round_noise']:.3f})", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
