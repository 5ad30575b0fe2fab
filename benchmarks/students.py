"""Smaller students by layer dropping, distilled from the full model.

``--part decoder``: SmolLM2-135M with every other block (15 of 30) kept, distilled with
KL on the logits + the per-block hidden-state term (student block i ↔ teacher block
2i), the teacher sharing the frozen (tied) embedding / LM head with the student. Training
text: ../shared/data/wikitext2/wiki.valid.tokens (never the test split). WikiText-2 test
perplexity over the first 40 windows of 512 tokens (../shared/MEASURING.md) of the
dropped student before and after distillation; decode tokens/s of teacher and student
on the native engine in one run, round-robin (runtime/bench.py protocol).

``--part datafree``: the same student and budget, trained on text sampled from the
teacher (``data="teacher:N"``) instead of WikiText-2, to compare with ``decoder``.

``--part encoder``: all-MiniLM-L6-v2 with 3 of its 6 blocks, distilled with 1 − cosine
between mean-pooled sentence embeddings (+ a hidden-state term) on the same WikiText-2
validation text cut into [CLS] window [SEP] pieces. STS-B test Spearman (eval/embeddings.py)
before and after, and encoder throughput (sentences/s encoding the STS-B test sentences,
teacher and student round-robin).

Budgets (steps, batch, seq_len, lr, threads, wall seconds) are written with each row. The
machine is a shared 2-core CPU: runs use ``--threads`` (default 2) and other sessions'
work competes for the same cores, so wall times are upper bounds.

Writes benchmarks/results/students.json (rows merged by name); then
``python benchmarks/readme_table.py`` regenerates the README table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import slimformer
from slimformer.api import load, train
from slimformer.data import eval_windows, load_text, tokenize
from slimformer.eval.embeddings import encode, load_stsb, stsb_spearman
from slimformer.eval.perplexity import perplexity
from slimformer.models.adapters import adapter_for
from slimformer.models.compressed import library_versions
from slimformer.plugins import load_builtin
from slimformer.recipes.schema import parse_recipe
from slimformer.runtime import bench as bench_lib
from slimformer.runtime.decoder import NativeDecoder
from slimformer.techniques.distill.layers import drop_layers

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "students.json"
TRAIN_DATA = SHARED / "wikitext2" / "wiki.valid.tokens"
TEACHER_STSB = 0.8203   # all-MiniLM-L6-v2 on STS-B test (eval/embeddings.py), the reference

DECODER_RECIPE = """name: smollm2-half-distill
stages:
  - DropLayers: {{keep: every_other}}
  - FineTune: {{}}
train:
  steps: {steps}
  batch_size: {batch}
  seq_len: {seq_len}
  lr: {lr}
  warmup_steps: {warmup}
  schedule: cosine
  freeze: [embeddings]
  max_epochs: 50
  loss: [{{distill: {{weight: 1.0, temperature: 1.0}}}}, {{distill_hidden: {{weight: 1.0}}}}]
"""

ENCODER_RECIPE = """name: minilm-half-distill
stages:
  - DropLayers: {{keep: {keep}}}
  - FineTune: {{}}
train:
  steps: {steps}
  batch_size: {batch}
  seq_len: {seq_len}
  lr: {lr}
  warmup_steps: {warmup}
  schedule: cosine
  max_epochs: 50
  loss: [{{embed_cosine: {{weight: 1.0}}}}, {{distill_hidden: {{weight: {hidden}}}}}]
