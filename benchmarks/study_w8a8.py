"""The W8A32 / W32A8 / W8A8 study on both built-in models.

SmolLM2-135M: WikiText-2 test perplexity (8 × 512 windows; the built-in corpus when
../shared/data is absent). all-MiniLM-L6-v2: embedding cosine to fp32 on held-out
sentences of the same text. Writes benchmarks/results/study_w8a8.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import slimformer
from slimformer.api import study_w8a8
from slimformer.models.compressed import library_versions

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"


def main() -> None:
    torch.set_num_threads(2)
    data = str(WIKI) if WIKI.exists() else "pydoc"
    models = {}
    for name in ("smollm2-135m", "minilm-l6"):
        model, tokenizer = slimformer.load(name)
        print(f"== {name}")
        models[name] = study_w8a8((model, tokenizer), data, seqlen=512, windows=8)
    payload = {"benchmark": "study_w8a8", "date": time.strftime("%Y-%m-%d"), "versions": library_versions(),
               "protocol": {"weights": "RTN 8-bit per output channel",
                            "activations": "8-bit symmetric, dynamic, inputs of every block projection"},
               "models": models}
    out = ROOT / "benchmarks" / "results" / "study_w8a8.json"
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
