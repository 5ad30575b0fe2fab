"""Pruning and sparsity on real data: one-shot, recovery by training, and the full
train → prune → retrain workflow on a tiny model trained from scratch.

SmolLM2-135M (``--part oneshot`` and ``--part recovery``): WikiText-2 test perplexity over
40 windows of 512 tokens (../shared/MEASURING.md); the kept fraction of |W| over the pruned
projections (and over the permutable ones, down_proj and o_proj); the bytes the pruned
projections take in compressed storage. Recovery trains on
../shared/data/wikitext2/wiki.valid.tokens (never the test split) with the budget stated
in the JSON (each recipe's ``train:`` settings, or ``--steps``).

Tiny model (``--part workflow``): a 4-layer Llama trained from scratch on the built-in
pydoc corpus's training half, then pruned 2:4 one shot, then retrained (masked fine-tuning
and STE), perplexity on the pydoc evaluation half after each step.

Writes benchmarks/results/sparsity_smollm2.json (rows merged by name, so parts can run
separately); then ``python benchmarks/readme_table.py`` regenerates the README table.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

import slimformer
from slimformer.api import compress, train
from slimformer.core.transform import target_weights
from slimformer.data import eval_windows, load_text, tokenize
from slimformer.eval.perplexity import perplexity
from slimformer.models.adapters import adapter_for
from slimformer.models.compressed import library_versions
from slimformer.recipes import load_recipe
from slimformer.recipes.schema import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "sparsity_smollm2.json"
TRAIN_DATA = SHARED / "wikitext2" / "wiki.valid.tokens"

ONESHOT_ROWS = [
    ("fp32", None),
    ("magnitude-50", "magnitude-50"),
    ("magnitude-50-global", "magnitude-50-global"),
    ("nm-2-4", "nm-2-4"),
    ("nm-2-4-permuted", "nm-2-4-permuted"),
    ("nm-4-8", "nm-4-8"),
    ("nm-4-8-permuted", "name: nm-4-8-permuted\nstages:\n  - NMSparsity: {n: 4, m: 8, permute: true}\n"),
]
# (row, recipe, the one-shot row it should improve on)
RECOVERY_ROWS = [
    ("magnitude-50-finetune", "magnitude-50-finetune", "magnitude-50"),
    ("prune-50-finetune", "prune-50-finetune", "magnitude-50"),
    ("prune-50-weight-rewind", "prune-50-weight-rewind", "magnitude-50"),
    ("prune-50-lr-rewind", "prune-50-lr-rewind", "magnitude-50"),
    ("gmp-50", "gmp-50", "magnitude-50"),
    ("topkast-50", "topkast-50", "magnitude-50"),
    ("ste-2-4", "ste-2-4", "nm-2-4"),
    ("srste-2-4", "srste-2-4", "nm-2-4"),
]
PERMUTABLE = ("mlp.down_proj", "self_attn.o_proj")


def _recipe(spec):
    return parse_recipe(spec) if "\n" in spec else load_recipe(spec)


def magnitude_kept(original: dict[str, torch.Tensor], pruned: dict[str, torch.Tensor], only=None) -> float:
    """Σ|W| kept / Σ|W| over the layers (a permutation moves weights, it does not change them)."""
    names = [k for k in original if only is None or k.endswith(only)]
    return sum(float(pruned[k].abs().sum()) for k in names) / sum(float(original[k].abs().sum()) for k in names)


def compressed_bytes(weights: dict[str, torch.Tensor], n=None, m=None) -> dict:
    """Bytes of the pruned projections: dense fp32 vs the compressed storage (fp32 values)."""
    from slimformer.nn.sparse import SparseLinear

    dense = stored = 0
    for w in weights.values():
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data = w.detach().clone()
        fmt = "nm" if n else "auto"
        sparse = SparseLinear.from_linear(linear, format=fmt, n=n, m=m)
        dense += w.numel() * 4
        stored += sparse.stored_bytes()
    return {"dense_fp32_bytes": dense, "compressed_bytes": stored}


def run_smollm2(args, wanted, save) -> None:
    model, tokenizer = slimformer.load("smollm2-135m")
    test = eval_windows(tokenize(load_text(str(SHARED / "wikitext2" / "wiki.test.raw")), tokenizer), 512, args.windows)
    adapter = adapter_for(model)
    original = {k: w.detach().clone() for k, w in target_weights(model, adapter, _recipe("magnitude-50").stages[0].targets).items()}
    for name, recipe in ONESHOT_ROWS:
        if name not in wanted:
            continue
        row = {"name": name, "part": "oneshot"}
        if recipe is None:
            row["perplexity"] = perplexity(model, test, desc=name)["perplexity"]
        else:
            recipe = _recipe(recipe)
            result = compress((model, tokenizer), recipe, progress=True)
            pruned = target_weights(result.model, adapter, recipe.stages[0].targets)
            stage = recipe.stages[0]
            n, m = (stage.n, stage.m) if hasattr(stage, "n") else (None, None)
            row.update(recipe=recipe.text, compress_seconds=result.run.seconds,
                       sparsity=1 - sum(int((w != 0).sum()) for w in pruned.values()) / sum(w.numel() for w in pruned.values()),
                       kept_magnitude=magnitude_kept(original, pruned),
                       kept_magnitude_permutable=magnitude_kept(original, pruned, PERMUTABLE),
                       **compressed_bytes(pruned, n, m))
            row["perplexity"] = perplexity(result.model, test, desc=name)["perplexity"]
            del result
        print(json.dumps(row), flush=True)
        save(row)
    for name, recipe, baseline in RECOVERY_ROWS:
        if name not in wanted:
            continue
        recipe = _recipe(recipe)
        with tempfile.TemporaryDirectory(prefix="sparsity-") as tmp:
            outcome = train((model, tokenizer), recipe, str(TRAIN_DATA), Path(tmp) / name, steps=args.steps,
                            progress=True)
        row = {"name": name, "part": "recovery", "recipe": recipe.text, "baseline": baseline,
               "train": {"steps": outcome.result.steps, "seconds": outcome.result.seconds,
                         "tokens": outcome.result.steps * _tokens_per_step(recipe, args),
                         "first_loss": outcome.result.history[0]["loss"], "final_loss": outcome.result.history[-1]["loss"]},
               "sparsity": outcome.sparsity["sparsity"]}
        row["perplexity"] = perplexity(outcome.model, test, desc=name)["perplexity"]
        del outcome
        print(json.dumps(row), flush=True)
        save(row)


def _tokens_per_step(recipe, args) -> int:
    from slimformer.train import TrainConfig

    cfg = TrainConfig.parse(recipe.train, steps=args.steps)
    return cfg.batch_size * cfg.grad_accum * cfg.seq_len


def run_workflow(args, save) -> None:
    """Train → prune → retrain on a tiny Llama trained from scratch (minutes on 2 cores)."""
    from slimformer.models.tiny import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4)
    windows = eval_windows(tokenize(load_text("pydoc", role="eval"), tokenizer), 128, 64)
    ppl = lambda m, d: perplexity(m, windows, desc=d)["perplexity"]  # noqa: E731
    settings = "train: {batch_size: 16, seq_len: 128, lr: 3.0e-3, warmup_steps: 20, schedule: cosine}\n"
    steps = {"dense": args.tiny_steps, "retrain": args.tiny_steps // 3}
    row = {"name": "tiny-workflow", "part": "workflow",
           "model": "tiny Llama (4 layers, hidden 128, FFN 256, 4 heads / 2 kv heads), random init",
           "data": "pydoc: trained on the calibration half, perplexity on 64 × 128 tokens of the evaluation half",
           "steps": steps, "perplexity": {"random_init": ppl(model, "init")}}
    with tempfile.TemporaryDirectory(prefix="workflow-") as tmp:
        dense = train((model, tokenizer), parse_recipe("stages:\n  - FineTune: {}\n" + settings), "pydoc",
                      Path(tmp) / "dense", steps=steps["dense"]).model
        row["perplexity"]["dense_trained"] = ppl(dense, "dense")
        pruned = compress((dense, tokenizer), "nm-2-4", progress=False).model
        row["perplexity"]["one_shot_2_4"] = ppl(pruned, "2:4 one shot")
        retrain = "stages:\n  - NMSparsity: {n: 2, m: 4}\n  - MaskedFineTune: {}\n" + settings
        retrained = train((copy.deepcopy(dense), tokenizer), parse_recipe(retrain), "pydoc", Path(tmp) / "re",
                          steps=steps["retrain"]).model
        row["perplexity"]["retrained_2_4_masked"] = ppl(retrained, "2:4 retrained")
        ste = train((copy.deepcopy(dense), tokenizer), parse_recipe("stages:\n  - STE: {n: 2, m: 4}\n" + settings),
                    "pydoc", Path(tmp) / "ste", steps=steps["retrain"]).model
        row["perplexity"]["retrained_2_4_ste"] = ppl(ste, "2:4 STE")
        srste = train((copy.deepcopy(dense), tokenizer),
                      parse_recipe("stages:\n  - SRSTE: {n: 2, m: 4, decay: 2.0e-4}\n" + settings),
                      "pydoc", Path(tmp) / "srste", steps=steps["retrain"]).model
        row["perplexity"]["retrained_2_4_srste"] = ppl(srste, "2:4 SR-STE")
    print(json.dumps(row), flush=True)
    save(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("oneshot", "recovery", "workflow"), required=True)
    parser.add_argument("--rows", help="comma-separated row names (default: all of the part)")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--steps", type=int, help="training steps per recovery row (default: the recipe's)")
    parser.add_argument("--tiny-steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 when the machine is shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = {"oneshot": [r[0] for r in ONESHOT_ROWS], "recovery": [r[0] for r in RECOVERY_ROWS],
             "workflow": ["tiny-workflow"]}[args.part]
    wanted = args.rows.split(",") if args.rows else table
    order = [r[0] for r in ONESHOT_ROWS] + [r[0] for r in RECOVERY_ROWS] + ["tiny-workflow"]

    def save(row: dict) -> None:
        payload = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
        merged = {r["name"]: r for r in payload["rows"]}
        merged[row["name"]] = {**row, "date": time.strftime("%Y-%m-%d %H:%M")}
        payload.update({
            "benchmark": RESULTS.stem,
            "model": "smollm2-135m (SmolLM2-135M-Instruct Q4_1 GGUF dequantised to fp32)",
            "protocol": {"seqlen": 512, "wikitext2_windows": args.windows,
                         "pruned": "decoder block projections; tied embedding / LM head dense",
                         "recovery_data": "wiki.valid.tokens (WikiText-2 validation), never the test split"},
            "versions": library_versions(),
            "rows": sorted(merged.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else len(order)),
        })
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(payload, indent=2) + "\n")

    if args.part == "workflow":
        run_workflow(args, save)
    else:
        run_smollm2(args, set(wanted), save)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