"""


def _budget(args, seconds: float, **extra) -> dict:
    return {"steps": args.steps, "batch_size": args.batch, "seq_len": args.seq_len, "lr": args.lr,
            "warmup_steps": args.warmup, "threads": args.threads, "train_seconds": round(seconds, 1), **extra,
            "note": f"shared 2-core CPU, torch.set_num_threads({args.threads}); other sessions ran at the same time"}


def run_decoder(args, save, data: str, row_name: str) -> None:
    model, tok = load("smollm2-135m")
    test = eval_windows(tokenize(load_text(str(SHARED / "wikitext2" / "wiki.test.raw")), tok), 512, args.windows)
    row: dict = {"name": row_name, "model": "smollm2-135m", "teacher_blocks": len(adapter_for(model).get_blocks(model))}
    if args.teacher_ppl:
        row["teacher_perplexity"] = perplexity(model, test, desc="teacher")["perplexity"]
    else:   # the same model and windows, measured by benchmarks/sparsity.py (row fp32)
        prior = json.loads((ROOT / "benchmarks" / "results" / "sparsity_smollm2.json").read_text())
        row["teacher_perplexity"] = next(r["perplexity"] for r in prior["rows"] if r["name"] == "fp32")
        row["teacher_perplexity_from"] = "benchmarks/results/sparsity_smollm2.json (row fp32, same windows)"
    if not args.skip_before:
        dropped = copy.deepcopy(model)
        drop_layers(dropped, adapter_for(dropped), "every_other")
        row["student_blocks"] = len(adapter_for(dropped).get_blocks(dropped))
        row["perplexity_before"] = perplexity(dropped, test, desc="dropped, not trained")["perplexity"]
        del dropped
        save(row)
    recipe = parse_recipe(DECODER_RECIPE.format(steps=args.steps, batch=args.batch, seq_len=args.seq_len,
                                                lr=args.lr, warmup=args.warmup))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        outcome = train((model, tok), recipe, data, Path(tmp) / "student", progress=True,
                        source_name="smollm2-135m")
        meta = json.loads((outcome.out / "slimformer.json").read_text())
    seconds = time.perf_counter() - start
    student = outcome.model
    record = meta["training"]
    row.update({"student_blocks": student.config.num_hidden_layers, "layer_map": meta.get("layer_map"),
                "loss_terms": record["loss_terms"], "data": record["data"],
                "budget": _budget(args, record["seconds"], wall_seconds_with_setup=round(seconds, 1),
                                  epochs=record["epochs"]),
                "memory_bytes": record["memory_bytes"], "warnings": record["warnings"],
                "loss_first": record["history"][0]["loss"], "loss_last": record["history"][-1]["loss"]})
    row["perplexity_after"] = perplexity(student, test, desc="distilled")["perplexity"]
    save(row)
    if args.decode_tokens:
        prompt = bench_lib.prompt_of_length(tok, 32)
        engines = [bench_lib.native_timed("teacher (30 blocks)", NativeDecoder.from_model(model)),
                   bench_lib.native_timed("student (15 blocks)", NativeDecoder.from_model(student))]
        speed = bench_lib.run_benchmark(engines, prompt, None, new_tokens=args.decode_tokens, repeats=args.repeats)
        t, s = (speed[e.name]["decode_tok_s"]["median"] for e in engines)
        row["decode"] = {"engine": "slimformer native (fp32)", "new_tokens": args.decode_tokens,
                         "repeats": args.repeats, "prompt_tokens": 32, "teacher_tok_s": t, "student_tok_s": s,
                         "speedup": s / t, "runs": speed}
        save(row)


def run_dropped_only(args, save) -> None:
    model, tok = load("smollm2-135m")
    test = eval_windows(tokenize(load_text(str(SHARED / "wikitext2" / "wiki.test.raw")), tok), 512, args.windows)
    drop_layers(model, adapter_for(model), "every_other")
    save({"name": "smollm2-half-dropped", "model_role": "untrained student", "student_blocks": 15,
          "perplexity": perplexity(model, test, desc="dropped, not trained")["perplexity"],
          "threads": args.threads})


def run_decode_speed(args, save) -> None:
    """Decode tokens/s of the 30-block teacher and the 15-block student (shapes only: the
    speed does not depend on the trained values), native engine, round-robin."""
    model, tok = load("smollm2-135m")
    student = copy.deepcopy(model)
    drop_layers(student, adapter_for(student), "every_other")
    prompt = bench_lib.prompt_of_length(tok, 32)
    engines = [bench_lib.native_timed("teacher (30 blocks)", NativeDecoder.from_model(model)),
               bench_lib.native_timed("student (15 blocks)", NativeDecoder.from_model(student))]
    speed = bench_lib.run_benchmark(engines, prompt, None, new_tokens=args.decode_tokens, repeats=args.repeats)
    t, s = (speed[e.name]["decode_tok_s"]["median"] for e in engines)
    save({"name": "smollm2-half-decode-speed", "engine": "slimformer native (fp32)", "new_tokens": args.decode_tokens,
          "repeats": args.repeats, "prompt_tokens": 32, "threads": args.threads, "teacher_tok_s": t,
          "student_tok_s": s, "speedup": s / t, "runs": speed,
          "note": "student = every other block of SmolLM2-135M (untrained: decode speed depends on shapes only); "
                  "shared 2-core CPU under heavy load from other sessions, round-robin"})


def _encode_rate(models: dict, tok, sentences, repeats: int) -> dict:
    """Sentences/s encoding ``sentences`` (batch 64), models round-robin, one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(repeats + 1):
        for name, m in models.items():
            t0 = time.perf_counter()
            encode(m, tok, sentences, batch_size=64)
            if r:
                times[name].append(len(sentences) / (time.perf_counter() - t0))
    return {name: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": len(v)}
            for name, v in times.items()}


