"""RTN on SmolLM2-135M: quality, size and time for each weight format.

Writes benchmarks/results/rtn_smollm2.json and regenerates the README table
(`python benchmarks/readme_table.py`). Protocol: ../shared/MEASURING.md —
WikiText-2 test, 40 non-overlapping windows of 512 tokens (when ../shared/data is
present), plus the built-in corpus (pydoc evaluation half, 20 windows); agreement
(KL, top-1) against fp32 on the first 8 WikiText-2 windows; 2 threads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import slimformer
from slimformer.api import compress
from slimformer.data import eval_windows, load_text, tokenize
from slimformer.eval.cost import in_memory_bytes
from slimformer.eval.perplexity import perplexity
from slimformer.models.compressed import library_versions

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"

RECIPES = ["rtn-w8", "rtn-w4", "rtn-w4-asym", "rtn-w4-g64", "rtn-w4-g64-asym", "rtn-w4-g32", "rtn-w3-g64"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--pydoc-windows", type=int, default=20)
    parser.add_argument("--agreement-windows", type=int, default=8)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--out", default=str(RESULTS / "rtn_smollm2.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)

    model, tokenizer = slimformer.load("smollm2-135m")
    sets = {"pydoc": eval_windows(tokenize(load_text("pydoc"), tokenizer), 512, args.pydoc_windows)}
    wiki = SHARED / "wikitext2" / "wiki.test.raw"
    if wiki.exists():
        sets["wikitext2"] = eval_windows(tokenize(load_text(str(wiki)), tokenizer), 512, args.windows)

    def measure(name, m, extra):
        row = {"name": name, **extra}
        for key, windows in sets.items():
            start = time.perf_counter()
            row[f"{key}_perplexity"] = perplexity(m, windows, desc=f"{name} {key}")["perplexity"]
            row[f"{key}_eval_seconds"] = time.perf_counter() - start
        if "wikitext2" in sets and m is not model:
            agree = perplexity(m, sets["wikitext2"][: args.agreement_windows], reference=model, desc=f"{name} agreement")
            row.update(kl=agree["kl"], top1_agreement=agree["top1_agreement"])
        print(json.dumps(row), flush=True)
        return row

    rows = [measure("fp32", model, {"recipe": None, "stored_bytes": in_memory_bytes(model), "compress_seconds": None})]
    for name in args.recipes.split(","):
        result = compress((model, tokenizer), name, progress=False)
        rows.append(measure(name, result.model, {
            "recipe": result.recipe.text,
            "stored_bytes": in_memory_bytes(result.model),
            "compress_seconds": result.run.seconds,
        }))
        del result

    payload = {
        "benchmark": "rtn_smollm2",
        "model": "smollm2-135m (SmolLM2-135M-Instruct Q4_1 GGUF dequantised to fp32)",
        "protocol": {"seqlen": 512, "wikitext2_windows": args.windows if "wikitext2" in sets else None,
                     "pydoc_windows": args.pydoc_windows, "agreement_windows": args.agreement_windows,
                     "threads": 2, "quantised": "decoder block linears; the embedding / LM head as each recipe says (the built-in 4- and 8-bit recipes end with QuantizeEmbeddings: int8)"},
        "data": {k: len(v) for k, v in sets.items()},
        "versions": library_versions(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
