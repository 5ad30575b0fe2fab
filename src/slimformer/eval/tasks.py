"""Zero-shot log-likelihood tasks, scored the way lm-evaluation-harness scores them.

Every task becomes a list of :class:`Example`. An example holds one
``(context, continuation)`` request per answer choice; the model scores each
request by the summed log-probability of the continuation tokens given the
context, and the choice with the highest score is the prediction.

Details that follow lm-evaluation-harness (0.4.x) exactly:

* prompts and the ``" "`` target delimiter of each task's YAML config;
* tokenisation: ``context + continuation`` and ``context`` are encoded separately
  with the tokenizer's default special tokens, and the continuation tokens are
  the tail of the whole encoding past ``len(context tokens)``; trailing spaces of
  the context are moved onto the continuation first;
* an empty context is replaced by the BOS token (EOS when there is none);
* too-long inputs keep their last ``max_length + 1`` tokens (left truncation);
* ``acc_norm`` divides each choice's log-likelihood by the length of the choice
  text *without* the delimiter. lm-eval 0.4.x counts ``len(choice)``, i.e.
  characters; this is the byte length for the ASCII text of these data sets.
  (:data:`NORM_UNIT` documents the choice; :func:`choice_length` implements it.)
"""

from __future__ import annotations

import inspect
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from slimformer.errors import DataError

TASKS = ("lambada", "hellaswag", "piqa", "winogrande", "arc_easy")

# Files each task reads, relative to the data directory (first one is the main file).
TASK_FILES = {
    "lambada": ("lambada_openai/lambada_test.jsonl",),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt",),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "winogrande": ("winogrande/dev.jsonl",),
    "arc_easy": ("arc_easy/ARC-Easy-Test.jsonl",),
}

# Metrics reported per task (besides "n"), as in the lm-eval task configs.
TASK_METRICS = {
    "lambada": ("acc", "perplexity"),
    "hellaswag": ("acc", "acc_norm"),
    "piqa": ("acc", "acc_norm"),
    "winogrande": ("acc",),
    "arc_easy": ("acc", "acc_norm"),
}

NORM_UNIT = "characters of the choice text, delimiter excluded (as lm-eval's acc_norm)"

_DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer say
_TOKENIZER_INFINITY = 10**12  # tokenizers report ~1e30 when they have no limit


@dataclass(frozen=True)
class Example:
    """One task item: a request per choice, the gold index and acc_norm lengths."""

    requests: tuple[tuple[str, str], ...]  # (context, continuation) per choice
    gold: int
    norm_lengths: tuple[float, ...]  # divisor per choice for acc_norm


def choice_length(choice: str) -> float:
    """acc_norm divisor: length of the choice text without the target delimiter."""
    return float(len(choice))


def _mc_example(context: str, choices: Sequence[str], gold: int) -> Example:
    """Shared context, one continuation per choice, joined by a single space."""
    return Example(
        requests=tuple((context, " " + c) for c in choices),
        gold=gold,
        norm_lengths=tuple(choice_length(c) for c in choices),
    )


# ---------------------------------------------------------------- data loading


