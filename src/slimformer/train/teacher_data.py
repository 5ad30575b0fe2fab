"""Data-free distillation (LLM-QAT, Liu et al. 2023): training text sampled from the
teacher itself instead of a data set.

Each sequence starts from the model's BOS token: its first token is sampled from the
teacher's next-token distribution, the next ``greedy`` tokens are its top-1 choices (LLM-QAT
found a few deterministic tokens then sampling gives text both fluent and diverse), the
rest are sampled at ``temperature`` (no top-k / top-p) until ``seq_len`` tokens. Generation
uses transformers' ``generate`` with the model's KV cache, ``batch_size`` sequences at a
time, with a progress bar in tokens.

The ids are cached (safetensors, written atomically) under
``<cache>/teacher_text/<key>.safetensors``, the key a hash of the model (config and
weights) and the settings, so a second run with the same teacher reads them back.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from slimformer.errors import DataError, TrainingError
from slimformer.util.atomic import atomic_file
from slimformer.util.cache import cache_root

PREFIX = "teacher"


@dataclass(frozen=True)
class TeacherTextSettings:
    sequences: int
    seq_len: int
    greedy: int = 3            # top-1 tokens after the first sampled one
    temperature: float = 1.0
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.sequences < 1 or self.seq_len < self.greedy + 2:
            raise DataError(f"teacher text: need at least one sequence of more than {self.greedy + 1} tokens, "
                            f"got {self.sequences} × {self.seq_len}")
        if not self.temperature > 0:
            raise DataError(f"teacher text: temperature must be positive, got {self.temperature!r}")


def parse_teacher_data(data: str) -> int | None:
    """``teacher:N`` → N (sequences to sample); None when ``data`` names another source."""
    if not isinstance(data, str) or not (data == PREFIX or data.startswith(PREFIX + ":")):
        return None
    count = data[len(PREFIX) + 1:] if ":" in data else ""
    if not count.isdigit() or int(count) < 1:
        raise DataError(f"data {data!r}: say how many sequences to sample from the teacher, e.g. teacher:256")
    return int(count)


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the config and every weight (the same teacher gives the same key)."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def cache_path(model: nn.Module, settings: TeacherTextSettings) -> Path:
    key = hashlib.sha256(json.dumps({"model": model_fingerprint(model), **asdict(settings)},
                                    sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / "teacher_text" / f"{key}.safetensors"


def _start_token(model: nn.Module, tokenizer) -> int:
    for value in (getattr(tokenizer, "bos_token_id", None), getattr(model.config, "bos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    raise TrainingError("teacher text: the model has no BOS (or EOS) token to start sequences from")


class _Progress:
    """A logits processor that only advances the progress bar: ``per_step`` tokens (the
    batch's sequences) per generated position."""

    def __init__(self, bar, per_step: int):
        self.bar, self.per_step = bar, per_step

    def __call__(self, input_ids, scores):
        self.bar.update(self.per_step)
        return scores


@torch.no_grad()
def sample_teacher_text(model: nn.Module, tokenizer, settings: TeacherTextSettings,
                        progress: bool = True) -> torch.Tensor:
    """``[sequences, seq_len]`` token ids sampled from ``model`` (see the module docstring)."""
    from transformers import LogitsProcessorList

    if not getattr(model.config, "is_decoder", True) or not hasattr(model, "generate"):
        raise TrainingError("teacher text needs a decoder language model that can generate")
    start = _start_token(model, tokenizer)
    eos = getattr(model.config, "eos_token_id", None) or getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if isinstance(pad, int) else (eos if isinstance(eos, int) else start)
    s = settings
    was_training = model.training
    model.eval()
    out = []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(s.seed)
    try:
        with tqdm(total=s.sequences * (s.seq_len - 1), desc="sampling teacher text", unit="tok",
                  disable=not progress, leave=False) as bar:
            for first in range(0, s.sequences, s.batch_size):
                n = min(s.batch_size, s.sequences - first)
                ids = torch.full((n, 1), start, dtype=torch.long)
                tick = LogitsProcessorList([_Progress(bar, n)])
                common = dict(pad_token_id=pad, logits_processor=tick, top_k=None, top_p=None,
                              use_cache=True, return_dict_in_generate=False)
                phases = ((1, True), (s.greedy, False), (s.seq_len - 2 - s.greedy, True))
                for length, sample in phases:
                    if length <= 0:
                        continue
                    ids = model.generate(
                        ids, attention_mask=torch.ones_like(ids), max_new_tokens=length, min_new_tokens=length,
                        do_sample=sample, temperature=s.temperature if sample else None, **common)
                out.append(ids)
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    ids = torch.cat(out)
    if ids.shape != (s.sequences, s.seq_len):
        raise TrainingError(f"teacher text: generation returned {tuple(ids.shape)}, expected "
                            f"{(s.sequences, s.seq_len)}")
    return ids


def teacher_text(model: nn.Module, tokenizer, settings: TeacherTextSettings, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """The sampled ids (from the cache when this teacher and these settings made them
    before) and a JSON description for the training record."""
    path = cache_path(model, settings)
    ids, cached = None, False
    if path.is_file():
        try:
            ids = load_file(str(path))["ids"].long()
            cached = ids.shape == (settings.sequences, settings.seq_len)
        except Exception:   # a damaged entry is sampled again
            ids = None
        if not cached:
            ids = None
    if ids is None:
        ids = sample_teacher_text(model, tokenizer, settings, progress)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path, overwrite=True) as tmp:
                save_file({"ids": ids.to(torch.int32).contiguous()}, str(tmp),
                          metadata={"settings": json.dumps(asdict(settings))})
        except OSError:
            pass   # a read-only cache still trains, it just samples again next time
    meta = {"source": f"{PREFIX}:{settings.sequences}", "kind": "teacher-sampled (data-free)",
            "settings": asdict(settings), "tokens": int(ids.numel()), "cache": str(path), "from_cache": cached}
    return ids, meta
