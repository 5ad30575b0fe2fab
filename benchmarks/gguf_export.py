"""GGUF export of SmolLM2-135M, measured by llama.cpp itself (llama-cpp-python).

Writes benchmarks/results/gguf_export.json (row by row, so a partial run keeps what it
measured). Protocol (../shared/MEASURING.md): WikiText-2 test, the first 40 windows of
512 tokens tokenised by slimformer; the *same token ids* are fed to llama.cpp
(``Llama.eval`` with ``logits_all``, no BOS) and the NLL of positions 1..511 is computed
here from its logits, exactly as ``slimformer.eval.perplexity`` does from ours.

(a) slimformer's perplexity of a model vs llama.cpp's perplexity of our GGUF export of it:
    F16 (the built-in model), Q8_0 (RTN 8-bit g32 symmetric), Q4_0 (RTN 4-bit g32
    symmetric), Q4_1 (RTN 4-bit g32 asymmetric); dense tied embedding/head in F16.
(b) llama.cpp's own quantiser (``llama_model_quantize`` from our F16 export) to Q4_0 and
    Q4_1 vs our GPTQ 4-bit g32 (symmetric -> Q4_0, with and without clip search;
    asymmetric -> Q4_1), with the tied embedding/head in the type llama.cpp's own file
    gives it (checked in the file it wrote), so the files have the same bytes.
(c) export seconds and file bytes of every file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import slimformer
from slimformer.api import compress, export
from slimformer.data import eval_windows, load_text, tokenize
from slimformer.eval.perplexity import perplexity
from slimformer.models.compressed import library_versions
from slimformer.recipes.schema import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
CALIB = SHARED / "wikitext2" / "wiki.valid.tokens"


def recipe(name: str, stage: str):
    return parse_recipe(f"name: {name}\nstages:\n  - {stage}\n")


RTN = {
    "rtn-w8-g32-sym": recipe("rtn-w8-g32-sym", "RTN: {bits: 8, granularity: group, group_size: 32, symmetric: true}"),
    "rtn-w4-g32-sym": recipe("rtn-w4-g32-sym", "RTN: {bits: 4, granularity: group, group_size: 32, symmetric: true}"),
    "rtn-w4-g32-asym": recipe("rtn-w4-g32-asym",
                              "RTN: {bits: 4, granularity: group, group_size: 32, symmetric: false}"),
}
GPTQ = {
    "gptq-w4-g32-sym": recipe("gptq-w4-g32-sym", "GPTQ: {bits: 4, granularity: group, group_size: 32}"),
    "gptq-w4-g32-sym-noclip": recipe("gptq-w4-g32-sym-noclip",
                                     "GPTQ: {bits: 4, granularity: group, group_size: 32, clip_search: false}"),
    "gptq-w4-g32-asym": recipe("gptq-w4-g32-asym",
                               "GPTQ: {bits: 4, granularity: group, group_size: 32, symmetric: false}"),
}


def llama_perplexity(path: Path, windows, threads: int) -> dict:
    """llama.cpp's logits for the same ids; NLL over the scored positions, as ours."""
    import llama_cpp

    start = time.perf_counter()
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, n_ubatch=512, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)
    per_window = []   # (NLL sum, scored tokens) of each window
    for ids, first in windows:
        llm.reset()
        llm.eval(ids.tolist())
        logits = torch.from_numpy(np.array(llm.scores[: ids.numel()], dtype=np.float32))
        logp = torch.log_softmax(logits[first - 1:-1].float(), dim=-1)
        targets = ids[first:]
        per_window.append((-logp.gather(1, targets.unsqueeze(1)).sum().item(), targets.numel()))
    del llm
    return {"perplexity": ppl(per_window), "tokens": sum(c for _, c in per_window), "per_window": per_window,
            "seconds": time.perf_counter() - start}


def ppl(per_window) -> float:
    return math.exp(sum(n for n, _ in per_window) / sum(c for _, c in per_window))


