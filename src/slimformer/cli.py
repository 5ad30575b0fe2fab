"""Command line: parse → call api.py → one-line error on a user mistake."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from slimformer.errors import SlimformerError
from slimformer.plugins import load_builtin
from slimformer.runtime import ENGINES
from slimformer.util.atomic import check_output_dir

TASK_CHOICES = ("lambada", "hellaswag", "piqa", "winogrande", "arc_easy", "stsb")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _task_list(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASK_CHOICES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task '{unknown[0]}' (choose from {', '.join(TASK_CHOICES)})")
    return tasks


def _competitors(text: str) -> list[str]:
    from slimformer.runtime.bench import COMPETITORS

    names = _names(text)
    unknown = [n for n in names if n not in COMPETITORS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown engine '{unknown[0]}' (choose from {', '.join(COMPETITORS)})")
    return names


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end like every other user mistake: one line on stderr, exit 2.
    (Subparsers are built with the same class.)"""

    def error(self, message):
        self.exit(2, f"slimformer: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="slimformer", description="Make transformer models cheaper to run, and measure the trade-off.")
    parser.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_arg(p, help_text="built-in name (smollm2-135m, minilm-l6), HF id or directory, .gguf file, or a compressed directory"):
        p.add_argument("model", metavar="MODEL", help=help_text)
        p.add_argument("--trust-pickle", action="store_true", help="allow pickle-only checkpoints (runs code from the file)")

    p = sub.add_parser("compress", help="apply a recipe and write the compressed model")
    model_arg(p)
    p.add_argument("--recipe", required=True, help="built-in recipe name (see `slimformer recipes`) or a YAML file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--calib", help="calibration DATA: pydoc, wikitext2, or a path (for recipes that need it)")
    p.add_argument("--calib-samples", type=_positive_int, default=128, help="calibration sequences (default 128)")
    p.add_argument("--calib-seed", type=int, help="sample calibration windows at random with this seed (default: the first ones in order)")
    p.add_argument("--seqlen", type=_positive_int, default=512, help="calibration sequence length (default 512)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--budget-bits", type=float, metavar="BITS",
                   help="average bits over the quantised weights for the recipe's HAWQ stage (e.g. 4.5)")

    p = sub.add_parser("train", help="fine-tune with a training recipe (GMP, STE, Top-KAST, rewinding, ...)")
    model_arg(p)
    p.add_argument("--recipe", required=True, help="built-in recipe name or a YAML file with training stages")
    p.add_argument("--data", required=True, help="training DATA: pydoc (its calibration half), a text/JSONL file or directory")
    p.add_argument("--out", required=True, help="output directory (the trained model; checkpoints in OUT/checkpoint-N)")
    p.add_argument("--steps", type=_positive_int, help="optimiser steps (default: the recipe's, else 100)")
    p.add_argument("--batch-size", type=_positive_int, help="sequences per micro-batch (default 4)")
    p.add_argument("--seq-len", type=_positive_int, help="tokens per sequence (default 512)")
    p.add_argument("--grad-accum", type=_positive_int, help="micro-batches per step (default 1)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-4)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 0)")
    p.add_argument("--save-every", type=int, help="write a checkpoint every N steps (default: only the final model)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    p = sub.add_parser("eval", help="measure quality and cost of one model")
    model_arg(p)
    p.add_argument("--data", default="pydoc", help="DATA: pydoc, wikitext2, or a text/JSONL file or directory (default pydoc)")
    p.add_argument("--seqlen", type=_positive_int, default=512, help="window length (default 512)")
    p.add_argument("--windows", type=_positive_int, help="number of windows (default: all)")
    p.add_argument("--stride", type=_positive_int, help="sliding-window stride (default: non-overlapping)")
    p.add_argument("--tasks", type=_task_list, default=[], help=f"comma-separated: {','.join(TASK_CHOICES)}")
    p.add_argument("--task-data", help="directory of task files (default $SLIMFORMER_TASK_DATA)")
    p.add_argument("--limit", type=_positive_int, help="first N examples of each task")
    p.add_argument("--reference", help="model to measure agreement (KL, top-1) or embedding cosine against")
    p.add_argument("--speed", action="store_true", help="also measure prefill and decode tokens/s")
    p.add_argument("--json", dest="json_path", help="write the results as JSON here")

    p = sub.add_parser("compare", help="measure the model and one variant per recipe; write an HTML/Markdown/JSON report")
    model_arg(p)
    p.add_argument("--recipes", type=_names, default=None, help="comma-separated recipes (default: rtn-w8,rtn-w4-g64,rtn-w4-g32,rtn-w3-g64)")
    p.add_argument("--data", default="pydoc", help="evaluation DATA (default pydoc)")
    p.add_argument("--calib", help="calibration DATA (default: the calibration half of a built-in DATA)")
    p.add_argument("--calib-samples", type=_positive_int, default=128)
    p.add_argument("--seqlen", type=_positive_int, default=512)
    p.add_argument("--windows", type=_positive_int, default=20, help="evaluation windows (default 20)")
    p.add_argument("--tasks", type=_task_list, default=[])
    p.add_argument("--task-data")
    p.add_argument("--limit", type=_positive_int)
    p.add_argument("--new-tokens", type=_positive_int, default=16, help="decode tokens timed per run (default 16)")
    p.add_argument("--speed-repeats", type=_positive_int, default=2, help="timed runs after a warm-up; the median is reported (default 2)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed and memory measurements")
    p.add_argument("--save-models", action="store_true", help="keep each compressed model under OUT/models/")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("inspect", help="describe a model: family, sizes, outliers, memory plan")
    model_arg(p)
    p.add_argument("--outliers", action="store_true", help="per-layer activation outlier statistics on calibration data")
    p.add_argument("--calib", default="pydoc", help="DATA for --outliers (default pydoc)")
    p.add_argument("--calib-samples", type=_positive_int, default=8)
    p.add_argument("--seqlen", type=_positive_int, default=512)
    p.add_argument("--kv-plan", action="store_true", help="weights + KV-cache memory for --batch and --context")
    p.add_argument("--batch", type=_positive_int, default=1)
    p.add_argument("--context", type=_positive_int, default=2048)
    p.add_argument("--kv-bytes", type=float, default=2, help="bytes per cached key/value element (default 2)")
    p.add_argument("--json", dest="json_path")

    p = sub.add_parser("generate", help="generate text (native KV-cached decoder for Llama-family models)")
    model_arg(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat the flag for a batch")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128, help="default 128")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    p.add_argument("--truncate", action="store_true", help="drop the start of a prompt longer than the context")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--engine", choices=ENGINES, default="auto", help="native (Llama family), hf, or auto (default)")
    p.add_argument("--weights", choices=("auto", "gguf", "dequantized"), default="auto",
                   help="for a .gguf model: run its quantised blocks (auto, gguf) or fp32 (dequantized)")
    p.add_argument("--activations", choices=("fp32", "int8"), default="fp32",
                   help="native decode of int4/int8 weights: fp32 activations (exact) or int8 (llama.cpp-style, faster)")
    p.add_argument("--memory-budget", metavar="BYTES",
                   help="stream blocks from a safetensors directory under this budget, e.g. 300MB (offloading)")
    p.add_argument("--tensor-parallel", type=_positive_int, default=1, metavar="N",
                   help="split the layers over N processes (torch.distributed; greedy, one prompt)")
    p.add_argument("--json", dest="json_path", help="write the generations as JSON here")

    p = sub.add_parser("bench", help="decode and prefill tokens/s of the native runtime vs Hugging Face and llama.cpp")
    model_arg(p)
    p.add_argument("--decode", action="store_true", help="time decode (default: both decode and prefill)")
    p.add_argument("--prefill", action="store_true", help="time prefill")
    p.add_argument("--vs", type=_competitors, default=[], help="comma-separated: hf, llama.cpp (llama.cpp needs a .gguf)")
    p.add_argument("--new-tokens", type=_positive_int, default=128, help="decode tokens per timed run (default 128)")
    p.add_argument("--prompt-len", type=_positive_int, default=512, help="prefill prompt length (default 512)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed rounds after a warm-up (default 3)")
    p.add_argument("--activations", choices=("fp32", "int8"), default="fp32",
                   help="decode arithmetic for quantised weights: fp32 (exact) or int8 (llama.cpp-style)")
    p.add_argument("--head", choices=("model", "int8"), default="model", help="LM head as stored, or rounded to int8")
    p.add_argument("--json", dest="json_path", help="write the results as JSON here")

    sub.add_parser("recipes", help="list the built-in recipes")

    p = sub.add_parser("study-w8a8", help="W8A32 vs W32A8 vs W8A8: how much activation quantisation hurts")
    model_arg(p)
    p.add_argument("--data", default="pydoc")
    p.add_argument("--seqlen", type=_positive_int, default=512)
    p.add_argument("--windows", type=_positive_int, default=8)
    p.add_argument("--json", dest="json_path")
    return parser


def _write_json(path: str | None, payload) -> None:
    if path:
        from slimformer.util.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def _fmt_bytes(n) -> str:
    return "—" if n is None else f"{n / 1e6:,.1f} MB"


def run(args) -> int:
    import torch

    from slimformer import api

    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    if args.command == "recipes":
        from slimformer.recipes import builtin_recipes, load_recipe

        for name in builtin_recipes():
            print(f"{name:18s} {load_recipe(name).description}")
        return 0
    if args.command == "generate":
        return _generate(args)
    if args.command == "bench":
        return _bench(args)
    # Cheap checks first, so a typo or a forgotten flag does not cost a model load.
    recipe = None
    if args.command == "compress":
        from slimformer.recipes import load_recipe

        recipe = load_recipe(args.recipe)
        if args.budget_bits is not None:
            from slimformer.techniques.quant.hawq import with_budget

            recipe = with_budget(recipe, args.budget_bits)
    if args.command in ("compress", "compare"):
        check_output_dir(Path(args.out), args.overwrite)
    if args.command == "train":
        return _train(args, progress)
    if getattr(args, "tasks", None):
        api.resolve_task_data(args.task_data)
    if args.command in ("eval", "compare", "compress", "inspect", "study-w8a8"):
        from slimformer.models.load import load

        model = load(args.model, trust_pickle=args.trust_pickle)
        source = (model[0], model[1])
    if args.command == "compress":
        result = api.compress(source, recipe, args.out, calib=args.calib, calib_samples=args.calib_samples,
                              seqlen=args.seqlen, calib_seed=args.calib_seed, overwrite=args.overwrite,
                              progress=progress, inplace=True, source_name=args.model)
        print(f"wrote {result.out} ({_fmt_bytes(result.stored_bytes)}, {result.run.seconds:.1f} s)")
        for line in result.run.fallbacks:
            print(f"fallback: {line}")
    elif args.command == "eval":
        reference = None
        if args.reference:
            from slimformer.models.load import load

            reference = load(args.reference, trust_pickle=args.trust_pickle)
        result = api.evaluate(source, args.data, seqlen=args.seqlen, windows=args.windows, stride=args.stride,
                              tasks=args.tasks, task_data=args.task_data, limit=args.limit,
                              reference=reference, speed=args.speed, progress=progress, source_name=args.model)
        _write_json(args.json_path, result)
        print(json.dumps(result, indent=2, default=str))
    elif args.command == "compare":
        recipes = args.recipes or list(api.DEFAULT_COMPARE_RECIPES)
        rows = api.compare(source, recipes, args.data, args.out, calib=args.calib, calib_samples=args.calib_samples,
                           seqlen=args.seqlen, windows=args.windows, tasks=args.tasks, task_data=args.task_data,
                           limit=args.limit, speed=not args.no_speed, new_tokens=args.new_tokens, speed_repeats=args.speed_repeats,
                           overwrite=args.overwrite, save_models=args.save_models, progress=progress,
                           source_name=args.model)
        for row in rows:
            ppl = row.get("perplexity")
            print(f"{row['name']:18s} ppl {ppl:8.3f}  {_fmt_bytes(row.get('stored_bytes'))}")
        print(f"report: {args.out}/report.html")
    elif args.command == "inspect":
        from slimformer.eval.inspect import inspect_model

        result = inspect_model(source[0], source[1], args)
        _write_json(args.json_path, result)
    elif args.command == "study-w8a8":
        from slimformer import api

        result = api.study_w8a8(source, args.data, seqlen=args.seqlen, windows=args.windows, progress=progress)
        _write_json(args.json_path, result)
    return 0


def _train(args, progress: bool) -> int:
    from slimformer import api
    from slimformer.errors import OutputExistsError
    from slimformer.recipes import load_recipe

    recipe = load_recipe(args.recipe)
    out = Path(args.out)
    if out.exists() and not (args.resume or args.overwrite):
        raise OutputExistsError(f"output directory {out} exists; pass --resume to continue it or --overwrite to replace it")
    outcome = api.train(args.model, recipe, args.data, out, steps=args.steps, batch_size=args.batch_size,
                        seq_len=args.seq_len, lr=args.lr, grad_accum=args.grad_accum, warmup_steps=args.warmup_steps,
                        save_every=args.save_every, resume=args.resume, overwrite=args.overwrite,
                        progress=progress, source_name=args.model)
    history = outcome.result.history
    loss = f", final loss {history[-1]['loss']:.3f}" if history else ""
    sparsity = f", sparsity {outcome.sparsity['sparsity']:.1%}" if outcome.sparsity else ""
    print(f"wrote {outcome.out} ({outcome.result.steps} steps, {outcome.result.seconds:.1f} s{loss}{sparsity})")
    return 0


def _generate(args) -> int:
    from slimformer.runtime.generate import Generator, SamplingConfig

    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos, stop=tuple(args.stop),
                    truncate=args.truncate)
    SamplingConfig(**sampling)  # bad values fail before the model loads
    if args.stream and len(args.prompt) > 1:
        raise SlimformerError("--stream takes one --prompt")
    if args.tensor_parallel > 1:
        if args.memory_budget:
            raise SlimformerError("--memory-budget and --tensor-parallel do not combine")
        return _generate_tensor_parallel(args)
    if args.memory_budget:
        gen = _offloaded_generator(args)
    else:
        gen = Generator.from_source(args.model, engine=args.engine, weights=args.weights,
                                    trust_pickle=args.trust_pickle, activations=args.activations)
    prompts = args.prompt
    if args.chat:
        prompts = [gen.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                     add_generation_prompt=True) for p in prompts]
    if args.stream:
        for piece in gen.stream(prompts[0], **sampling):
            print(piece, end="", flush=True)
        print()
        return 0
    results = gen.generate(prompts, **sampling)
    for i, r in enumerate(results):
        print(r.text if len(results) == 1 else f"[{i}] {r.text}")
    _write_json(args.json_path, {"engine": gen.engine_name, "generations": [vars(r) for r in results]})
    return 0


