"""compressed-tensors and plain-HF export of SmolLM2-135M: does transformers compute our model?

For GPTQ W4 g64 (``gptq-w4-g64``) and SmoothQuant W8A8 (``smoothquant-w8a8``), each made by
``slimformer compress`` with calibration on ``wiki.valid.tokens``:

- slimformer's WikiText-2 test perplexity of the compressed model;
- ``--format compressed-tensors``: the directory loaded by transformers with the
  compressed-tensors package (a test extra) and its perplexity on the *same* token
  windows; the same directory read back by ``slimformer.load`` (our importer);
- ``--format hf``: the dequantised checkpoint loaded by transformers alone;
- export seconds and directory bytes per format (and our own ``compressed`` format).

Protocol: ../shared/MEASURING.md (WikiText-2 test, the first N windows of 512 tokens).
Writes benchmarks/results/export_compressed_tensors.json; the README section comes from
`python benchmarks/readme_table.py`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import slimformer
from slimformer import api
from slimformer.data import eval_windows, load_text, tokenize
from slimformer.eval.perplexity import perplexity
from slimformer.models.compressed import library_versions

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
CALIB = SHARED / "wikitext2" / "wiki.valid.tokens"
RECIPES = ("gptq-w4-g64", "smoothquant-w8a8")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def weight_file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--compressed", help="reuse this compressed directory of the (single) recipe: skip compress")
    parser.add_argument("--compress-seconds", type=float, help="with --compressed: its measured compress time")
    parser.add_argument("--readback-windows", type=int, default=2)
    parser.add_argument("--merge", nargs="*", help="combine the JSON files of separate runs (one recipe each)")
    parser.add_argument("--model", default="smollm2-135m", help="a source for slimformer.load (a tiny one: dry run)")
    parser.add_argument("--out", default=str(RESULTS / "export_compressed_tensors.json"))
    args = parser.parse_args()
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        for part in parts:
            for row in part["rows"]:
                row.setdefault("wikitext2_windows", part["protocol"]["wikitext2_windows"])
        merged = {**parts[0], "rows": [row for part in parts for row in part["rows"]],
                  "protocol": {**parts[0]["protocol"],
                               "wikitext2_windows": sorted({p["protocol"]["wikitext2_windows"] for p in parts})},
                  "partial": any(part["partial"] for part in parts)}
        Path(args.out).write_text(json.dumps(merged, indent=2) + "\n")
        print(f"wrote {args.out}")
        return
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM

    base, tokenizer = slimformer.load(args.model)
    windows = eval_windows(tokenize(load_text(str(SHARED / "wikitext2" / "wiki.test.raw")), tokenizer), 512,
                           args.windows)

    def ppl(model, label):
        start = time.perf_counter()
        value = perplexity(model, windows, desc=label)["perplexity"]
        print(f"{label}: {value:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
        return value

    rows = []

    def write(rows, partial):
        Path(args.out).write_text(json.dumps(payload_of(args, rows, partial), indent=2) + "\n")

    work = Path(tempfile.mkdtemp(prefix="export-ct-"))
    for recipe in args.recipes.split(","):
        if args.compressed:
            compressed_dir, compress_seconds = Path(args.compressed), args.compress_seconds
            if recipe not in json.loads((compressed_dir / "slimformer.json").read_text())["recipe"]:
                raise SystemExit(f"{compressed_dir} was not made by {recipe}")
        else:
            compressed_dir = work / recipe
            start = time.perf_counter()
            api.compress((base, tokenizer), recipe, compressed_dir, calib=str(CALIB),
                         calib_samples=args.calib_samples, seqlen=512, progress=False)
            compress_seconds = time.perf_counter() - start
        ours, _ = slimformer.load(compressed_dir)
        row = {"recipe": recipe, "compress_seconds": compress_seconds, "wikitext2_windows": len(windows),
               "slimformer_perplexity": ppl(ours, f"{recipe} slimformer"), "formats": {}}
        row["formats"]["compressed"] = {"dir_bytes": dir_bytes(compressed_dir),
                                        "weight_bytes": weight_file_bytes(compressed_dir)}
        for fmt in ("compressed-tensors", "hf"):
            out = work / f"{recipe}-{fmt}"
            start = time.perf_counter()
            api.export(str(compressed_dir), out, fmt)
            entry = {"export_seconds": time.perf_counter() - start, "dir_bytes": dir_bytes(out),
                     "weight_bytes": weight_file_bytes(out)}
            loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()   # compressed-tensors: the package
            entry["transformers_perplexity"] = ppl(loaded, f"{recipe} {fmt} in transformers")
            del loaded
            if fmt == "compressed-tensors":
                qc = json.loads((out / "config.json").read_text())["quantization_config"]
                entry["quantization_config"] = {"format": qc["format"], "ignore": qc["ignore"],
                                                "groups": {k: {"weights": g["weights"],
                                                               "input_activations": g["input_activations"]}
                                                           for k, g in qc["config_groups"].items()}}
                # our reader gives back the same integers: the same logits, checked on the first windows
                back, _ = slimformer.load(out)
                with torch.no_grad():
                    diffs = [(back(input_ids=ids.unsqueeze(0) if ids.dim() == 1 else ids).logits
                              - ours(input_ids=ids.unsqueeze(0) if ids.dim() == 1 else ids).logits).abs().max().item()
                             for ids, _ in windows[:args.readback_windows]]
                entry["slimformer_import_max_logit_diff"] = max(diffs)
                entry["slimformer_import_windows"] = args.readback_windows
                print(f"{recipe} read back by slimformer: max logit difference {max(diffs)}", flush=True)
                del back
            entry["ratio_to_slimformer"] = entry["transformers_perplexity"] / row["slimformer_perplexity"]
            row["formats"][fmt] = entry
        rows.append(row)
        print(json.dumps(row), flush=True)
        del ours
        write(rows, partial=True)
    write(rows, partial=False)
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}")


def payload_of(args, rows, partial):
    import compressed_tensors
    import transformers

    return {
        "benchmark": "export_compressed_tensors",
        "model": args.model + (" (SmolLM2-135M-Instruct Q4_1 GGUF dequantised to fp32)"
                               if args.model == "smollm2-135m" else ""),
        "partial": partial,
        "protocol": {"seqlen": 512, "wikitext2_windows": args.windows, "threads": 2,
                     "calibration": f"{args.calib_samples} x 512 tokens of wiki.valid.tokens",
                     "transformers_load": "AutoModelForCausalLM.from_pretrained(dir) on CPU, fp32; compressed-tensors "
                                          "directories through the compressed-tensors package (decompressed on the "
                                          "first forward; W8A8 activations fake-quantised per token by the "
                                          "package's reference, which divides absmax by 127.5 where slimformer and "
                                          "vLLM divide by 127)",
                     "hf": "dequantised weights, no activation quantisation (a plain transformers model has none)"},
        "versions": {**library_versions(), "compressed_tensors": compressed_tensors.__version__,
                     "transformers": transformers.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }


if __name__ == "__main__":
    main()
