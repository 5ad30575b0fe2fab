"""One-shot pruning on SmolLM2-135M: magnitude vs Wanda vs SparseGPT at 2:4 (with and
without the N:M channel permutation) and 50% unstructured, each with its compress time.

Protocol (../shared/MEASURING.md): WikiText-2 test perplexity over the first 40 windows
of 512 tokens; calibration from ../shared/data/wikitext2/wiki.valid.tokens (never the
test split), the first ``--calib-samples`` × 512 tokens in order. Pruned: the decoder
block projections; the tied embedding / LM head stays dense. Compress time: wall seconds
of ``slimformer.compress`` (calibration tokenisation included) at ``--threads`` torch
threads; the machine is shared by other sessions, so its load average before and after
each row is recorded beside the time.

Anchors (llm-compressor 0.14 on this machine type, same model, windows and 128 × 512
calibration): SparseGPT 2:4 140.6 in 256 s, Wanda 2:4 554.5 in 162 s; magnitude 2:4 1946.

Writes benchmarks/results/oneshot_pruning_smollm2.json (rows merged by name); then
``python benchmarks/readme_table.py`` regenerates the README table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import slimformer
from slimformer.api import compress
from slimformer.core.transform import target_weights
from slimformer.data import eval_windows, load_text, tokenize
from slimformer.eval.perplexity import perplexity
from slimformer.models.adapters import adapter_for
from slimformer.models.compressed import library_versions
from slimformer.nn.quant_linear import QuantLinear
from slimformer.recipes import load_recipe
from slimformer.recipes.schema import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "oneshot_pruning_smollm2.json"
CALIB = SHARED / "wikitext2" / "wiki.valid.tokens"

# (row, method, pattern, permuted, recipe: built-in name or YAML)
ROWS = [
    ("magnitude-2-4", "magnitude", "2:4", False, "nm-2-4"),
    ("magnitude-2-4-permuted", "magnitude", "2:4", True, "nm-2-4-permuted"),
    ("magnitude-50", "magnitude", "50%", False, "magnitude-50"),
    ("wanda-2-4", "Wanda", "2:4", False, "wanda-2-4"),
    ("wanda-2-4-permuted", "Wanda", "2:4", True, "name: wanda-2-4-permuted\nstages:\n  - Wanda: {n: 2, m: 4, permute: true}\n"),
    ("wanda-50", "Wanda", "50%", False, "wanda-50"),
    ("sparsegpt-2-4", "SparseGPT", "2:4", False, "sparsegpt-2-4"),
    ("sparsegpt-2-4-permuted", "SparseGPT", "2:4", True,
     "name: sparsegpt-2-4-permuted\nstages:\n  - SparseGPT: {n: 2, m: 4, permute: true}\n"),
    ("sparsegpt-50", "SparseGPT", "50%", False, "sparsegpt-50"),
    ("sparsegpt-2-4-w4-g32", "SparseGPT + 4-bit g32 (joint)", "2:4", False, "sparsegpt-2-4-w4-g32"),
]
ANCHORS = {
    "magnitude-2-4": {"tool": "magnitude 2:4 (MEASURING.md)", "perplexity": 1946.0, "compress_seconds": None},
    "wanda-2-4": {"tool": "llm-compressor 0.14 Wanda 2:4", "perplexity": 554.5, "compress_seconds": 162.0},
    "sparsegpt-2-4": {"tool": "llm-compressor 0.14 SparseGPT 2:4", "perplexity": 140.6, "compress_seconds": 256.0},
}


NOTES = ("The machine (2 cores) is shared by other sessions: each row records the 1-minute load average before and "
         "after it; a load above the row's threads means it shared the cores and its wall time is inflated. "
         "compress_cpu_seconds is the process's CPU time over the same call (less sensitive to sharing; at 2 threads "
         "a wall second can hold up to 2 CPU seconds). llm-compressor's anchor times were measured on this machine "
         "type, 2 threads. Calibration: the 2026-12-02 rows used 32 × 512 tokens (not the anchors' 128 × 512) at 1 "
         "thread because the machine ran at a load average of 13-28 that day: a 128-sample SparseGPT run was "
         "projected at over an hour of wall time and stopped.")


def _order(row: dict) -> tuple:
    names = ["fp32"] + [r[0] for r in ROWS]
    base = row.get("row", row["name"])
    return (names.index(base) if base in names else len(names), row["name"])


def _recipe(spec):
    return parse_recipe(spec) if "\n" in spec else load_recipe(spec)


def _sparsity(model, adapter, targets) -> float:
    zeros = total = 0
    for index, block in enumerate(adapter.get_blocks(model)):
        for name in targets.select(adapter.linears, index):
            module = block.get_submodule(name)
            w = module.dequantized_weight() if isinstance(module, QuantLinear) else target_weights(
                model, adapter, targets)[f"{adapter.blocks}.{index}.{name}"]
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", help="comma-separated row names (default: all)")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name-suffix", default="", help="appended to the row names (e.g. -calib128)")
    parser.add_argument("--import-magnitude", action="store_true",
                        help="take the fp32 and magnitude rows from benchmarks/sparsity.py's results (same protocol) "
                             "instead of measuring them again, and exit")
    parser.add_argument("--merge", nargs="*", type=Path, help="merge these results files' rows into --out and exit")
    args = parser.parse_args()
    if args.import_magnitude:
        source = ROOT / "benchmarks" / "results" / "sparsity_smollm2.json"
        rows = {r["name"]: r for r in json.loads(source.read_text())["rows"]}
        payload = json.loads(args.out.read_text())
        merged = {r["name"]: r for r in payload["rows"]}
        merged["fp32"] = {"name": "fp32", "perplexity": rows["fp32"]["perplexity"], "source": source.name}
        for name, method, pattern, permuted, spec in ROWS:
            if method != "magnitude":
                continue
            r = rows[spec]
            merged[name] = {"name": name, "row": name, "method": method, "pattern": pattern, "permuted": permuted,
                            "recipe": r["recipe"], "compress_seconds": r["compress_seconds"], "threads": None,
                            "load_average_before": None, "load_average_after": None, "calibration": None,
                            "sparsity": r["sparsity"], "perplexity": r["perplexity"], "date": r.get("date"),
                            "source": f"{source.name} row {spec} (benchmarks/sparsity.py, same model, windows "
                                      "and protocol; threads not recorded there)"}
            if name in ANCHORS:
                merged[name]["anchor"] = ANCHORS[name]
        payload["rows"] = sorted(merged.values(), key=_order)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"imported fp32 and magnitude rows from {source}")
        return
    if args.merge:
        payload = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
        merged = {r["name"]: r for r in payload["rows"]}
        for path in args.merge:   # rows merged by name; the description from the last file
            other = json.loads(path.read_text())
            merged.update({r["name"]: r for r in other["rows"]})
            payload.update({k: v for k, v in other.items() if k != "rows"})
        payload["rows"] = sorted(merged.values(), key=_order)
        payload["notes"] = NOTES
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"merged {len(args.merge)} files into {args.out}")
        return
    torch.set_num_threads(args.threads)
    wanted = args.rows.split(",") if args.rows else [r[0] for r in ROWS]
    model, tokenizer = slimformer.load("smollm2-135m")
    adapter = adapter_for(model)
    test = eval_windows(tokenize(load_text(str(SHARED / "wikitext2" / "wiki.test.raw")), tokenizer), 512, args.windows)

    def save(row: dict) -> None:
        payload = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
        merged = {r["name"]: r for r in payload["rows"]}
        merged[row["name"]] = {**row, "date": time.strftime("%Y-%m-%d %H:%M")}
        payload.update({
            "benchmark": "oneshot_pruning_smollm2",
            "model": "smollm2-135m (SmolLM2-135M-Instruct Q4_1 GGUF dequantised to fp32)",
            "protocol": {"seqlen": 512, "wikitext2_windows": args.windows,
                         "pruned": "decoder block projections; tied embedding / LM head dense",
                         "calibration": "first N × 512 tokens of wiki.valid.tokens (WikiText-2 validation), in order; "
                                        "N per row",
                         "compress_seconds": "wall seconds of slimformer.compress (calibration tokenisation included)"},
            "anchors": ANCHORS,
            "notes": NOTES,
            "versions": library_versions(),
            "rows": sorted(merged.values(), key=_order),
        })
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")

    if "fp32" in wanted:
        row = {"name": "fp32", "perplexity": perplexity(model, test, desc="fp32")["perplexity"]}
        print(json.dumps(row), flush=True)
        save(row)
    for name, method, pattern, permuted, spec in ROWS:
        if name not in wanted:
            continue
        recipe = _recipe(spec)
        load_before = os.getloadavg()[0]
        cpu_start = time.process_time()
        start = time.perf_counter()
        result = compress((model, tokenizer), recipe, calib=str(CALIB), calib_samples=args.calib_samples,
                          seqlen=512, progress=True)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        load_after = os.getloadavg()[0]
        calibrated = result.calibration is not None
        row = {"name": name + args.name_suffix, "row": name, "method": method, "pattern": pattern, "permuted": permuted, "recipe": recipe.text,
               "compress_seconds": seconds, "compress_cpu_seconds": cpu_seconds, "run_seconds": result.run.seconds,
               "threads": args.threads,
               "load_average_before": load_before, "load_average_after": load_after,
               "calibration": f"{args.calib_samples} × 512 tokens of wiki.valid.tokens" if calibrated else None,
               "sparsity": _sparsity(result.model, adapter, recipe.stages[0].targets)}
        row["perplexity"] = perplexity(result.model, test, desc=name)["perplexity"]
        if name in ANCHORS:
            row["anchor"] = ANCHORS[name]
        del result
        print(json.dumps(row), flush=True)
        save(row)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