def _offloaded_generator(args):
    """Blocks streamed from memory-mapped safetensors under a budget (runtime.offload);
    the model runs on the Hugging Face engine, block by block."""
    from slimformer.runtime.generate import Generator
    from slimformer.runtime.offload import load_offloaded, parse_bytes

    budget = parse_bytes(args.memory_budget)
    if not Path(args.model).is_dir():
        raise SlimformerError("--memory-budget streams weights from a safetensors directory (a `slimformer compress` "
                              f"output, an HF directory, or one written by runtime.offload.save_offloadable), not {args.model}")
    if args.engine == "native":
        raise SlimformerError("--memory-budget runs on the hf engine (the native decoder keeps every weight resident)")
    model, tokenizer = load_offloaded(args.model, budget)
    return Generator.from_model(model, tokenizer, engine="hf")


def _generate_tensor_parallel(args) -> int:
    """Greedy generation with the layers split over processes (runtime.parallel)."""
    import torch

    from slimformer.models.load import load
    from slimformer.runtime.generate import stop_token_ids
    from slimformer.runtime.parallel import plan_tensor_parallel, tp_generate_greedy

    if args.temperature or len(args.prompt) > 1 or args.stream:
        raise SlimformerError("--tensor-parallel runs greedy decoding of one --prompt (no --temperature, --stream)")
    model, tokenizer = load(args.model, trust_pickle=args.trust_pickle)
    plan_tensor_parallel(model, args.tensor_parallel)  # a size that does not divide heads or rows fails here
    prompt = args.prompt[0]
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    ids = torch.tensor([tokenizer(prompt).input_ids])
    out = tp_generate_greedy(args.model, ids, args.max_new_tokens, args.tensor_parallel)[0, ids.shape[1]:].tolist()
    eos = stop_token_ids(model, tokenizer)
    if not args.ignore_eos:
        out = out[: next((i for i, t in enumerate(out) if t in eos), len(out))]
    text = tokenizer.decode(out, skip_special_tokens=False)
    print(text)
    _write_json(args.json_path, {"engine": f"hf, tensor-parallel x{args.tensor_parallel}",
                                 "generations": [{"prompt": args.prompt[0], "text": text, "token_ids": out}]})
    return 0