def tensor_types(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    types: dict[str, int] = {}
    special = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if t.name in ("token_embd.weight", "output.weight"):
            special[t.name] = t.tensor_type.name
    return {"counts": types, **special}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=40, help="windows for the llama.cpp comparisons (part b)")
    parser.add_argument("--agreement-windows", type=int, default=10,
                        help="windows on which slimformer and llama.cpp are compared for the same model (part a): "
                             "a paired comparison on the same tokens")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--slimformer-b", action="store_true",
                        help="also slimformer's own perplexity of the GPTQ models (part b compares llama.cpp runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="/tmp/gguf_export_bench")
    parser.add_argument("--out", default=str(RESULTS / "gguf_export.json"))
    parser.add_argument("--only", default="", help="comma-separated row names (default: all)")
    parser.add_argument("--merge", default=None,
                        help="add the rows of another run's JSON (run beside this one) and recompute the summary only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import llama_cpp

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    rows = {r["name"]: r for r in result.get("rows", [])}
    only = set(filter(None, args.only.split(",")))

    def save():
        result.update({
            "benchmark": "gguf_export",
            "model": "smollm2-135m (SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF, dequantised to fp32)",
            "protocol": {"data": "WikiText-2 test (wiki.test.raw), first windows of 512 tokens, tokenised by "
                                 "slimformer; the same ids fed to llama.cpp (Llama.eval, logits_all, no BOS), NLL of "
                                 "positions 1..511 computed from its logits",
                         "windows": args.windows, "agreement_windows": args.agreement_windows,
                         "threads": args.threads,
                         "calibration": f"{args.calib_samples} x 512 tokens of wiki.valid.tokens (not the test split)"},
            "versions": {**library_versions(), "llama-cpp-python": llama_cpp.__version__,
                         "llama-cpp-python build": "pip install llama-cpp-python==0.3.36 built from source with "
                                                   "CMAKE_ARGS=-DGGML_NATIVE=ON (CPU only)"},
            "machine": {"cpu": platform.processor() or platform.machine(), "cores_shared": os.cpu_count()},
            "rows": list(rows.values()),
        })
        out.write_text(json.dumps(result, indent=2) + "\n")

    def wanted(name: str) -> bool:
        return not only or name in only

    if args.merge:
        for r in json.loads(Path(args.merge).read_text())["rows"]:
            rows[r["name"]] = r
        summarise(rows, result)
        save()
        return

    base, tokenizer = slimformer.load("smollm2-135m")
    windows = eval_windows(tokenize(load_text(str(SHARED / "wikitext2" / "wiki.test.raw")), tokenizer), 512,
                           args.windows)

    def write(model, name: str, outtype: str) -> tuple[Path, dict]:
        path = work / f"{name}.gguf"
        start = time.perf_counter()
        export((model, tokenizer), path, "gguf", overwrite=True, outtype=outtype)
        return path, {"export_seconds": time.perf_counter() - start, "file_bytes": path.stat().st_size,
                      "tensor_types": tensor_types(path), "outtype": outtype}

    def agreement(model, llama_windows, desc: str) -> dict:
        """slimformer's and llama.cpp's perplexity of the same model on the first windows."""
        n = args.agreement_windows
        mine = perplexity(model, windows[:n], desc=desc)["perplexity"]
        theirs = ppl(llama_windows[:n])
        return {"agreement": {"windows": n, "slimformer_perplexity": mine, "llama_cpp_perplexity": theirs,
                              "relative_difference": theirs / mine - 1}}

    def row(name: str, **fields) -> dict:
        r = {"name": name, **fields, "date": time.strftime("%Y-%m-%d %H:%M")}
        rows[name] = r
        save()
        print(json.dumps(r), flush=True)
        return r

    # ------------------------------------------------------------------ F16 (the reference)
    f16 = work / "smollm2-f16.gguf"
    if wanted("f16") or not f16.exists():
        path, info = write(base, "smollm2-f16", "f16")
        theirs = llama_perplexity(path, windows, args.threads)
        row("f16", part="a+b", gguf="F16", model="built-in model (fp32 values of its Q4_1 grid) -> F16 file",
            llama_cpp_perplexity=theirs["perplexity"], llama_cpp_eval_seconds=theirs["seconds"],
            **agreement(base, theirs["per_window"], "slimformer fp32"), **info)

    # ------------------------------------------------------------------ llama.cpp's own quantiser
    def theirs_quantised(qname: str) -> None:
        ftype = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1}[qname]
        name = f"llama.cpp-{qname.lower()}"
        if not wanted(name):
            return
        path = work / f"smollm2-llamacpp-{qname.lower()}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = args.threads
        start = time.perf_counter()
        rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(path).encode(), params)
        seconds = time.perf_counter() - start
        if rc != 0:
            row(name, part="b", error=f"llama_model_quantize returned {rc}")
            return
        theirs = llama_perplexity(path, windows, args.threads)
        row(name, part="b", gguf=qname, model=f"llama_model_quantize(smollm2-f16.gguf, {qname})",
            llama_cpp_perplexity=theirs["perplexity"], llama_cpp_eval_seconds=theirs["seconds"],
            quantize_seconds=seconds, file_bytes=path.stat().st_size, tensor_types=tensor_types(path))

    def head_type(qname: str) -> str:
        """The type llama.cpp's own file gives the tied embedding / head, as an outtype."""
        theirs = rows.get(f"llama.cpp-{qname.lower()}", {}).get("tensor_types", {}).get("token_embd.weight", "Q8_0")
        return theirs.lower()

    # ------------------------------------------------------------------ ours
    def ours(name: str, rec, gguf: str, part: str, outtype: str, calib: bool) -> None:
        if not wanted(name):
            return
        start = time.perf_counter()
        res = compress((base, tokenizer), rec, None, calib=str(CALIB) if calib else None,
                       calib_samples=args.calib_samples, seqlen=512, progress=False)
        compress_seconds = time.perf_counter() - start
        path, info = write(res.model, f"smollm2-{name}", outtype)
        theirs = llama_perplexity(path, windows if part == "b" else windows[:args.agreement_windows], args.threads)
        fields = {}
        if part == "a" or args.slimformer_b:
            fields = agreement(res.model, theirs["per_window"], name)
        row(name, part=part, gguf=gguf, model=f"{name} (slimformer compress), exported without requantising",
            recipe=rec.text, compress_seconds=compress_seconds, llama_cpp_perplexity=theirs["perplexity"],
            llama_cpp_windows=len(theirs["per_window"]),
            llama_cpp_eval_seconds=theirs["seconds"], **fields, **info)
        del res

    # the headline comparison first (a partial run keeps it)
    theirs_quantised("Q4_0")
    ours("gptq-w4-g32-sym", GPTQ["gptq-w4-g32-sym"], "Q4_0", "b", head_type("Q4_0"), True)
    theirs_quantised("Q4_1")
    # RTN with integer zero-points at the same bytes (llama.cpp's Q4_1 rounds a float min per block instead)
    ours("rtn-w4-g32-asym-q8head", RTN["rtn-w4-g32-asym"], "Q4_1", "b", head_type("Q4_1"), False)
    ours("gptq-w4-g32-asym", GPTQ["gptq-w4-g32-asym"], "Q4_1", "b", head_type("Q4_1"), True)
    ours("rtn-w4-g32-sym", RTN["rtn-w4-g32-sym"], "Q4_0", "a", "f16", False)
    ours("rtn-w4-g32-asym", RTN["rtn-w4-g32-asym"], "Q4_1", "a", "f16", False)
    ours("rtn-w8-g32-sym", RTN["rtn-w8-g32-sym"], "Q8_0", "a", "f16", False)
    ours("gptq-w4-g32-sym-noclip", GPTQ["gptq-w4-g32-sym-noclip"], "Q4_0", "b", head_type("Q4_0"), True)

    summarise(rows, result)
    save()