def run_encoder(args, save) -> None:
    model, tok = load("minilm-l6")
    keep = args.keep if args.keep == "every_other" else [int(i) for i in args.keep.split(",")]
    name = f"minilm-l6-to-3-{'every-other' if keep == 'every_other' else '-'.join(map(str, keep))}"
    row: dict = {"name": name, "model": "minilm-l6", "keep": keep}
    row["teacher_spearman"] = stsb_spearman(model, tok, SHARED)["spearman"]
    dropped = copy.deepcopy(model)
    drop_layers(dropped, adapter_for(dropped), keep)
    row["spearman_before"] = stsb_spearman(dropped, tok, SHARED)["spearman"]
    del dropped
    save(row)
    recipe = parse_recipe(ENCODER_RECIPE.format(keep=json.dumps(keep), steps=args.steps, batch=args.batch,
                                                seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
                                                hidden=args.hidden_weight))
    with tempfile.TemporaryDirectory() as tmp:
        outcome = train((model, tok), recipe, str(TRAIN_DATA), Path(tmp) / "student", progress=True,
                        source_name="minilm-l6")
        meta = json.loads((outcome.out / "slimformer.json").read_text())
    record = meta["training"]
    student = outcome.model
    row.update({"student_blocks": student.config.num_hidden_layers, "layer_map": meta.get("layer_map"),
                "loss_terms": record["loss_terms"], "data": record["data"],
                "budget": _budget(args, record["seconds"], epochs=record["epochs"]),
                "memory_bytes": record["memory_bytes"], "warnings": record["warnings"],
                "loss_first": record["history"][0]["loss"], "loss_last": record["history"][-1]["loss"]})
    row["spearman_after"] = stsb_spearman(student, tok, SHARED)["spearman"]
    row["spearman_ratio"] = row["spearman_after"] / row["teacher_spearman"]
    save(row)
    rows = load_stsb(SHARED)
    sentences = [a for a, _, _ in rows] + [b for _, b, _ in rows]
    rate = _encode_rate({"teacher": model, "student": student}, tok, sentences, args.repeats)
    row["throughput"] = {"what": f"sentences/s encoding the {len(sentences)} STS-B test sentences, batch 64, "
                                 "HF eager fp32, round-robin",
                         "teacher": rate["teacher"], "student": rate["student"],
                         "ratio": rate["student"]["median"] / rate["teacher"]["median"]}
    row["goal"] = {"spearman_ratio_at_least": 0.97, "throughput_ratio_at_least": 1.8,
                   "met": row["spearman_ratio"] >= 0.97 and row["throughput"]["ratio"] >= 1.8}
    save(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("decoder", "decoder-before", "decode-speed", "datafree", "encoder"), required=True,
                    help="decoder-before: only the dropped, untrained student's perplexity (run beside decoder "
                         "--skip-before to use both cores)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--teacher-ppl", action="store_true", help="measure the teacher (default: reuse sparsity's fp32 row)")
    ap.add_argument("--skip-before", action="store_true")
    ap.add_argument("--samples", type=int, default=0, help="datafree: sequences sampled from the teacher "
                                                          "(default steps × batch: one epoch)")
    ap.add_argument("--keep", default="every_other", help="encoder: every_other or block numbers, e.g. 0,2,5")
    ap.add_argument("--hidden-weight", type=float, default=0.5)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    results = Path(args.results)
    torch.set_num_threads(args.threads)
    load_builtin()

    def save(row: dict) -> None:
        doc = json.loads(results.read_text()) if results.exists() else {"rows": []}
        doc["rows"] = [r for r in doc["rows"] if r["name"] != row["name"]] + [row]
        doc.update({"benchmark": "students", "slimformer": slimformer.__version__, "versions": library_versions(),
                    "protocol": {"perplexity": "WikiText-2 test, first 40 windows of 512 tokens",
                                 "training_data": "wikitext2/wiki.valid.tokens (or teacher-sampled text)",
                                 "stsb": "STS-B test, cosine of mean-pooled embeddings vs gold, Spearman"}})
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(doc, indent=1) + "\n")

    if args.part == "encoder":
        run_encoder(args, save)
    elif args.part == "decode-speed":
        run_decode_speed(args, save)
    elif args.part == "decoder-before":
        run_dropped_only(args, save)
    elif args.part == "decoder":
        run_decoder(args, save, str(TRAIN_DATA), "smollm2-half-distilled")
    else:
        n = args.samples or args.steps * args.batch
        run_decoder(args, save, f"teacher:{n}", "smollm2-half-distilled-datafree")


if __name__ == "__main__":
    main()
