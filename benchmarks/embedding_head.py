"""The QuantizeEmbeddings stage: what an int8 embedding / LM head costs in quality and saves in bytes.

SmolLM2-135M (tied embedding and LM head, 49152 x 576): WikiText-2 test perplexity over the
first 10 windows of 512 tokens (the windows of benchmarks/rtn.py, fewer than MEASURING.md's 40:
the machine is shared, ~25 s a window; ``--windows 40`` for the full protocol), KL and top-1
agreement with fp32 on the first 4 windows, and the bytes of the saved directory
(``model.safetensors``), for fp32 alone and rtn-w4-g32: each without the stage
(``--set QuantizeEmbeddings.enabled=false``), with one float16 scale per row and with 8-bit
groups of 32 (GGUF Q8_0's blocks); rtn-w8 without the stage and with its row default. A check per row: the native decoder
built from the model agrees with the model's own forward on one window (max |Δ logit| and
greedy-token agreement, prefill path on 512 tokens and decode kernels on 32 steps).

all-MiniLM-L6-v2 (word-embedding table only, no LM head; ``--minilm``): cosine of sentence
embeddings to fp32 on 256 held-out WikiText-2 test lines and STS-B test Spearman
(the metrics of benchmarks/ptq.py).

No timings (the machine is shared). Writes benchmarks/results/embedding_head.json; then
``python benchmarks/readme_table.py``.
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
from slimformer.recipes import apply_overrides, load_recipe
from slimformer.recipes.schema import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
OUT = RESULTS / "embedding_head.json"

NOTES = ("smollm2-135m is dequantised from a GGUF whose token_embd (the tied table) is Q8_0: symmetric int8 "
         "in groups of 32 with fp16 scales, the grid granularity=group, group_size=32 rounds to, so that row "
         "reproduces the source table exactly (KL 0); one scale per row is the lossy one here. MiniLM's table "
         "is an fp32 original.")
OFF = ["QuantizeEmbeddings.enabled=false"]
GROUP = ["QuantizeEmbeddings.granularity=group", "QuantizeEmbeddings.group_size=32"]
TABLE_ONLY = "name: {name}\nstages:\n  - QuantizeEmbeddings: {args}\n"

# (row name, body recipe or None for fp32, table: "off" | "row" | "g32")
SMOLLM2_ROWS = [
    ("fp32", None, "off"),
    ("fp32 + int8 table (row)", None, "row"),
    ("fp32 + int8 table (g32)", None, "g32"),
    ("rtn-w8, table fp32", "rtn-w8", "off"),
    ("rtn-w8", "rtn-w8", "row"),
    ("rtn-w4-g32, table fp32", "rtn-w4-g32", "off"),
    ("rtn-w4-g32", "rtn-w4-g32", "row"),
    ("rtn-w4-g32, table g32", "rtn-w4-g32", "g32"),
]
MINILM_ROWS = SMOLLM2_ROWS[:5]


def _recipe(body: str | None, table: str):
    if body is None:
        args = "{granularity: row}" if table == "row" else "{granularity: group, group_size: 32}"
        return parse_recipe(TABLE_ONLY.format(name=f"int8-table-{table}", args=args))
    recipe = load_recipe(body)
    return apply_overrides(recipe, {"off": OFF, "row": [], "g32": GROUP}[table])


def _fp32_file_bytes(model, tmp: str) -> int:
    """Bytes of the fp32 model as one safetensors file (tied tensors once), as compressed
    directories store theirs."""
    from safetensors.torch import save_model

    path = Path(tmp) / "fp32.safetensors"
    save_model(model, str(path))
    return path.stat().st_size


def _native_check(model, window: torch.Tensor) -> dict:
    """The native decoder on the same model: max |logit difference| to the HF forward, and
    whether the greedy tokens agree, on one window."""
    from slimformer.runtime.decoder import NativeDecoder

    dec = NativeDecoder.from_model(model)
    ids = window.tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    native = dec.forward_logits(ids)
    # and the decode kernels (C): prefill 64 tokens, then one token at a time to 96
    sess = dec.new_session(1, 96)
    steps = [dec.prefill(sess, [ids[:64]])[0].clone()] + [dec.decode(sess, [t])[0].clone() for t in ids[64:95]]
    decoded = torch.stack(steps)
    return {"native_max_abs_logit_diff": float((native - ref).abs().max()),
            "native_greedy_agreement": float((native.argmax(-1) == ref.argmax(-1)).float().mean()),
            "native_decode_max_abs_logit_diff": float((decoded - ref[63:95]).abs().max()),
            "native_decode_greedy_agreement": float((decoded.argmax(-1) == ref[63:95].argmax(-1)).float().mean()),
            "native_lm_head": dec.describe()["lm_head"]}


def run_smollm2(args, save) -> None:
    model, tokenizer = slimformer.load("smollm2-135m")
    wiki = eval_windows(tokenize(load_text(str(SHARED / "wikitext2" / "wiki.test.raw")), tokenizer), 512,
                        args.windows)
    for name, body, table in SMOLLM2_ROWS:
        if args.rows and name not in args.rows:
            continue
        with tempfile.TemporaryDirectory(prefix="embhead-") as tmp:
            if body is None and table == "off":
                candidate, row = model, {"recipe": None, "in_memory_bytes": in_memory_bytes(model)}
                row["stored_bytes"] = _fp32_file_bytes(model, tmp)
            else:
                result = compress((model, tokenizer), _recipe(body, table), Path(tmp) / "m", progress=False)
                candidate = result.model
                row = {"recipe": result.recipe.text, "stored_bytes": weight_bytes(Path(tmp) / "m"),
                       "in_memory_bytes": in_memory_bytes(candidate),
                       "table": {k: v for k, v in result.run.layers.items() if "bytes_before" in v},
                       "fallbacks": result.run.fallbacks}
        row = {"name": name, "body": body or "fp32", "table_format": table, **row}
        row["wikitext2_perplexity"] = perplexity(candidate, wiki, desc=name)["perplexity"]
        if candidate is not model:
            agree = perplexity(candidate, wiki[: args.agreement_windows], reference=model, desc=f"{name} agreement")
            row.update(kl=agree["kl"], top1_agreement=agree["top1_agreement"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row.update(_native_check(candidate, wiki[0][0]))
        print(json.dumps(row), flush=True)
        save("smollm2", row)
        del candidate


def run_minilm(args, save) -> None:
    from slimformer.eval.embeddings import embedding_cosine, encode, stsb_spearman

    model, tokenizer = slimformer.load("minilm-l6")
    sentences = held_out_sentences(load_text(str(SHARED / "wikitext2" / "wiki.test.raw")).text)
    reference = encode(model, tokenizer, sentences)
    for name, body, table in MINILM_ROWS:
        if args.rows and name not in args.rows:
            continue
        with tempfile.TemporaryDirectory(prefix="embhead-") as tmp:
            if body is None and table == "off":
                candidate, row = model, {"recipe": None}
                row["stored_bytes"] = _fp32_file_bytes(model, tmp)
            else:
                result = compress((model, tokenizer), _recipe(body, table), Path(tmp) / "m", progress=False)
                candidate = result.model
                row = {"recipe": result.recipe.text, "stored_bytes": weight_bytes(Path(tmp) / "m"),
                       "table": {k: v for k, v in result.run.layers.items() if "bytes_before" in v}}
        row = {"name": name, "body": body or "fp32", "table_format": table, **row}
        row["embedding_cosine"] = embedding_cosine(reference, encode(candidate, tokenizer, sentences))
        if (SHARED / "stsb").is_dir():
            row["stsb"] = stsb_spearman(candidate, tokenizer, SHARED)
        print(json.dumps(row), flush=True)
        save("minilm", row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    # 10 and 4, not MEASURING.md's 40 and 8: one SmolLM2 window took ~25 s on the shared 2 cores
    # (issue 13); every row is scored on the same windows, so the comparison is paired.
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--agreement-windows", type=int, default=4)
    parser.add_argument("--minilm", action="store_true", help="also measure MiniLM")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--rows", nargs="*", help="only these row names (merged into the JSON by name)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    out = Path(args.out)
    torch.set_num_threads(2)
    payload = json.loads(out.read_text()) if out.exists() else {}
    payload.update({
        "benchmark": "embedding_head",
        "protocol": {"seqlen": 512, "wikitext2_windows": args.windows, "agreement_windows": args.agreement_windows,
                     "threads": 2, "stored_bytes": "model.safetensors of the saved directory (fp32: the same safetensors writer)",
                     "minilm": "embedding cosine to fp32 on 256 held-out wiki.test.raw lines; STS-B test Spearman"},
        "models": {"smollm2": "smollm2-135m (SmolLM2-135M-Instruct Q4_1 GGUF dequantised to fp32; tied 49152 x 576 "
                              "table)", "minilm": "minilm-l6 (all-MiniLM-L6-v2, fp32 safetensors; 30522 x 384 table)"},
        "versions": library_versions(),
        "date": time.strftime("%Y-%m-%d"),
        "notes": NOTES,
    })

    def save(model: str, row: dict) -> None:
        rows = [r for r in payload.get(model, []) if r["name"] != row["name"]] + [row]
        order = [n for n, *_ in SMOLLM2_ROWS]
        payload[model] = sorted(rows, key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")

    if not args.skip_smollm2:
        run_smollm2(args, save)
    if args.minilm:
        run_minilm(args, save)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
