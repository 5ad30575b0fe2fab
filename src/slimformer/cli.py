"""Command line: parse → call api.py → one-line error on a user mistake.

The options are derived from api.py: ``_api_option`` takes an option's default from the
API function's signature (``inspect.signature``) and its help from the docstring's
``Parameters:`` line for that parameter, so the CLI cannot drift from the API
(tests/test_cli_api.py checks every mapped option). ``--set Stage.field=value`` overrides
any recipe argument; ``--budget-bits B`` is an alias for ``--set HAWQ.budget_bits=B``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import warnings
from pathlib import Path

from slimformer import api
from slimformer.errors import SlimformerError
from slimformer.export import exporters
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


def param_help(func) -> dict[str, str]:
    """``name → text`` from the ``Parameters:`` section of ``func``'s docstring (one
    ``name: text`` line per parameter; deeper-indented lines continue it)."""
    doc = inspect.getdoc(func) or ""
    found: dict[str, str] = {}
    lines = doc.split("Parameters:", 1)[1].splitlines() if "Parameters:" in doc else []
    indent, current = None, None
    for line in lines:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break
        match = re.match(r"(\w+): (.*)", line.strip())
        if width == indent and match:
            current = match.group(1)
            found[current] = match.group(2).strip()
        elif current is not None:
            found[current] += " " + line.strip()
    return found


def _show_default(value) -> str | None:
    if value is None or isinstance(value, bool) or value == ():
        return None
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _api_option(p, func, name: str, *flags: str, **kwargs):
    """An option for parameter ``name`` of the API function ``func``: its default is the
    signature's, its help the docstring's (plus the default). A bool parameter becomes a
    switch: ``--name`` when it defaults to False, ``--no-name`` when it defaults to True."""
    default = inspect.signature(func).parameters[name].default
    if default is inspect.Parameter.empty:
        raise TypeError(f"{func.__name__}({name}) has no default to derive an option from")
    text = kwargs.pop("help", None) or param_help(func).get(name, "")
    shown = _show_default(default)
    if shown is not None and "default" not in text:
        text = f"{text} (default {shown})" if text else f"default {shown}"
    if isinstance(default, bool):
        kwargs["action"] = "store_false" if default else "store_true"
        flags = flags or (f"--no-{name.replace('_', '-')}" if default else f"--{name.replace('_', '-')}",)
    flags = flags or (f"--{name.replace('_', '-')}",)
    if kwargs.get("action") == "append" and isinstance(default, tuple):
        default = list(default)   # argparse appends to the default
    action = p.add_argument(*flags, dest=name, default=default, help=text, **kwargs)
    action.api_parameter = (func, name)   # read by the test that CLI and API defaults agree
    return action


def _api_help(func, name: str) -> str:
    return param_help(func).get(name, "")


class _Override(argparse.Action):
    """Collects recipe overrides as ``(how the user wrote it, "Stage.field=value")``.
    ``template``: for an alias such as ``--budget-bits``, the override with ``{}`` for the value."""

    def __init__(self, *args, template: str | None = None, **kwargs):
        self.template = template
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        found = list(getattr(namespace, self.dest, None) or [])
        text = self.template.format(value) if self.template else value
        found.append((f"{option_string} {value}", text))
        setattr(namespace, self.dest, found)


def _overrides(p, budget_alias: bool = False):
    p.add_argument("--set", dest="overrides", action=_Override, default=[], metavar="STAGE.FIELD=VALUE",
                   help="override a recipe argument, e.g. GPTQ.block_size=64 or HAWQ.budget_bits=4.5 "
                        "(the technique name as in the recipe; the value is read as YAML; repeatable)")
    if budget_alias:
        p.add_argument("--budget-bits", dest="overrides", action=_Override, template="HAWQ.budget_bits={}",
                       metavar="BITS", help="alias for --set HAWQ.budget_bits=BITS: average bits over the quantised "
                                            "weights for the recipe's HAWQ stage (e.g. 4.5)")


def build_parser() -> argparse.ArgumentParser:
    load_builtin()   # the exporters (and techniques) the options list
    parser = _Parser(prog="slimformer", description="Make transformer models cheaper to run, and measure the trade-off.")
    parser.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_arg(p, help_text=_api_help(api.load, "source")):
        p.add_argument("model", metavar="MODEL", help=help_text)
        _api_option(p, api.load, "trust_pickle")

    f = api.compress
    p = sub.add_parser("compress", help="apply a recipe and write the compressed model")
    model_arg(p)
    p.add_argument("--recipe", required=True, help=_api_help(f, "recipe"))
    p.add_argument("--out", required=True, help=_api_help(f, "out"))
    _api_option(p, f, "calib")
    _api_option(p, f, "calib_samples", type=_positive_int)
    _api_option(p, f, "calib_seed", type=int)
    _api_option(p, f, "seqlen", type=_positive_int)
    _api_option(p, f, "overwrite")
    _overrides(p, budget_alias=True)

    f = api.train
    p = sub.add_parser("train", help="fine-tune with a training recipe (QAT, GMP, STE, Top-KAST, rewinding, ...)")
    model_arg(p)
    p.add_argument("--recipe", required=True, help=_api_help(f, "recipe"))
    p.add_argument("--data", required=True, help=_api_help(f, "data"))
    p.add_argument("--out", required=True, help=_api_help(f, "out"))
    for name in ("steps", "batch_size", "seq_len", "grad_accum"):
        _api_option(p, f, name, type=_positive_int)
    _api_option(p, f, "lr", type=float)
    _api_option(p, f, "warmup_steps", type=int)
    _api_option(p, f, "save_every", type=int)
    _api_option(p, f, "resume")
    _api_option(p, f, "overwrite")
    _overrides(p)

    f = api.evaluate
    p = sub.add_parser("eval", help="measure quality and cost of one model")
    model_arg(p)
    _api_option(p, f, "data")
    _api_option(p, f, "seqlen", type=_positive_int)
    _api_option(p, f, "windows", type=_positive_int)
    _api_option(p, f, "stride", type=_positive_int)
    _api_option(p, f, "tasks", type=_task_list, help=f"comma-separated: {','.join(TASK_CHOICES)}")
    _api_option(p, f, "task_data")
    _api_option(p, f, "limit", type=_positive_int)
    _api_option(p, f, "reference")
    _api_option(p, f, "speed")
    p.add_argument("--json", dest="json_path", help="write the results as JSON here")

    f = api.compare
    p = sub.add_parser("compare", help="measure the model and one variant per recipe; write an HTML/Markdown/JSON report")
    model_arg(p)
    _api_option(p, f, "recipes", type=_names)
    _api_option(p, f, "data")
    _api_option(p, f, "calib")
    _api_option(p, f, "calib_samples", type=_positive_int)
    _api_option(p, f, "seqlen", type=_positive_int)
    _api_option(p, f, "windows", type=_positive_int)
    _api_option(p, f, "tasks", type=_task_list, help=f"comma-separated: {','.join(TASK_CHOICES)}")
    _api_option(p, f, "task_data")
    _api_option(p, f, "limit", type=_positive_int)
    _api_option(p, f, "new_tokens", type=_positive_int)
    _api_option(p, f, "speed_repeats", type=_positive_int)
    _api_option(p, f, "speed", help="skip the speed and memory measurements")
    _api_option(p, f, "save_models")
    p.add_argument("--out", required=True, help=_api_help(f, "out"))
    _api_option(p, f, "overwrite")
    _overrides(p)

    f = api.inspect
    p = sub.add_parser("inspect", help="describe a model: family, sizes, outliers, memory plan")
    model_arg(p)
    _api_option(p, f, "outliers")
    _api_option(p, f, "calib")
    _api_option(p, f, "calib_samples", type=_positive_int)
    _api_option(p, f, "seqlen", type=_positive_int)
    _api_option(p, f, "kv_plan")
    _api_option(p, f, "batch", type=_positive_int)
    _api_option(p, f, "context", type=_positive_int)
    _api_option(p, f, "kv_bytes", type=float)
    p.add_argument("--json", dest="json_path", help="write the results as JSON here")

    f = api.generate
    p = sub.add_parser("generate", help="generate text (native KV-cached decoder for Llama-family models)")
    model_arg(p)
    p.add_argument("--prompt", dest="prompts", action="append", required=True, help=_api_help(f, "prompts"))
    _api_option(p, f, "max_new_tokens", type=_positive_int)
    _api_option(p, f, "temperature", type=float)
    _api_option(p, f, "top_k", type=int)
    _api_option(p, f, "top_p", type=float)
    _api_option(p, f, "seed", type=int)
    _api_option(p, f, "stop", action="append")
    _api_option(p, f, "stream")
    _api_option(p, f, "ignore_eos")
    _api_option(p, f, "truncate")
    _api_option(p, f, "chat")
    _api_option(p, f, "engine", choices=ENGINES)
    _api_option(p, f, "weights", choices=("auto", "gguf", "dequantized"))
    _api_option(p, f, "activations", choices=("fp32", "int8"))
    _api_option(p, f, "memory_budget", metavar="BYTES")
    _api_option(p, f, "tensor_parallel", type=_positive_int, metavar="N")
    p.add_argument("--json", dest="json_path", help="write the generations as JSON here")

    f = api.bench
    p = sub.add_parser("bench", help="decode and prefill tokens/s of the native runtime vs Hugging Face and llama.cpp")
    model_arg(p)
    p.add_argument("--decode", dest="only_decode", action="store_true", help="time decode (default: both decode and prefill)")
    p.add_argument("--prefill", dest="only_prefill", action="store_true", help="time prefill")
    _api_option(p, f, "vs", type=_competitors)
    _api_option(p, f, "new_tokens", type=_positive_int)
    _api_option(p, f, "prompt_len", type=_positive_int)
    _api_option(p, f, "repeats", type=_positive_int)
    _api_option(p, f, "activations", choices=("fp32", "int8"))
    _api_option(p, f, "head", choices=("model", "int8"))
    p.add_argument("--json", dest="json_path", help="write the results as JSON here")

    f = api.export
    p = sub.add_parser("export", help="write a model in another format (" + ", ".join(sorted(exporters())) + ")")
    model_arg(p)
    _api_option(p, f, "format", choices=sorted(exporters()),
                help="; ".join(f"{e.name}: {e.description}" for e in exporters().values()))
    p.add_argument("--out", required=True, help=_api_help(f, "out"))
    _api_option(p, f, "overwrite")
    _api_option(p, f, "requantize")
    _api_option(p, f, "outtype")

    sub.add_parser("recipes", help="list the built-in recipes")

    f = api.study_w8a8
    p = sub.add_parser("study-w8a8", help="W8A32 vs W32A8 vs W8A8: how much activation quantisation hurts")
    model_arg(p)
    _api_option(p, f, "data")
    _api_option(p, f, "seqlen", type=_positive_int)
    _api_option(p, f, "windows", type=_positive_int)
    p.add_argument("--json", dest="json_path", help="write the results as JSON here")
    return parser


def _write_json(path: str | None, payload) -> None:
    if path:
        from slimformer.util.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def _fmt_bytes(n) -> str:
    return "—" if n is None else f"{n / 1e6:,.1f} MB"


def _loaded(args):
    from slimformer.models.load import load

    model = load(args.model, trust_pickle=args.trust_pickle)
    return (model[0], model[1])


def run(args) -> int:
    import torch

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
        return _bench(args, progress)
    if args.command == "export":
        path = api.export(args.model, args.out, args.format, overwrite=args.overwrite, requantize=args.requantize,
                          outtype=args.outtype, trust_pickle=args.trust_pickle)
        print(f"wrote {path} ({args.format})")
        return 0
    # Cheap checks first, so a typo or a forgotten flag does not cost a model load.
    from slimformer.recipes import apply_overrides, load_recipe

    if args.command == "compress":
        recipe = apply_overrides(load_recipe(args.recipe), args.overrides)
    if args.command == "compare":
        recipes = api.override_each([load_recipe(r) for r in args.recipes], args.overrides)
    if args.command in ("compress", "compare"):
        check_output_dir(Path(args.out), args.overwrite)
    if args.command == "train":
        return _train(args, progress)
    if getattr(args, "tasks", None):
        api.resolve_task_data(args.task_data)
    source = _loaded(args)
    if args.command == "compress":
        result = api.compress(source, recipe, args.out, calib=args.calib, calib_samples=args.calib_samples,
                              seqlen=args.seqlen, calib_seed=args.calib_seed, overwrite=args.overwrite,
                              progress=progress, inplace=True, source_name=args.model)
        print(f"wrote {result.out} ({_fmt_bytes(result.stored_bytes)}, {result.run.seconds:.1f} s)")
        for layer, facts in result.run.layers.items():
            if "bytes_before" in facts and "bytes_after" in facts:   # QuantizeEmbeddings
                tied = f"; {facts['tied_head']} reads the same codes" if facts.get("tied_head") else ""
                print(f"{layer}: {facts.get('format')} {_fmt_bytes(facts['bytes_before'])} -> "
                      f"{_fmt_bytes(facts['bytes_after'])}{tied}")
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
        rows = api.compare(source, recipes, args.data, args.out, calib=args.calib, calib_samples=args.calib_samples,
                           seqlen=args.seqlen, windows=args.windows, tasks=args.tasks, task_data=args.task_data,
                           limit=args.limit, speed=args.speed, new_tokens=args.new_tokens,
                           speed_repeats=args.speed_repeats, overwrite=args.overwrite, save_models=args.save_models,
                           progress=progress, source_name=args.model)
        for row in rows:
            ppl = row.get("perplexity")
            print(f"{row['name']:18s} ppl {ppl:8.3f}  {_fmt_bytes(row.get('stored_bytes'))}")
        print(f"report: {args.out}/report.html")
    elif args.command == "inspect":
        from slimformer.eval.inspect import format_inspection

        result = api.inspect(source, outliers=args.outliers, calib=args.calib, calib_samples=args.calib_samples,
                             seqlen=args.seqlen, kv_plan=args.kv_plan, batch=args.batch, context=args.context,
                             kv_bytes=args.kv_bytes, progress=progress)
        print(format_inspection(result))
        _write_json(args.json_path, result)
    elif args.command == "study-w8a8":
        result = api.study_w8a8(source, args.data, seqlen=args.seqlen, windows=args.windows, progress=progress)
        _write_json(args.json_path, result)
    return 0


def _train(args, progress: bool) -> int:
    from slimformer.errors import OutputExistsError
    from slimformer.recipes import apply_overrides, load_recipe

    recipe = apply_overrides(load_recipe(args.recipe), args.overrides)
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
    memory = outcome.result.memory
    memory = f", training memory {memory['total'] / 2**20:.0f} MiB" if memory else ""
    print(f"wrote {outcome.out} ({outcome.result.steps} steps, {outcome.result.seconds:.1f} s{loss}{sparsity}{memory})")
    return 0


def _generate(args) -> int:
    result = api.generate(args.model, args.prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=tuple(args.stop or ()),
                          ignore_eos=args.ignore_eos, truncate=args.truncate, chat=args.chat, stream=args.stream,
                          engine=args.engine, weights=args.weights, activations=args.activations,
                          memory_budget=args.memory_budget, tensor_parallel=args.tensor_parallel,
                          trust_pickle=args.trust_pickle)
    if args.stream:
        for piece in result:
            print(piece, end="", flush=True)
        print()
        return 0
    for i, r in enumerate(result):
        print(r.text if len(result) == 1 else f"[{i}] {r.text}")
    _write_json(args.json_path, {"engine": result.engine, "generations": [vars(r) for r in result]})
    return 0


def _bench(args, progress: bool) -> int:
    decode, prefill = (args.only_decode or not args.only_prefill), (args.only_prefill or not args.only_decode)
    report = api.bench(args.model, decode=decode, prefill=prefill, vs=args.vs, new_tokens=args.new_tokens,
                       prompt_len=args.prompt_len, repeats=args.repeats, activations=args.activations,
                       head=args.head, progress=progress, trust_pickle=args.trust_pickle)
    for name, row in report["results"].items():
        parts = [f"{name:12s}"]
        if "decode_tok_s" in row:
            parts.append(f"decode {row['decode_tok_s']['median']:7.1f} tok/s")
        if "roofline_fraction" in row:
            parts.append(f"({100 * row['roofline_fraction']:.0f}% of roofline)")
        if "prefill_tok_s" in row:
            parts.append(f"prefill {row['prefill_tok_s']['median']:7.1f} tok/s")
        print("  ".join(parts))
    _write_json(args.json_path, report)
    return 0


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
