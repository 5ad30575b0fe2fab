"""Quantisation-aware training on SmolLM2-135M: how much of the PTQ loss QAT recovers,
and whether the deployed model computes what training computed.

Rows (one run, one protocol): fp32; RTN and GPTQ (PTQ, the QAT format); QAT from RTN's
start (language-modelling loss); QAT + distillation (KL to the fp32 model's logits);
GPTQ → QAT + distillation (QAT starts from GPTQ's codes and scales). Every row quantises
the decoder-block linears only; the tied embedding / LM head stays fp32 in every row (no
QuantizeEmbeddings stage), as in ../shared/MEASURING.md's reference rows.

Perplexity: WikiText-2 test, the first 40 windows of 512 tokens (../shared/MEASURING.md).
Training: ../shared/data/wikitext2/wiki.valid.tokens (never the test split), the budget per
row in the JSON (steps, batch, seq_len, wall seconds, threads). GPTQ calibrates on the first
``--calib-samples`` × 512 tokens of the same file; the GPTQ → QAT row starts from that very
GPTQ model (computed once; the recipe ``gptq-qat-w4-g32`` runs both stages in one run).

R = (ppl_PTQ − ppl_QAT) / (ppl_PTQ − ppl_fp32), against RTN and against GPTQ.

Exactness (``--part exact``, or with each QAT row via ``--exact-windows``): the fake-quant
model's logits just before conversion vs the deployed QuantLinear model's (kernel path and
``forward_reference``), max |difference| and argmax agreement over the evaluation windows.

Writes benchmarks/results/qat_smollm2.json (rows merged by name, so rows can run in
separate processes); ``python benchmarks/readme_table.py`` regenerates the README table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

import slimformer
from slimformer.core.runner import TrainingRun, run_recipe
from slimformer.data import eval_windows, load_text, tokenize
from slimformer.data.tokens import calibration_samples
from slimformer.eval.perplexity import perplexity
from slimformer.models.compressed import library_versions
from slimformer.nn.quant_linear import QuantLinear
from slimformer.plugins import load_builtin
from slimformer.techniques.quant.gptq import GPTQ
from slimformer.techniques.quant.qat import QAT, QATHook
from slimformer.techniques.quant.rtn import RTN
from slimformer.train.loop import TokenBatches, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "qat_smollm2.json"
TRAIN_DATA = SHARED / "wikitext2" / "wiki.valid.tokens"

FORMATS = {
    "w4-g32": dict(bits=4, granularity="group", group_size=32),
    "w3-g64": dict(bits=3, granularity="group", group_size=64),
    "w4a8": dict(bits=4, granularity="group", group_size=32, act_bits=8),
}
ROWS = ("fp32", "rtn", "gptq", "qat", "qat-distill", "gptq-qat-distill")


def _merge(row: dict) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
    data["rows"] = [r for r in data["rows"] if r["name"] != row["name"]] + [row]
    data.update(benchmark="qat_smollm2", versions=library_versions())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")


def _loss(distill: bool):
    # pure KL to the fp32 teacher at T=1 (LLM-QAT), or plain cross-entropy
    return [{"distill": {"weight": 1.0, "temperature": 1.0}}] if distill else "causal_lm"


def _exactness(fake_model, deployed, windows) -> dict:
    """Max |logit difference| and argmax agreement, fake-quant vs deployed (kernels and reference)."""
    out = {}
    for path in ("kernel", "reference"):
        if path == "reference":
            for m in deployed.modules():
                if isinstance(m, QuantLinear):
                    m.forward = m.forward_reference
        diff, agree, total = 0.0, 0, 0
        with torch.no_grad():
            for ids, _first in windows:
                a = fake_model(input_ids=ids[None]).logits[0]
                b = deployed(input_ids=ids[None]).logits[0]
                diff = max(diff, float((a - b).abs().max()))
                agree += int((a.argmax(-1) == b.argmax(-1)).sum())
                total += a.shape[0]
        out[path] = {"max_abs_logit_diff": diff, "argmax_agreement": agree / total, "positions": total}
    for m in deployed.modules():
        if isinstance(m, QuantLinear) and "forward" in m.__dict__:
            del m.forward
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--format", default="w4-g32", choices=sorted(FORMATS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1-2: the machine is shared)")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--scale-lr-ratio", type=float, default=20.0)
    parser.add_argument("--no-learn-scales", action="store_true")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--exact-windows", type=int, default=0, help="exactness check on this many eval windows")
    parser.add_argument("--tag", default="", help="suffix for the row names (e.g. a tuning run)")
    parser.add_argument("--dry", action="store_true", help="print, do not write the JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_builtin()
    fmt = FORMATS[args.format]
    wanted = args.rows.split(",")

    model, tokenizer = slimformer.load("smollm2-135m")
    model.eval()
    test = eval_windows(tokenize(load_text(str(SHARED / "wikitext2" / "wiki.test.raw")), tokenizer), 512, args.windows)
    train_tokens = tokenize(load_text(str(TRAIN_DATA), role="calib"), tokenizer)
    common = {"format": args.format, "threads": args.threads, "windows": args.windows,
              "embedding": "tied embedding / LM head fp32 in every row (decoder-block linears quantised)",
              "date": time.strftime("%Y-%m-%d %H:%M"), "cpu_load_at_start": os.getloadavg()[0]}

    def save(row):
        row = {**common, **row}
        print(json.dumps({k: v for k, v in row.items() if k != "history"}), flush=True)
        if not args.dry:
            _merge(row)

    def name(row):
        suffix = "" if args.format == "w4-g32" else f"-{args.format}"
        return f"{row}{suffix}{args.tag}"

    gptq_model = None

    def gptq():
        nonlocal gptq_model
        if gptq_model is None:
            gptq_model = copy.deepcopy(model)
            calib = calibration_samples(train_tokens, args.calib_samples, 512, None)
            start = time.perf_counter()
            run_recipe(gptq_model, [GPTQ(**fmt)], calib=calib, progress=True)
            gptq_model.gptq_seconds = time.perf_counter() - start
        return gptq_model

    for row in wanted:
        if row == "fp32":
            save({"name": name("fp32"), "perplexity": perplexity(model, test, desc="fp32")["perplexity"]})
        elif row == "rtn":
            rtn = copy.deepcopy(model)
            start = time.perf_counter()
            run_recipe(rtn, [RTN(**fmt)], progress=False)
            seconds = time.perf_counter() - start
            save({"name": name("rtn"), "stage": repr(RTN(**fmt)), "compress_seconds": seconds,
                  "perplexity": perplexity(rtn, test, desc="rtn")["perplexity"]})
            del rtn
        elif row == "gptq":
            g = gptq()
            save({"name": name("gptq"), "stage": repr(GPTQ(**fmt)), "compress_seconds": g.gptq_seconds,
                  "calibration": f"{args.calib_samples} x 512 tokens of wiki.valid.tokens",
                  "perplexity": perplexity(g, test, desc="gptq")["perplexity"]})
        elif row in ("qat", "qat-distill", "gptq-qat-distill"):
            distill = row != "qat"
            student = copy.deepcopy(gptq() if row.startswith("gptq") else model)
            stage = QAT(**fmt, learn_scales=not args.no_learn_scales, scale_lr_ratio=args.scale_lr_ratio)
            config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                                 warmup_steps=max(1, args.steps // 20), schedule="cosine",
                                 loss=_loss(distill))
            batches = TokenBatches(train_tokens, config.batch_size, config.seq_len, config.seed)
            fake = {}
            if args.exact_windows:
                original_end = QATHook.on_end

                def keep_fake(self, trainer):
                    fake["model"] = copy.deepcopy(self.model)
                    original_end(self, trainer)

                QATHook.on_end = keep_fake
            run = run_recipe(student, [stage], progress=True,
                             train=TrainingRun(config, batches, teacher=model if distill else None))
            if args.exact_windows:
                QATHook.on_end = original_end
            result = run.training
            history = result.history
            out = {"name": name(row), "stage": repr(stage), "init": "gptq" if row.startswith("gptq") else "rtn",
                   "loss": "KL to the fp32 logits (T=1)" if distill else "cross-entropy",
                   "train": {"steps": result.steps, "batch_size": config.batch_size, "seq_len": config.seq_len,
                             "tokens": result.steps * config.batch_size * config.seq_len, "lr": config.lr,
                             "schedule": f"cosine, {config.warmup_steps} warm-up steps",
                             "scale_lr_ratio": args.scale_lr_ratio, "wall_seconds": result.seconds,
                             "seconds_per_step": result.seconds / max(1, result.steps),
                             "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"]},
                   "history": [round(h["loss"], 5) for h in history]}
            if row.startswith("gptq"):
                out["train"]["gptq_seconds"] = gptq_model.gptq_seconds
            out["perplexity"] = perplexity(student, test, desc=row)["perplexity"]
            if fake:
                out["exactness"] = _exactness(fake["model"], student, test[:args.exact_windows])
            save(out)
            del student, fake


if __name__ == "__main__":
    main()
