"""The public functions: load, compress, train, evaluate, compare, generate, export, inspect,
bench, study_w8a8, and their defaults, once. The CLI is derived from them: its options take
their defaults from these signatures and their help from the ``Parameters:`` lines of these
docstrings (one ``name: text`` line per parameter). Importing this module loads the built-in
plugins (techniques, module types, exporters), so every name a recipe or a saved model uses
is known."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import os
import platform
import shutil
import sys
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimformer.core.runner import (
    RunResult,
    TrainingRun,
    recipe_segments,
    recipe_summary,
    run_recipe,
    run_transforms,
)
from slimformer.core.transform import Needs, check_targets
from slimformer.data import (
    calibration_set,
    eval_windows,
    held_out_sentences,
    load_text,
    tokenize,
)
from slimformer.errors import DataError, QuantConfigError, RecipeError
from slimformer.eval import cost
from slimformer.eval.perplexity import perplexity
from slimformer.models.adapters import adapter_for
from slimformer.models.compressed import library_versions, save_compressed, weight_bytes
from slimformer.models.load import load as _load_model
from slimformer.plugins import load_builtin
from slimformer.recipes import Recipe, apply_overrides, load_recipe
from slimformer.util.atomic import atomic_directory, check_output_dir

if typing.TYPE_CHECKING:
    from slimformer.train.loop import TrainResult

load_builtin()

DEFAULT_COMPARE_RECIPES = ("rtn-w8", "rtn-w4-g64", "rtn-w4-g32", "rtn-w3-g64")


def load(source, dtype="float32", trust_pickle: bool = False):
    """``(model, tokenizer)`` on CPU from a built-in name, a Hugging Face directory or id, a
    compressed or offloadable slimformer directory, or a GGUF file.

    Parameters:
        source: built-in name (smollm2-135m, minilm-l6), HF id or directory, .gguf file, or a compressed directory
        trust_pickle: allow pickle-only checkpoints (runs code from the file)
    """
    return _load_model(source, dtype=dtype, trust_pickle=trust_pickle)


def _model_and_tokenizer(model, source_name: str | None = None):
    """``(model, tokenizer, name)`` from a source or a ``(model, tokenizer)`` pair."""
    if isinstance(model, (tuple, list)):
        return model[0], model[1], source_name or getattr(model[0], "name_or_path", "model")
    loaded, tokenizer = load(model)
    return loaded, tokenizer, source_name or str(model)


def _recipe(recipe, overrides=()) -> Recipe:
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(str(recipe))
    return apply_overrides(recipe, overrides) if overrides else recipe


@dataclass
class CompressResult:
    model: torch.nn.Module
    tokenizer: object
    recipe: Recipe
    run: RunResult
    out: Path | None = None
    stored_bytes: int | None = None
    calibration: dict | None = field(default=None)


def compress(model, recipe, out=None, *, calib: str | None = None, calib_samples: int = 128,
             seqlen: int = 512, calib_seed: int | None = None, overwrite: bool = False,
             progress: bool = True, inplace: bool = False, source_name: str | None = None,
             overrides=()) -> CompressResult:
    """Apply ``recipe`` (built-in name, YAML path or Recipe) to ``model`` (a source for
    :func:`slimformer.load` or a ``(model, tokenizer)`` pair); write ``out`` if given.

    Parameters:
        recipe: built-in recipe name (see `slimformer recipes`) or a YAML file
        out: output directory
        calib: calibration DATA: pydoc, wikitext2, or a path (for recipes that need it)
        calib_samples: calibration sequences
        seqlen: calibration sequence length
        calib_seed: sample calibration windows at random with this seed (default: the first ones in order)
        overwrite: replace an existing output directory
        overrides: recipe argument overrides, "Stage.field=value" (e.g. GPTQ.block_size=64)
    """
    recipe = _recipe(recipe, overrides)
    if out is not None:
        check_output_dir(Path(out), overwrite)   # fail before the slow part
    if any(stage.requires() is Needs.TRAINING for stage in recipe.stages):
        raise RecipeError(f"recipe {recipe.name} trains: run it with `slimformer train`")
    base, tokenizer, source = _model_and_tokenizer(model, source_name)
    if getattr(base, "slimformer_meta", None):
        raise QuantConfigError(f"{source} is already compressed; compress the original model instead")
    check_targets(recipe.stages, base, adapter_for(base))
    target = base if inplace or not isinstance(model, (tuple, list)) else copy.deepcopy(base)
    needs_data = any(stage.requires() is Needs.CALIBRATION for stage in recipe.stages)
    calib_ids, calib_meta = None, None
    if needs_data:
        if calib is None:
            raise DataError(f"recipe {recipe.name} needs calibration data: pass --calib DATA")
        calib_ids, calib_meta = calibration_set(tokenizer, calib, calib_samples, seqlen, calib_seed)
    run = run_recipe(target, recipe.stages, calib=calib_ids, progress=progress)
    result = CompressResult(target, tokenizer, recipe, run, calibration=calib_meta)
    if out is not None:
        extra = {"calibration": calib_meta, "fallbacks": run.fallbacks, "compress_seconds": run.seconds,
                 "layers": run.layers}
        result.out = save_compressed(target, tokenizer, out, recipe_text=recipe.text or recipe.name,
                                     source=source, extra=extra, overwrite=overwrite)
        result.stored_bytes = weight_bytes(result.out)
    return result


def _table_bytes_saved(layers: dict) -> int:
    """Bytes the QuantizeEmbeddings stage saved (its per-layer ``bytes_before``/``bytes_after``)."""
    return sum(f["bytes_before"] - f["bytes_after"] for f in layers.values()
               if isinstance(f, dict) and "bytes_before" in f and "bytes_after" in f)


def _check_decoder(model, what: str) -> None:
    if not adapter_for(model).is_decoder:
        raise DataError(f"{what} needs a decoder language model; this model is an encoder")


def evaluate(model, data: str | None = "pydoc", *, seqlen: int = 512, windows: int | None = None,
             stride: int | None = None, tasks=(), task_data=None, limit: int | None = None,
             reference=None, speed: bool = False, progress: bool = True, source_name: str | None = None) -> dict:
    """Quality and cost of one model. Decoders: perplexity on ``data`` (and agreement
    with ``reference``); encoders: embedding cosine to ``reference``; plus tasks.

    Parameters:
        data: DATA: pydoc, wikitext2, or a text/JSONL file or directory
        seqlen: window length
        windows: number of windows (default: all)
        stride: sliding-window stride (default: non-overlapping)
        tasks: comma-separated task names
        task_data: directory of task files (default $SLIMFORMER_TASK_DATA)
        limit: first N examples of each task
        reference: model to measure agreement (KL, top-1) or embedding cosine against
        speed: also measure prefill and decode tokens/s
    """
    task_dir = resolve_task_data(task_data) if tasks else None   # fail before the slow part
    loaded, tokenizer, source = _model_and_tokenizer(model, source_name)
    ref = _model_and_tokenizer(reference)[0] if reference is not None else None
    if ref is not None:
        check_reference(loaded, ref)
    adapter = adapter_for(loaded)
    result: dict = {"model": source}
    if data is not None:
        text = load_text(data, role="eval")
        result["data"] = text.describe()
        if adapter.is_decoder:
            wins = eval_windows(tokenize(text, tokenizer), seqlen, windows, stride)
            result.update(perplexity(loaded, wins, reference=ref, progress=progress))
            result.update(seqlen=seqlen, windows=len(wins))
        else:
            result["perplexity"] = None
            if ref is not None:
                from slimformer.eval.embeddings import embedding_cosine, encode

                sentences = held_out_sentences(text.text)
                result["embedding_cosine"] = embedding_cosine(encode(ref, tokenizer, sentences),
                                                              encode(loaded, tokenizer, sentences))
    if tasks:
        result["tasks"] = evaluate_task_list(loaded, tokenizer, tasks, task_dir, limit, progress)
    result["stored_bytes"] = _stored_bytes(loaded, source)
    if speed:
        result.update(cost.measure_speed(loaded, decode=adapter.is_decoder))
    result["peak_rss_bytes"] = cost.peak_rss_bytes()
    return result


def check_reference(model, reference) -> None:
    """Agreement compares outputs position by position: same kind of model, same vocabulary."""
    def kind(m):
        return "a decoder" if adapter_for(m).is_decoder else "an encoder"

    if kind(model) != kind(reference):
        raise DataError(f"the reference is {kind(reference)} but the model is {kind(model)}")
    vocab, ref_vocab = model.config.vocab_size, reference.config.vocab_size
    if adapter_for(model).is_decoder and vocab != ref_vocab:
        raise DataError(f"the reference has a vocabulary of {ref_vocab} tokens, the model {vocab}: "
                        "agreement needs the same tokenizer")


def _stored_bytes(model, source: str) -> int:
    """Bytes of the files the model was loaded from; in-memory size if it has none."""
    meta = getattr(model, "slimformer_meta", None)
    if meta and not meta.get("imported_from"):   # our compressed directory (imports: their own files)
        return weight_bytes(source)
    return cost.source_bytes(source) or cost.in_memory_bytes(model)


def evaluate_task_list(model, tokenizer, tasks, task_dir: Path, limit, progress) -> dict:
    from slimformer.eval.tasks import evaluate_tasks

    tasks = list(tasks)
    out = {}
    if "stsb" in tasks:
        from slimformer.eval.embeddings import stsb_spearman

        tasks.remove("stsb")
        out["stsb"] = stsb_spearman(model, tokenizer, task_dir, limit=limit)
    if tasks:
        _check_decoder(model, f"tasks {', '.join(tasks)}")
        out.update(evaluate_tasks(model, tokenizer, tasks, task_dir, limit=limit, progress=progress))
    return out


def resolve_task_data(task_data) -> Path:
    """Where task files live: the argument, else $SLIMFORMER_TASK_DATA."""
    value = task_data or os.environ.get("SLIMFORMER_TASK_DATA")
    if not value:
        raise DataError("tasks need their data files: pass --task-data DIR (laid out like lambada_openai/, hellaswag/, ...) or set SLIMFORMER_TASK_DATA")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(f"task data directory not found: {path}")
    return path


def run_meta(source: str, data: dict, seqlen: int, windows: int, argv=None) -> dict:
    return {
        "model": source,
        "data": data,
        "seqlen": seqlen,
        "windows": windows,
        "versions": library_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(argv or sys.argv),
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform()},
    }


def compare(model, recipes=DEFAULT_COMPARE_RECIPES, data: str = "pydoc", out=None, *,
            calib: str | None = None, calib_samples: int = 128, seqlen: int = 512, windows: int | None = 20,
            tasks=(), task_data=None, limit: int | None = None, speed: bool = True,
            new_tokens: int = 16, speed_repeats: int = 2, overwrite: bool = False, save_models: bool = False,
            progress: bool = True, source_name: str | None = None, overrides=()) -> list[dict]:
    """Measure the uncompressed model and one variant per recipe on the same data;
    write ``report.{html,md,json}`` to ``out``.

    Parameters:
        recipes: comma-separated recipes
        data: evaluation DATA
        out: report directory
        calib: calibration DATA (default: the calibration half of a built-in DATA)
        calib_samples: calibration sequences
        seqlen: window and calibration sequence length
        windows: evaluation windows
        tasks: comma-separated task names
        task_data: directory of task files (default $SLIMFORMER_TASK_DATA)
        limit: first N examples of each task
        speed: measure speed and memory
        new_tokens: decode tokens timed per run
        speed_repeats: timed runs after a warm-up; the median is reported
        overwrite: replace an existing report directory
        save_models: keep each compressed model under OUT/models/
        overrides: recipe argument overrides, "Stage.field=value", applied to every recipe with that stage
    """
    from slimformer.report import write_report

    if out is not None:
        check_output_dir(Path(out), overwrite)
    task_dir = resolve_task_data(task_data) if tasks else None
    recipes = override_each([_recipe(r) for r in recipes], overrides)
    for recipe in recipes:
        _recipe_dir(Path(out or "."), recipe.name)   # a name that is a path fails now, not after an hour
    base, tokenizer, source = _model_and_tokenizer(model, source_name)
    _check_decoder(base, "compare")
    text = load_text(data, role="eval")
    wins = eval_windows(tokenize(text, tokenizer), seqlen, windows)
    calib = calib or (data if data in ("pydoc", "wikitext2") else None)

    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="slimformer-compare-") as scratch, \
            _output_dir(out, overwrite) as out_tmp:
        say(f"[fp32] measuring {source}")
        row = {"name": "fp32", "recipe": None, **perplexity(base, wins, progress=progress, desc="fp32")}
        row["stored_bytes"] = cost.in_memory_bytes(base)
        if speed:
            row.update(_speed(source, new_tokens, speed_repeats))
        if tasks:
            row["tasks"] = evaluate_task_list(base, tokenizer, tasks, task_dir, limit, progress)
        rows.append(row)
        for recipe in recipes:
            say(f"[{recipe.name}] compressing")
            model_dir = _recipe_dir(out_tmp / "models" if save_models and out_tmp else Path(scratch), recipe.name)
            result = compress((base, tokenizer), recipe, model_dir, calib=calib, calib_samples=calib_samples,
                              seqlen=seqlen, overwrite=True, progress=progress, source_name=source)
            say(f"[{recipe.name}] measuring")
            row = {"name": recipe.name, "recipe": recipe.text, "compress_seconds": result.run.seconds,
                   "fallbacks": result.run.fallbacks,
                   **perplexity(result.model, wins, reference=base, progress=progress, desc=recipe.name)}
            row["stored_bytes"] = result.stored_bytes
            saved = _table_bytes_saved(result.run.layers)
            if saved:
                row["embedding_bytes_saved"] = saved
            if speed:
                row.update(_speed(str(model_dir), new_tokens, speed_repeats))
            if tasks:
                row["tasks"] = evaluate_task_list(result.model, tokenizer, tasks, task_dir, limit, progress)
            rows.append(row)
            del result
        if out_tmp is not None:
            write_report(rows, out_tmp, run_meta(source, text.describe(), seqlen, len(wins)))
    return rows


def _recipe_dir(base: Path, name: str) -> Path:
    """``base/name`` for a recipe's model: the name must be a plain name and the path must
    stay inside ``base`` (the compress step replaces it with overwrite=True)."""
    from slimformer.recipes.schema import check_recipe_name

    check_recipe_name(name)
    path = (base / name).resolve()
    if path.parent != base.resolve():
        raise RecipeError(f"recipe name {name!r} leads outside {base}")
    return path


@contextlib.contextmanager
def _output_dir(out, overwrite: bool):
    """The whole output directory appears at once, or not at all."""
    if out is None:
        yield None
        return
    with atomic_directory(out, overwrite) as tmp:
        yield tmp


def _speed(source: str, new_tokens: int, repeats: int) -> dict:
    measured = cost.measure_in_subprocess(source, new_tokens=new_tokens, repeats=repeats,
                                          threads=torch.get_num_threads())
    keep = ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_latency_ms", "peak_rss_bytes", "engine")
    return {k: measured.get(k) for k in keep}


@dataclass
class TrainOutcome:
    model: torch.nn.Module
    tokenizer: object
    recipe: Recipe
    result: "TrainResult"
    out: Path
    sparsity: dict | None = None


def train(model, recipe, data: str, out, *, steps: int | None = None, batch_size: int | None = None,
          seq_len: int | None = None, lr: float | None = None, grad_accum: int | None = None,
          warmup_steps: int | None = None, save_every: int | None = None, teacher=None,
          resume: bool = False, overwrite: bool = False, progress: bool = True,
          source_name: str | None = None, overrides=()) -> TrainOutcome:
    """Train ``model`` with ``recipe`` on ``data`` (its calibration half for built-in sources:
    never the evaluation text) and write the result to ``out``.

    The recipe's stages run in order (:func:`slimformer.core.runner.run_recipe`): one-shot
    stages (e.g. Magnitude) before training, the training stages' hooks and loss terms
    during it, later one-shot stages after it. The loss is the recipe's ``train: loss``
    terms (``causal_lm``, ``distill``: the dense model before any stage teaches, unless
    ``teacher`` is given) plus those the stages add. Checkpoints go to
    ``out/checkpoint-<step>`` every ``save_every`` steps; ``resume`` continues from the
    newest one (refused if it belongs to another model or recipe). The trained model is
    written into ``out`` with its ``slimformer.json`` last.

    Parameters:
        recipe: built-in recipe name or a YAML file with training stages
        data: training DATA: pydoc (its calibration half), a text/JSONL file or directory, or
            teacher:N (data-free: N sequences of seq_len tokens sampled from the teacher, cached)
        out: output directory (the trained model; checkpoints in OUT/checkpoint-N)
        steps: optimiser steps (default: the recipe's, else 100)
        batch_size: sequences per micro-batch (default: the recipe's, else 4)
        seq_len: tokens per sequence (default: the recipe's, else 512)
        lr: peak learning rate (default: the recipe's, else 1e-4)
        grad_accum: micro-batches per step (default: the recipe's, else 1)
        warmup_steps: linear warm-up steps (default: the recipe's, else 0)
        save_every: write a checkpoint every N steps (default: only the final model)
        resume: continue from the newest checkpoint in OUT
        overwrite: replace an existing output directory
        overrides: recipe argument overrides, "Stage.field=value" (e.g. GMP.final_sparsity=0.6)
    """
    from slimformer.errors import OutputExistsError, TrainingError
    from slimformer.models.hf import COMPRESSED_MARKER
    from slimformer.train.loop import (
        TokenBatches,
        TrainConfig,
        list_checkpoints,
        run_fingerprint,
    )
    from slimformer.train.teacher_data import TeacherTextSettings, parse_teacher_data, teacher_text
    from slimformer.util.atomic import publish_into

    recipe = _recipe(recipe, overrides)
    config = TrainConfig.parse(recipe.train, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                               grad_accum=grad_accum, warmup_steps=warmup_steps, save_every=save_every)
    out = Path(out)
    if out.exists() and not (resume or overwrite):
        raise OutputExistsError(f"output directory {out} exists; pass --resume to continue it or --overwrite to replace it")
    if not any(stage.requires() is Needs.TRAINING for stage in recipe.stages):
        raise TrainingError(f"recipe {recipe.name} has no training stage (e.g. QAT, FineTune, MaskedFineTune, GMP, STE, TopKAST)")
    try:
        recipe_segments(recipe.stages)
    except RecipeError as exc:
        raise TrainingError(f"recipe {recipe.name}: {exc}") from None

    base, tokenizer, source = _model_and_tokenizer(model, source_name)
    if getattr(base, "slimformer_meta", None):
        raise TrainingError(f"{source} is a compressed model; train the original model")
    adapter = adapter_for(base)
    for term in config.loss_terms():
        term.check(base)   # e.g. causal_lm on an encoder: refused before any work
    check_targets(recipe.stages, base, adapter)
    target = copy.deepcopy(base) if isinstance(model, (tuple, list)) else base
    if teacher is not None:
        teacher = _model_and_tokenizer(teacher)[0].eval()
    sampled = parse_teacher_data(data)
    if sampled is not None:
        if not adapter.is_decoder:
            raise DataError("data teacher:N samples text from a decoder; this model is an encoder")
        settings = TeacherTextSettings(sampled, config.seq_len, seed=config.seed)
        ids, data_meta = teacher_text(teacher if teacher is not None else target, tokenizer, settings, progress)
        tokens = ids.flatten()
        calib = lambda: ids[:128]  # noqa: E731
    else:
        text = load_text(data, role="calib")
        tokens, data_meta = tokenize(text, tokenizer), text.describe()
        calib = lambda: calibration_set(tokenizer, data, 128, config.seq_len, None)[0]  # noqa: E731
    # An encoder reads windows as sentences: [CLS] text [SEP].
    wrap = None if adapter.is_decoder else (tokenizer.cls_token_id, tokenizer.sep_token_id)
    if wrap is not None and None in wrap:
        raise DataError("training an encoder needs a tokenizer with [CLS] and [SEP] tokens")
    batches = TokenBatches(tokens, config.batch_size, config.seq_len, config.seed, wrap=wrap)
    if overwrite and not resume:
        for old in list_checkpoints(out):
            shutil.rmtree(old)

    training = TrainingRun(config, batches, teacher=teacher, checkpoint_dir=out, resume=resume,
                           fingerprint=run_fingerprint(target, recipe.text or recipe.name, source))
    run = run_recipe(target, recipe.stages, train=training, progress=progress, calib=calib)
    result = run.training
    summary = recipe_summary(target, recipe.stages)
    sparsity = summary.get("sparsity")
    extra = {"training": {"config": dataclasses.asdict(config), "data": data_meta,
                          "loss_terms": [t.describe() for t in config.loss_terms()],
                          "steps": result.steps, "seconds": result.seconds, "resumed_from": result.resumed_from,
                          "epochs": result.epochs, "memory_bytes": result.memory, "warnings": result.warnings,
                          "final_loss": result.history[-1]["loss"] if result.history else None,
                          "history": result.history},
             "sparsity": sparsity}
    if summary.get("layer_map") is not None:
        extra["layer_map"] = summary["layer_map"]
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=out))
    save_compressed(target, tokenizer, tmp, recipe_text=recipe.text or recipe.name, source=source,
                    extra=extra, overwrite=True)
    publish_into(tmp, out, last=COMPRESSED_MARKER)
    return TrainOutcome(target, tokenizer, recipe, result, out, sparsity)


def study_w8a8(model, data: str = "pydoc", *, seqlen: int = 512, windows: int = 8, progress: bool = True,
               source_name: str | None = None) -> dict:
    """W8A32 vs W32A8 vs W8A8 on ``data``: weights by RTN 8-bit per output channel,
    activations 8-bit dynamic per tensor and per token (see :mod:`slimformer.eval.study`).

    Parameters:
        data: evaluation DATA
        seqlen: window length
        windows: number of windows
    """
    from slimformer.eval.study import study_w8a8 as run_study
    from slimformer.techniques.quant.rtn import RTN

    loaded, tokenizer, _ = _model_and_tokenizer(model, source_name)

    def rtn_w8(m):
        run_transforms(m, [RTN(bits=8, granularity="channel")], progress=False)

    return run_study(loaded, tokenizer, data, rtn_w8, seqlen=seqlen, windows=windows, progress=progress)


def override_each(recipes: list[Recipe], overrides) -> list[Recipe]:
    """``overrides`` applied to every recipe that has the stage; one no recipe has is an error."""
    if not overrides:
        return recipes
    from slimformer.recipes.schema import parse_override, recipe_has_stage

    for item in overrides:
        text = item[1] if isinstance(item, (tuple, list)) else item
        stage = parse_override(text)[0]
        if not any(recipe_has_stage(r, stage) for r in recipes):
            apply_overrides(recipes[0], [item])   # raises: unknown technique, or no such stage
    return [apply_overrides(r, overrides, missing="skip") for r in recipes]


class Generations(list):
    """The generations (:class:`slimformer.runtime.generate.Generation`), one per prompt;
    ``engine`` says which engine made them."""

    engine: str = ""


def generate(model, prompts, *, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, stop=(), ignore_eos: bool = False,
             truncate: bool = False, chat: bool = False, stream: bool = False, engine: str = "auto",
             weights: str = "auto", activations: str = "fp32", memory_budget: str | None = None,
             tensor_parallel: int = 1, trust_pickle: bool = False):
    """Generate text from ``prompts`` (a string or a list) with ``model`` (a source or a
    ``(model, tokenizer)`` pair). Returns :class:`Generations`; with ``stream``, an iterator
    over the text pieces of one prompt as they are generated.

    Parameters:
        prompts: prompt text; repeat the flag for a batch
        max_new_tokens: tokens to generate at most
        temperature: 0 = greedy
        top_k: keep the k most likely tokens (0 = off)
        top_p: nucleus sampling mass (1 = off)
        seed: seed for sampling
        stop: stop string (repeatable)
        ignore_eos: keep generating past end-of-sequence tokens
        truncate: drop the start of a prompt longer than the context
        chat: wrap each prompt in the tokenizer's chat template
        stream: print text as it is generated (one prompt)
        engine: native (Llama family), hf, or auto
        weights: for a .gguf model: run its quantised blocks (auto, gguf) or fp32 (dequantized)
        activations: native decode of int4/int8 weights: fp32 activations (exact) or int8 (llama.cpp-style, faster)
        memory_budget: stream blocks from a safetensors directory under this budget, e.g. 300MB (offloading)
        tensor_parallel: split the layers over N processes (torch.distributed; greedy, one prompt)
        trust_pickle: allow pickle-only checkpoints (runs code from the file)
    """
    from slimformer.errors import SlimformerError
    from slimformer.runtime.generate import Generator, SamplingConfig

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                    ignore_eos=ignore_eos, stop=tuple([stop] if isinstance(stop, str) else stop), truncate=truncate)
    SamplingConfig(**sampling)  # bad values fail before the model loads
    if stream and len(prompts) > 1:
        raise SlimformerError("--stream takes one --prompt")
    if tensor_parallel > 1:
        if memory_budget:
            raise SlimformerError("--memory-budget and --tensor-parallel do not combine")
        return _generate_tensor_parallel(model, prompts, sampling, chat, stream, tensor_parallel, trust_pickle)
    if memory_budget:
        gen = _offloaded_generator(model, memory_budget, engine)
    elif isinstance(model, (tuple, list)):
        gen = Generator.from_model(model[0], model[1], engine=engine, activations=activations)
    else:
        gen = Generator.from_source(model, engine=engine, weights=weights, trust_pickle=trust_pickle,
                                    activations=activations)
    if chat:
        prompts = [_chat(gen.tokenizer, p) for p in prompts]
    if stream:
        return gen.stream(prompts[0], **sampling)
    found = Generations(gen.generate(prompts, **sampling))
    found.engine = gen.engine_name
    return found


def _chat(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def _offloaded_generator(source, memory_budget: str, engine: str):
    """Blocks streamed from memory-mapped safetensors under a budget (runtime.offload);
    the model runs on the Hugging Face engine, block by block."""
    from slimformer.errors import SlimformerError
    from slimformer.runtime.generate import Generator
    from slimformer.runtime.offload import load_offloaded, parse_bytes

    budget = parse_bytes(memory_budget)
    if isinstance(source, (tuple, list)) or not Path(source).is_dir():
        raise SlimformerError("--memory-budget streams weights from a safetensors directory (a `slimformer compress` "
                              f"output, an HF directory, or one written by runtime.offload.save_offloadable), not {source}")
    if engine == "native":
        raise SlimformerError("--memory-budget runs on the hf engine (the native decoder keeps every weight resident)")
    model, tokenizer = load_offloaded(source, budget)
    return Generator.from_model(model, tokenizer, engine="hf")


def _generate_tensor_parallel(source, prompts, sampling, chat, stream, world, trust_pickle):
    """Greedy generation with the layers split over processes (runtime.parallel)."""
    from slimformer.errors import SlimformerError
    from slimformer.runtime.generate import Generation, stop_token_ids
    from slimformer.runtime.parallel import plan_tensor_parallel, tp_generate_greedy

    if sampling["temperature"] or len(prompts) > 1 or stream or isinstance(source, (tuple, list)):
        raise SlimformerError("--tensor-parallel runs greedy decoding of one --prompt (no --temperature, --stream) "
                              "from a model path")
    model, tokenizer = load(source, trust_pickle=trust_pickle)
    plan_tensor_parallel(model, world)  # a size that does not divide heads or rows fails here
    prompt = _chat(tokenizer, prompts[0]) if chat else prompts[0]
    ids = torch.tensor([tokenizer(prompt).input_ids])
    out = tp_generate_greedy(source, ids, sampling["max_new_tokens"], world)[0, ids.shape[1]:].tolist()
    eos = stop_token_ids(model, tokenizer)
    full = len(out)
    if not sampling["ignore_eos"]:
        out = out[: next((i for i, t in enumerate(out) if t in eos), len(out))]
    found = Generations([Generation(prompts[0], tokenizer.decode(out, skip_special_tokens=False), out,
                                    int(ids.shape[1]), "eos" if len(out) < full else "length")])
    found.engine = f"hf, tensor-parallel x{world}"
    return found


def export(model, out, format: str = "compressed", *, overwrite: bool = False, requantize: bool = False,
           outtype: str | None = None, trust_pickle: bool = False, **options) -> Path:
    """Write ``model`` (a source or a ``(model, tokenizer)`` pair) to ``out`` with the
    exporter called ``format`` (see :func:`slimformer.export.exporters`).

    Parameters:
        out: output directory (a file for gguf)
        format: the exporter
        overwrite: replace an existing output
        requantize: requantise layers whose codes the format cannot hold exactly (default: refuse)
        outtype: type of the layers that are not quantised (gguf: f32, f16, q8_0, q4_0, q4_1; hf: float32, float16, bfloat16)
        trust_pickle: allow pickle-only checkpoints (runs code from the file)
    """
    from slimformer.export import check_options, export_model

    if requantize:
        options["requantize"] = True
    if outtype is not None:
        options["outtype"] = outtype
    check_options(format, options)   # an unknown format or option fails before the model loads
    check_output_dir(Path(out), overwrite)
    loaded, tokenizer = model if isinstance(model, (tuple, list)) else load(model, trust_pickle=trust_pickle)
    return export_model(loaded, tokenizer, out, format, overwrite=overwrite, **options)


def inspect(model, *, outliers: bool = False, calib: str = "pydoc", calib_samples: int = 8, seqlen: int = 512,
            kv_plan: bool = False, batch: int = 1, context: int = 2048, kv_bytes: float = 2.0,
            progress: bool = True, trust_pickle: bool = False) -> dict:
    """What ``model`` is (family, sizes), and optionally its activation outliers on
    calibration data and the memory plan of its weights and KV cache.

    Parameters:
        outliers: per-layer activation outlier statistics on calibration data
        calib: DATA for --outliers
        calib_samples: calibration sequences for --outliers
        seqlen: calibration sequence length
        kv_plan: weights + KV-cache memory for --batch and --context
        batch: sequences decoded together, for --kv-plan
        context: tokens per sequence, for --kv-plan
        kv_bytes: bytes per cached key/value element
        trust_pickle: allow pickle-only checkpoints (runs code from the file)
    """
    from slimformer.eval.inspect import inspect_model

    loaded, tokenizer = model if isinstance(model, (tuple, list)) else load(model, trust_pickle=trust_pickle)
    return inspect_model(loaded, tokenizer, outliers=outliers, calib=calib, calib_samples=calib_samples,
                         seqlen=seqlen, kv_plan=kv_plan, batch=batch, context=context, kv_bytes=kv_bytes,
                         progress=progress)


def bench(model, *, decode: bool = True, prefill: bool = True, vs=(), new_tokens: int = 128,
          prompt_len: int = 512, repeats: int = 3, activations: str = "fp32", head: str = "model",
          progress: bool = True, trust_pickle: bool = False) -> dict:
    """Decode and prefill tokens/s of the native runtime on ``model`` (a source), next to
    the engines in ``vs`` (hf, llama.cpp), with the memory-bandwidth roofline.

    Parameters:
        vs: comma-separated: hf, llama.cpp (llama.cpp needs a .gguf)
        new_tokens: decode tokens per timed run
        prompt_len: prefill prompt length
        repeats: timed rounds after a warm-up
        activations: decode arithmetic for quantised weights: fp32 (exact) or int8 (llama.cpp-style)
        head: LM head as stored, or rounded to int8
        trust_pickle: allow pickle-only checkpoints (runs code from the file)
    """
    from slimformer.errors import SlimformerError
    from slimformer.runtime import bench as bench_lib
    from slimformer.runtime.decoder import NativeDecoder, gguf_source_path

    unknown = [v for v in vs if v not in bench_lib.COMPETITORS]
    if unknown:
        raise SlimformerError(f"unknown engine '{unknown[0]}' (choose from {', '.join(bench_lib.COMPETITORS)})")
    gguf = gguf_source_path(model)
    if "llama.cpp" in vs and gguf is None:
        raise SlimformerError("--vs llama.cpp needs a .gguf model (llama.cpp runs GGUF files only)")
    threads = torch.get_num_threads()
    loaded, tokenizer = load(model, trust_pickle=trust_pickle)
    decoder = NativeDecoder.from_model(loaded, gguf_path=gguf, activations=activations, head=head)
    engines = [bench_lib.native_timed("slimformer", decoder)]
    if "hf" in vs:
        engines.append(bench_lib.hf_timed(loaded))
    if "llama.cpp" in vs:
        engines.append(bench_lib.llama_cpp_timed(str(gguf), threads, context=prompt_len + new_tokens + 8))
    prompt = tokenizer("The capital of France is").input_ids
    long_prompt = bench_lib.prompt_of_length(tokenizer, prompt_len) if prefill else None
    results = bench_lib.run_benchmark(engines, prompt, long_prompt, new_tokens, repeats, decode, progress=progress)
    bandwidth = bench_lib.stream_bandwidth() if decode else None
    if bandwidth:
        bench_lib.add_roofline(results, bandwidth)
    return {"model": str(model), "threads": threads, "bandwidth_bytes_s": bandwidth, "new_tokens": new_tokens,
            "prompt_len": prompt_len, "results": results}
