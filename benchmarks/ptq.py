"""The post-training quantisation suite on real models: quality, size and time to compress.

SmolLM2-135M (``--model smollm2-135m``, writes benchmarks/results/ptq_smollm2.json):
WikiText-2 test perplexity over 40 windows of 512 tokens (../shared/MEASURING.md), KL and
top-1 agreement with fp32 on the first 8 windows, stored bytes of the saved model, seconds
to compress, and a short `slimformer generate` run on the saved directory (which engine
ran it). Calibration: 128 × 512 tokens of ../shared/data/wikitext2/wiki.valid.tokens.

all-MiniLM-L6-v2 (``--model minilm-l6``, writes benchmarks/results/ptq_minilm.json):
cosine of sentence embeddings to fp32 on 256 held-out WikiText-2 test lines, and STS-B
test Spearman. Calibration: 128 × 128 tokens of wiki.valid.tokens.

Rows are merged into the JSON by name, so the suite can run in parts (``--rows``).
Then ``python benchmarks/readme_table.py`` regenerates the README tables.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

import slimformer
from slimformer.api import compress
from slimformer.data import eval_windows, held_out_sentences, load_text, tokenize
from slimformer.eval.cost import in_memory_bytes
from slimformer.eval.perplexity import perplexity
from slimformer.models.compressed import library_versions, weight_bytes
from slimformer.recipes.schema import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
CALIB = SHARED / "wikitext2" / "wiki.valid.tokens"

# (row name, built-in recipe name or inline YAML, what the row is for)
SMOLLM2_ROWS = [
    ("fp32", None, "reference"),
    ("rtn-w4", "rtn-w4", "4-bit per channel"),
    ("gptq-w4", "gptq-w4", "4-bit per channel"),
    ("gobo-w4", "gobo-w4", "4-bit per channel"),
    ("rtn-w4-g64", "rtn-w4-g64", "4-bit g64"),
    ("gptq-w4-g64", "gptq-w4-g64", "4-bit g64; llm-compressor's anchor configuration (W4A16 sym g64 static act-order)"),
    ("gobo-w4-g64", "gobo-w4-g64", "4-bit g64"),
    ("rtn-w3-g64", "rtn-w3-g64", "3-bit g64"),
    ("gptq-w3-g64", "gptq-w3-g64", "3-bit g64"),
    ("gobo-w3-g64", "gobo-w3-g64", "3-bit g64"),
    ("gobo-w3", "gobo-w3", "3-bit per channel"),
    ("qbert-w4", "qbert-w4", "4-bit per-head groups"),
    ("qbert-w4-sub8", "name: qbert-w4-sub8\nstages:\n  - QBERT: {bits: 4, sub_groups: 8}\n",
     "4-bit, each head's group split in 8"),
    ("llm-int8", "llm-int8", "LLM.int8(), threshold 6"),
    ("llm-int8-t3", "name: llm-int8-t3\nstages:\n  - LLMInt8: {threshold: 3.0}\n", "LLM.int8(), threshold 3"),
    ("rtn-w8a8", "rtn-w8a8", "naive W8A8, per-token dynamic activations"),
    ("smoothquant-w8a8", "smoothquant-w8a8", "SmoothQuant W8A8, per-token dynamic activations"),
    ("rtn-w8a8-static", "rtn-w8a8-static", "naive W8A8, per-tensor static activations"),
    ("smoothquant-w8a8-static", "smoothquant-w8a8-static", "SmoothQuant W8A8, per-tensor static activations"),
    ("smoothquant-gptq-w8a8", "smoothquant-gptq-w8a8", "SmoothQuant then GPTQ, W8A8 (llm-compressor: 29.14 in 349 s)"),
    ("zeroquant-w8a8", "zeroquant-w8a8", "ZeroQuant: W8 g64 + per-token dynamic A8"),
    ("peg-w8a8", "peg-w8a8", "PEG: per-embedding-group static A8"),
    ("w8a8-all-8", "w8a8-all-8", "static A8 everywhere incl. the FFN residual sum"),
    ("mixed-16-8", "mixed-16-8", "the FFN residual sum at 16 bits, the rest at 8"),
    ("hawq-3.5", "hawq-3.5", "HAWQ, 3.5 bits on average (per channel), GPTQ"),
    ("gptq-w3-g32", "gptq-w3-g32", "uniform 3-bit g32: the bytes of HAWQ-3.5"),
    ("hawq-4.5", "hawq-4.5", "HAWQ, 4.5 bits on average (per channel), GPTQ"),
    ("gptq-w4-g32", "gptq-w4-g32", "uniform 4-bit g32: the bytes of HAWQ-4.5"),
]

_SMOOTH_BERT = """name: smoothquant-w8a8-input
description: SmoothQuant W8A8 with the scales kept as an input multiply (BERT is post-norm)
stages:
  - SmoothQuant: {alpha: 0.5, fold: input}
  - RTN: {bits: 8, granularity: channel, act_bits: 8, act_granularity: token}
