"""Padding-free (packed) vs padded BERT inference on all-MiniLM-L6-v2.

    python benchmarks/padfree.py [--sentences 256] [--batch 32] [--repeats 7] [--out benchmarks/results/padfree.json]

Workloads (256 sentences each, sampled with a fixed seed): STS-B test sentences
(short, 5-46 tokens) and WikiText-2 test sentences of 5-128 tokens (a wider spread);
without ../shared/data, sentences of CPython's docs (built-in pydoc source).
Methods, all at the same batch size, from pre-tokenised id lists (each method's own
batch preparation - padding or packing - is inside the timed region), ending in the
mean-pooled, L2-normalised embeddings of slimformer.eval.embeddings.encode:

* hf_padded: batches in input order, each padded to its longest sentence, HF forward;
* hf_sorted: the same after sorting all sentences by length (less padding), un-sorted after;
* padfree_loop / padfree_padded / padfree_bucketed: slimformer.runtime.padfree (Linears
  packed in all three) with one SDPA call per sequence, one masked SDPA over a padded
  copy of q/k/v, or one per bucket of similar lengths.

Median seconds over --repeats after one warm-up, methods interleaved per repeat,
torch.set_num_threads(2). Also: padding fraction (pad tokens / padded tokens) and the
max abs difference of each method's embeddings from hf_padded's. A last row repeats
hf_padded vs padfree_loop on an RTN W8 (per-channel) model: QuantLinear modules.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from slimformer.core.runner import run_transforms  # noqa: E402
from slimformer.models.load import load  # noqa: E402
from slimformer.runtime.padfree import ATTENTION_KINDS, mean_pool, pack, padfree_encode  # noqa: E402
from slimformer.techniques.quant.rtn import RTN  # noqa: E402

THREADS = 2
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def workloads(tokenizer, n: int, seed: int = 0) -> dict[str, list[str]]:
    """name -> ``n`` sentences."""
    rng = random.Random(seed)
    out = {}
    if (SHARED / "stsb" / "sts-test.csv").is_file():
        from slimformer.eval.embeddings import load_stsb

        rows = load_stsb(SHARED)
        pool = sorted({s for a, b, _ in rows for s in (a, b)})
        out["stsb-test"] = rng.sample(pool, n)
    wiki = SHARED / "wikitext2" / "wiki.test.raw"
    if wiki.is_file():
        text, name = wiki.read_text(encoding="utf-8"), "wikitext2-test-sentences"
    else:
        from slimformer.data.sources import load_text

        text, name = load_text("pydoc").text, "pydoc-sentences"
    # Sentences of prose paragraphs (skip "= Heading =" lines), 5..128 tokens with [CLS]/[SEP].
    paragraphs = [p.strip() for p in text.splitlines() if p.strip() and not p.strip().startswith("=")]
    sentences = [s.strip() for p in paragraphs for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", p)]
    lengths = [len(ids) for ids in tokenizer(sentences)["input_ids"]]
    pool = sorted({s for s, n_tok in zip(sentences, lengths) if 5 <= n_tok <= 128})
    out[name] = rng.sample(pool, n)
    return out


def pooled_padded(model, tokenizer, batch_ids: list[list[int]]) -> torch.Tensor:
    enc = tokenizer.pad({"input_ids": batch_ids}, padding=True, return_tensors="pt")
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), p=2, dim=1)


def run_hf(model, tokenizer, ids: list[list[int]], batch: int) -> torch.Tensor:
    return torch.cat([pooled_padded(model, tokenizer, ids[i:i + batch]) for i in range(0, len(ids), batch)])


def run_hf_sorted(model, tokenizer, ids: list[list[int]], batch: int) -> torch.Tensor:
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    emb = run_hf(model, tokenizer, [ids[i] for i in order], batch)
    out = torch.empty_like(emb)
    out[torch.tensor(order)] = emb
    return out


def run_padfree(model, ids: list[list[int]], batch: int, attention: str) -> torch.Tensor:
    chunks = []
    for i in range(0, len(ids), batch):
        packed = pack(ids[i:i + batch])
        chunks.append(mean_pool(padfree_encode(model, packed, attention=attention), packed))
    return torch.cat(chunks)


def pad_fraction(ids: list[list[int]], batch: int, sort: bool) -> float:
    lengths = [len(s) for s in ids]
    if sort:
        lengths.sort()
    padded = sum(max(lengths[i:i + batch]) * len(lengths[i:i + batch]) for i in range(0, len(lengths), batch))
    return round(1 - sum(lengths) / padded, 4)


def measure(methods: dict[str, Callable[[], torch.Tensor]], repeats: int) -> tuple[dict, dict]:
    """Median seconds per method (interleaved repeats after one warm-up) and each one's output."""
    outputs = {name: fn() for name, fn in methods.items()}   # warm-up
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def bench(model, tokenizer, sentences: list[str], batch: int, repeats: int, attention_variants: bool) -> dict:
    ids = tokenizer(sentences, truncation=True, max_length=256)["input_ids"]
    methods = {"hf_padded": lambda: run_hf(model, tokenizer, ids, batch)}
    if attention_variants:
        methods["hf_sorted"] = lambda: run_hf_sorted(model, tokenizer, ids, batch)
    for kind in ATTENTION_KINDS if attention_variants else ("loop",):
        methods[f"padfree_{kind}"] = lambda kind=kind: run_padfree(model, ids, batch, kind)
    with torch.inference_mode():
        seconds, outputs = measure(methods, repeats)
    lengths = [len(s) for s in ids]
    base = seconds["hf_padded"]
    return {
        "sentences": len(ids),
        "tokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths),
                   "total": sum(lengths)},
        "pad_fraction": {"input_order": pad_fraction(ids, batch, sort=False),
                         "sorted_by_length": pad_fraction(ids, batch, sort=True)},
        "methods": {
            name: {"median_s": round(s, 4), "sentences_per_s": round(len(ids) / s, 1),
                   "speedup_vs_hf_padded": round(base / s, 2),
                   "max_abs_diff_vs_hf_padded": float((outputs[name] - outputs["hf_padded"]).abs().max())}
            for name, s in seconds.items()
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "padfree.json"))
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    load_before = os.getloadavg()
    model, tokenizer = load("minilm-l6")
    model.eval()
    result = {
        "model": "minilm-l6 (all-MiniLM-L6-v2, fp32)",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": THREADS,
                    "torch": torch.__version__, "python": platform.python_version(),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "settings": {"batch_size": args.batch, "repeats": args.repeats, "statistic": "median after 1 warm-up",
                     "timed": "batch preparation (pad or pack) + forward + mean pooling + L2 norm"},
        "note": ("shared 2-core machine, other people's jobs may have run at the same time: "
                 "timings may be noisy (load averages recorded). " + args.note).strip(),
        "workloads": {},
    }
    sets = workloads(tokenizer, args.sentences)
    for name, sentences in sets.items():
        print(f"[{name}] ...", flush=True)
        result["workloads"][name] = r = bench(model, tokenizer, sentences, args.batch, args.repeats, True)
        print(json.dumps(r, indent=1), flush=True)

    # The same comparison on a quantised model: padfree calls QuantLinear modules as they are.
    qmodel, _ = load("minilm-l6")
    run_transforms(qmodel, [RTN(bits=8, granularity="channel")], progress=False)
    first = next(iter(sets))
    print(f"[{first}, RTN W8 per-channel] ...", flush=True)
    r = bench(qmodel, tokenizer, sets[first], args.batch, args.repeats, False)
    result["workloads"][f"{first} (RTN W8 per-channel, QuantLinear kernels)"] = r
    print(json.dumps(r, indent=1), flush=True)

    result["machine"]["loadavg_1_5_15_before"] = [round(x, 2) for x in load_before]
    result["machine"]["loadavg_1_5_15_after"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