def _bench(args) -> int:
    from slimformer.models.load import load
    from slimformer.runtime import bench
    from slimformer.runtime.decoder import NativeDecoder, gguf_source_path

    gguf = gguf_source_path(args.model)
    if "llama.cpp" in args.vs and gguf is None:
        raise SlimformerError("--vs llama.cpp needs a .gguf model (llama.cpp runs GGUF files only)")
    threads = torch_threads()
    model, tokenizer = load(args.model, trust_pickle=args.trust_pickle)
    decoder = NativeDecoder.from_model(model, gguf_path=gguf, activations=args.activations, head=args.head)
    engines = [bench.native_timed("slimformer", decoder)]
    if "hf" in args.vs:
        engines.append(bench.hf_timed(model))
    if "llama.cpp" in args.vs:
        engines.append(bench.llama_cpp_timed(str(gguf), threads, context=args.prompt_len + args.new_tokens + 8))
    decode, prefill = (args.decode or not args.prefill), (args.prefill or not args.decode)
    prompt = tokenizer("The capital of France is").input_ids
    long_prompt = bench.prompt_of_length(tokenizer, args.prompt_len) if prefill else None
    results = bench.run_benchmark(engines, prompt, long_prompt, args.new_tokens, args.repeats, decode,
                                  progress=not args.quiet)
    bandwidth = bench.stream_bandwidth() if decode else None
    if bandwidth:
        bench.add_roofline(results, bandwidth)
    for name, row in results.items():
        parts = [f"{name:12s}"]
        if "decode_tok_s" in row:
            parts.append(f"decode {row['decode_tok_s']['median']:7.1f} tok/s")
        if "roofline_fraction" in row:
            parts.append(f"({100 * row['roofline_fraction']:.0f}% of roofline)")
        if "prefill_tok_s" in row:
            parts.append(f"prefill {row['prefill_tok_s']['median']:7.1f} tok/s")
        print("  ".join(parts))
    _write_json(args.json_path, {"model": args.model, "threads": threads, "bandwidth_bytes_s": bandwidth,
                                 "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "results": results})
    return 0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings meant for the user (too little calibration data, a layer falling back)
    read as one line, like errors, not as a source location and a code excerpt."""
    return f"slimformer: warning: {message}\n"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.formatwarning = _one_line_warning
    load_builtin()   # every technique, module type and exporter a command may name
    try:
        return run(args)
    except SlimformerError as exc:
        print(f"slimformer: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("slimformer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