"""
MINILM_ROWS = [
    ("fp32", None, "reference"),
    ("rtn-w4-g64", "rtn-w4-g64", "4-bit g64"),
    ("gptq-w4-g64", "gptq-w4-g64", "4-bit g64"),
    ("gobo-w4", "gobo-w4", "4-bit per channel"),
    ("qbert-w4", "qbert-w4", "4-bit per-head groups"),
    ("llm-int8", "llm-int8", "LLM.int8()"),
    ("rtn-w8a8", "rtn-w8a8", "naive W8A8"),
    ("smoothquant-w8a8-input", _SMOOTH_BERT, "SmoothQuant W8A8 (scale kept as an input multiply)"),
    ("zeroquant-w8a8", "zeroquant-w8a8", "ZeroQuant"),
    ("peg-w8a8", "peg-w8a8", "PEG"),
    ("w8a8-all-8", "w8a8-all-8", "static A8 everywhere"),
    ("mixed-16-8", "mixed-16-8", "FFN residual sum at 16 bits"),
]

# llm-compressor 0.14 on this machine (../shared/MEASURING.md), for the anchor comparison.
ANCHOR = {"tool": "llm-compressor 0.14 GPTQ W4A16 symmetric g64 static act-order, 128 x 512 WikiText-2 valid",
          "perplexity": 37.97, "compress_seconds": 584.0}


def _recipe(spec: str):
    return parse_recipe(spec) if "\n" in spec else spec


def _generate_check(path: Path) -> dict:
    """The saved model runs in `slimformer generate` (engine, and the first tokens)."""
    from slimformer.runtime.generate import Generator

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen = Generator.from_source(str(path))
    out = gen.generate("The capital of France is", max_new_tokens=8, ignore_eos=True)[0]
    fallback = [str(w.message) for w in caught if "Hugging Face engine" in str(w.message)]
    return {"engine": gen.engine_name, "text": out.text, "why_not_native": fallback[0] if fallback else None}


def run_decoder(args, rows_wanted, save) -> None:
    model, tokenizer = slimformer.load("smollm2-135m")
    test = eval_windows(tokenize(load_text(str(SHARED / "wikitext2" / "wiki.test.raw")), tokenizer), 512, args.windows)
    for name, recipe, purpose in SMOLLM2_ROWS:
        if name not in rows_wanted:
            continue
        row = {"name": name, "purpose": purpose}
        if recipe is None:
            row.update(recipe=None, stored_bytes=in_memory_bytes(model), compress_seconds=None)
            row["perplexity"] = perplexity(model, test, desc="fp32")["perplexity"]
        else:
            with tempfile.TemporaryDirectory(prefix="ptq-") as tmp:
                saved = Path(tmp) / name
                start = time.perf_counter()
                result = compress((model, tokenizer), _recipe(recipe), saved, calib=str(CALIB),
                                  calib_samples=args.calib_samples, seqlen=512, progress=True)
                row.update(recipe=result.recipe.text, compress_seconds=result.run.seconds,
                           compress_wall_seconds=time.perf_counter() - start, stored_bytes=weight_bytes(saved),
                           fallbacks=result.run.fallbacks, layers=result.run.layers)
                row["perplexity"] = perplexity(result.model, test, desc=name)["perplexity"]
                agree = perplexity(result.model, test[: args.agreement_windows], reference=model, desc=f"{name} agreement")
                row.update(kl=agree["kl"], top1_agreement=agree["top1_agreement"])
                del result
                row["generate"] = _generate_check(saved)
        print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
        save(row)


def run_encoder(args, rows_wanted, save) -> None:
    from slimformer.eval.embeddings import embedding_cosine, encode, stsb_spearman

    model, tokenizer = slimformer.load("minilm-l6")
    sentences = held_out_sentences(load_text(str(SHARED / "wikitext2" / "wiki.test.raw")).text)
    reference = encode(model, tokenizer, sentences)
    for name, recipe, purpose in MINILM_ROWS:
        if name not in rows_wanted:
            continue
        row = {"name": name, "purpose": purpose}
        if recipe is None:
            candidate, row["stored_bytes"], row["compress_seconds"], row["recipe"] = model, in_memory_bytes(model), None, None
        else:
            with tempfile.TemporaryDirectory(prefix="ptq-") as tmp:
                saved = Path(tmp) / name
                result = compress((model, tokenizer), _recipe(recipe), saved, calib=str(CALIB),
                                  calib_samples=args.calib_samples, seqlen=128, progress=True)
                row.update(recipe=result.recipe.text, compress_seconds=result.run.seconds,
                           stored_bytes=weight_bytes(saved), fallbacks=result.run.fallbacks, layers=result.run.layers)
                candidate = result.model
        row["embedding_cosine"] = embedding_cosine(reference, encode(candidate, tokenizer, sentences))
        if (SHARED / "stsb").is_dir():
            row["stsb"] = stsb_spearman(candidate, tokenizer, SHARED)
        print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
        save(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("smollm2-135m", "minilm-l6"), default="smollm2-135m")
    parser.add_argument("--rows", help="comma-separated row names (default: all)")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--agreement-windows", type=int, default=8)
    parser.add_argument("--calib-samples", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)
    decoder = args.model == "smollm2-135m"
    table = SMOLLM2_ROWS if decoder else MINILM_ROWS
    wanted = args.rows.split(",") if args.rows else [r[0] for r in table]
    unknown = set(wanted) - {r[0] for r in table}
    if unknown:
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}")
    path = RESULTS / ("ptq_smollm2.json" if decoder else "ptq_minilm.json")
    order = [r[0] for r in table]

    def save(row: dict) -> None:
        """Merge one finished row into the results file (so a long run can stop and resume)."""
        payload = json.loads(path.read_text()) if path.exists() else {"rows": []}
        merged = {r["name"]: r for r in payload["rows"]}
        merged[row["name"]] = {**row, "date": time.strftime("%Y-%m-%d %H:%M")}
        payload.update({
            "benchmark": path.stem,
            "model": "smollm2-135m (SmolLM2-135M-Instruct Q4_1 GGUF dequantised to fp32)" if decoder
            else "minilm-l6 (all-MiniLM-L6-v2, fp32 safetensors)",
            "protocol": ({"seqlen": 512, "wikitext2_windows": args.windows, "agreement_windows": args.agreement_windows,
                          "calibration": f"{args.calib_samples} x 512 tokens of wiki.valid.tokens", "threads": 2,
                          "quantised": "decoder block linears; the embedding / LM head as each recipe says (the built-in 4- and 8-bit recipes end with QuantizeEmbeddings: int8)",
                          "anchor": ANCHOR} if decoder else
                         {"sentences": "256 held-out lines of wiki.test.raw", "stsb": "test split",
                          "calibration": f"{args.calib_samples} x 128 tokens of wiki.valid.tokens", "threads": 2}),
            "versions": library_versions(),
            "rows": sorted(merged.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else len(order)),
        })
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")

    (run_decoder if decoder else run_encoder)(args, wanted, save)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