def _read_text(path: Path, task: str) -> str:
    """Whole task file; DataError if it is missing or blank."""
    if not path.is_file():
        raise DataError(f"task {task!r}: data file not found, expected {path}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"task {task!r}: data file is empty: {path}")
    return text


def _read_lines(path: Path, task: str) -> list[str]:
    """Non-empty lines of a task file."""
    return [ln for ln in _read_text(path, task).splitlines() if ln.strip()]


def _read_jsonl(path: Path, task: str) -> list[dict]:
    rows = []
    for i, line in enumerate(_read_lines(path, task), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"task {task!r}: bad JSON on line {i} of {path}: {exc.msg}") from None
    return rows


def _clean_hellaswag(text: str) -> str:
    """lm-eval's HellaSwag clean-up (WikiHow bracket artefacts, double spaces)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _load_lambada(root: Path, limit: int | None) -> list[Example]:
    rows = _read_jsonl(root / TASK_FILES["lambada"][0], "lambada")[:limit]
    out = []
    for row in rows:
        # lm-eval splits on single spaces: context = all but the last word.
        words = row["text"].split(" ")
        out.append(Example(((" ".join(words[:-1]), " " + words[-1]),), 0, (1.0,)))
    return out


def _load_hellaswag(root: Path, limit: int | None) -> list[Example]:
    path = root / TASK_FILES["hellaswag"][0]
    lines = _read_text(path, "hellaswag").splitlines()
    if len(lines) % 6:
        raise DataError(f"task 'hellaswag': {path} must hold 6 lines per item, has {len(lines)}")
    out = []
    for i in range(0, len(lines), 6):
        if limit is not None and len(out) >= limit:
            break
        # line 1: "activity_label: ctx"; line 2: gold; lines 3-6: endings
        query = _clean_hellaswag(lines[i])
        endings = [_clean_hellaswag(e) for e in lines[i + 2 : i + 6]]
        out.append(_mc_example(query, endings, int(lines[i + 1])))
    return out


def _load_piqa(root: Path, limit: int | None) -> list[Example]:
    docs_path, labels_path = (root / f for f in TASK_FILES["piqa"])
    docs = _read_jsonl(docs_path, "piqa")
    labels = _read_lines(labels_path, "piqa")
    if len(docs) != len(labels):
        raise DataError(f"task 'piqa': {docs_path} has {len(docs)} rows, {labels_path} {len(labels)}")
    return [
        _mc_example(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(lab))
        for d, lab in list(zip(docs, labels))[:limit]
    ]


def _load_winogrande(root: Path, limit: int | None) -> list[Example]:
    rows = _read_jsonl(root / TASK_FILES["winogrande"][0], "winogrande")[:limit]
    out = []
    for row in rows:
        # "Partial" scoring: the option fills the blank inside the *context*; the
        # shared text after the blank is the continuation that gets scored.
        sentence = row["sentence"]
        blank = sentence.index("_")
        suffix = " " + sentence[blank + 1 :].strip()
        options = (row["option1"], row["option2"])
        requests = tuple((sentence[:blank] + opt, suffix) for opt in options)
        out.append(Example(requests, int(row["answer"]) - 1, (1.0, 1.0)))
    return out


def _load_arc_easy(root: Path, limit: int | None) -> list[Example]:
    path = root / TASK_FILES["arc_easy"][0]
    out = []
    for row in _read_jsonl(path, "arc_easy")[:limit]:
        q = row["question"]
        labels = [c["label"] for c in q["choices"]]
        if row["answerKey"] not in labels:  # some rows use 1-4, matched by label
            raise DataError(f"task 'arc_easy': answerKey {row['answerKey']!r} not in {labels} ({row.get('id')}) in {path}")
        texts = [c["text"] for c in q["choices"]]
        out.append(_mc_example(f"Question: {q['stem']}\nAnswer:", texts, labels.index(row["answerKey"])))
    return out


_LOADERS = {
    "lambada": _load_lambada,
    "hellaswag": _load_hellaswag,
    "piqa": _load_piqa,
    "winogrande": _load_winogrande,
    "arc_easy": _load_arc_easy,
}


def load_task(name: str, data_dir: str | Path, limit: int | None = None) -> list[Example]:
    """Examples of task ``name`` from ``data_dir`` (first ``limit`` in file order)."""
    if name not in _LOADERS:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise DataError(f"task {name!r}: limit must be at least 1, got {limit}")
    root = Path(data_dir)
    try:
        examples = _LOADERS[name](root, limit)
    except (KeyError, ValueError, IndexError, TypeError) as exc:  # fields missing or wrong
        raise DataError(f"task {name!r}: malformed data under {root / TASK_FILES[name][0]}: {exc!r}") from None
    if not examples:
        raise DataError(f"task {name!r}: no examples in {root / TASK_FILES[name][0]}")
    return examples


# ---------------------------------------------------------------- tokenisation


def prefix_token_id(tokenizer) -> int:
    """Token that stands in for an empty context: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split the way lm-eval splits them.

    Trailing whitespace of the context moves to the continuation; then the
    whole string and the context are encoded separately (default special
    tokens) and the continuation is whatever the whole has past the context's
    length. Merges across the boundary therefore land in the continuation.
    """
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        if cont and cont[0] == prefix:  # continuation already starts with it
            return cont[:1], cont[1:]
        return [prefix], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


def model_max_length(model, tokenizer) -> int:
    """Context window: config (n_positions / max_position_embeddings / n_ctx), tokenizer, 2048."""
    config = getattr(model, "config", None)
    for cfg in (getattr(config, "text_config", None), config):
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(value, int) and value > 0:
                return value
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < _TOKENIZER_INFINITY:
        return tok_max
    return _DEFAULT_MAX_LENGTH


# ---------------------------------------------------------------- scoring


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _takes_logits_to_keep(model) -> bool:
    """Whether ``model.forward`` accepts ``logits_to_keep`` (recent transformers)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def score_token_pairs(
    model,
    pairs: Sequence[tuple[list[int], list[int]]],
    max_length: int,
    batch_size: int = 8,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), greedy-match) for tokenised pairs.

    Inputs are ``(context + continuation)[-(max_length + 1):][:-1]``; the logits
    at the last ``len(continuation)`` positions predict the continuation.
    Requests are sorted longest first and batched (right padding + attention
    mask), so each batch holds similar lengths; results keep the input order.
    """
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise ValueError("every request needs at least one context and one continuation token")
        if len(cont) > max_length:
            raise ValueError(f"continuation of {len(cont)} tokens is longer than the model's {max_length}")
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(pairs), disable=not progress, desc="scoring", unit="req") as bar:
            for start in range(0, len(order), max(1, batch_size)):
                idx = order[start : start + max(1, batch_size)]
                inputs = [(pairs[i][0] + pairs[i][1])[-(max_length + 1) :][:-1] for i in idx]
                width = max(len(x) for x in inputs)
                ids = torch.zeros(len(idx), width, dtype=torch.long)
                mask = torch.zeros(len(idx), width, dtype=torch.long)
                for row, x in enumerate(inputs):
                    ids[row, : len(x)] = torch.tensor(x)
                    mask[row, : len(x)] = 1
                # Only the last `keep` positions hold any row's continuation; models
                # that support it skip the vocabulary projection for the rest.
                keep = width - min(len(x) - len(pairs[i][1]) for x, i in zip(inputs, idx))
                extra = {"logits_to_keep": keep} if _takes_logits_to_keep(model) else {}
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **extra).logits
                offset = width - logits.shape[1]  # 0 when all positions came back
                for row, i in enumerate(idx):
                    cont = pairs[i][1]
                    end = len(inputs[row]) - offset
                    # positions end-len(cont) .. end-1 predict the continuation tokens
                    logp = torch.log_softmax(logits[row, end - len(cont) : end].float(), dim=-1)
                    target = torch.tensor(cont, device=logp.device)
                    ll = logp.gather(1, target[:, None]).sum().item()
                    greedy = bool((logp.argmax(-1) == target).all())
                    results[i] = (ll, greedy)
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def loglikelihoods(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """lm-eval style ``loglikelihood`` on (context, continuation) strings."""
    pairs = [encode_pair(tokenizer, ctx, cont) for ctx, cont in requests]
    return score_token_pairs(model, pairs, model_max_length(model, tokenizer), batch_size, progress)


def _argmax(values: Sequence[float]) -> int:
    """Index of the first maximum (numpy.argmax tie-breaking)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_examples(task: str, examples: Sequence[Example], results: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """Aggregate per-request results (flattened in example order) into task metrics."""
    metrics: dict[str, list[float]] = {m: [] for m in TASK_METRICS[task]}
    pos = 0
    for ex in examples:
        res = results[pos : pos + len(ex.requests)]
        pos += len(ex.requests)
        lls = [ll for ll, _ in res]
        if task == "lambada":
            metrics["acc"].append(float(res[0][1]))  # all continuation tokens greedy
            metrics["perplexity"].append(lls[0])
            continue
        metrics["acc"].append(float(_argmax(lls) == ex.gold))
        if "acc_norm" in metrics:
            normed = [ll / n for ll, n in zip(lls, ex.norm_lengths)]
            metrics["acc_norm"].append(float(_argmax(normed) == ex.gold))
    out: dict[str, float] = {}
    for name, values in metrics.items():
        mean = sum(values) / len(values)
        # lm-eval's perplexity: exp(-mean log-likelihood of the target per example)
        out[name] = math.exp(-mean) if name == "perplexity" else mean
    out["n"] = len(examples)
    return out


def evaluate_tasks(
    model,
    tokenizer,
    tasks: Sequence[str],
    data_dir: str | Path,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Zero-shot scores per task, e.g. ``{"piqa": {"acc": .., "acc_norm": .., "n": 100}}``."""
    loaded = {name: load_task(name, data_dir, limit) for name in tasks}  # fail fast on bad data
    max_length = model_max_length(model, tokenizer)
    report = {}
    for name, examples in loaded.items():
        requests = [req for ex in examples for req in ex.requests]
        pairs = [encode_pair(tokenizer, ctx, cont) for ctx, cont in requests]
        if progress:
            tqdm.write(f"{name}: {len(examples)} examples, {len(pairs)} requests")
        results = score_token_pairs(model, pairs, max_length, batch_size, progress)
        report[name] = score_examples(name, examples, results)
    return report