def summarise(rows: dict, result: dict) -> None:
    """The fraction of llama.cpp's own gap to F16 that our file of the same type closes."""
    f16_ppl = rows.get("f16", {}).get("llama_cpp_perplexity")
    summary = {}
    for qname, mine in (("q4_0", "gptq-w4-g32-sym"), ("q4_0", "gptq-w4-g32-sym-noclip"), ("q4_1", "gptq-w4-g32-asym"),
                        ("q4_1", "rtn-w4-g32-asym-q8head")):
        theirs = rows.get(f"llama.cpp-{qname}", {}).get("llama_cpp_perplexity")
        ours_ppl = rows.get(mine, {}).get("llama_cpp_perplexity")
        if None in (f16_ppl, theirs, ours_ppl):
            continue
        gap = theirs - f16_ppl
        summary[f"{mine} vs llama.cpp {qname}"] = {
            "f16": f16_ppl, "llama.cpp": theirs, "ours": ours_ppl,
            "llama.cpp_gap_to_f16": gap,
            "fraction_of_gap_closed": (theirs - ours_ppl) / gap if gap > 0 else None,
            "bytes": {"llama.cpp": rows[f"llama.cpp-{qname}"]["file_bytes"], "ours": rows[mine]["file_bytes"]},
        }
    result["gap_closed"] = summary


if __name__ == "__main__":
    main()
