"""Tokenise once (cached by content hash), then cut token streams into evaluation
windows or calibration samples."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from slimformer.data.sources import TextSource, load_text
from slimformer.errors import DataError
from slimformer.util.cache import cache_root

_MEMORY_CACHE: dict[str, torch.Tensor] = {}


def cache_dir() -> Path:
    return cache_root() / "tokens"


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    ident = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()[:16]


def tokenize(source: TextSource, tokenizer) -> torch.Tensor:
    """All of ``source`` as one 1-D stream of token ids, no BOS (MEASURING.md).

    Cached in memory and on disk (``.npy``, no pickle) under the text's sha256 and
    the tokenizer's fingerprint."""
    key = f"{source.fingerprint[:32]}-{tokenizer_fingerprint(tokenizer)}"
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    path = cache_dir() / f"{key}.npy"
    ids = None
    if path.exists():
        try:
            ids = torch.from_numpy(np.load(path, allow_pickle=False)).long()
        except (OSError, ValueError, EOFError):
            ids = None  # a damaged cache entry is recomputed (an empty file raises EOFError)
    if ids is None:
        encoded = tokenizer(source.text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        ids = torch.tensor(encoded, dtype=torch.long)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, ids.numpy().astype(np.int32))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home still works, just without the disk cache
    _MEMORY_CACHE[key] = ids
    return ids


def eval_windows(tokens: torch.Tensor, seqlen: int, n: int | None = None, stride: int | None = None) -> list[tuple[torch.Tensor, int]]:
    """Windows for perplexity: ``(ids [seqlen], first scored position)``; position
    ``t >= 1`` is predicted from positions ``< t``.

    Non-overlapping by default (every window scores its ``seqlen - 1`` predicted
    positions). With ``stride < seqlen``: sliding windows that score only the
    tokens not scored before, each with up to ``seqlen - stride`` tokens of context.
    """
    if seqlen < 2:
        raise DataError(f"sequence length must be at least 2, got {seqlen}")
    total = tokens.numel()
    if total < seqlen:
        raise DataError(f"data has {total} tokens, fewer than one window of {seqlen}")
    stride = stride or seqlen
    if not 0 < stride <= seqlen:
        raise DataError(f"stride must be in 1..{seqlen}, got {stride}")
    windows = []
    if stride == seqlen:
        for start in range(0, total - seqlen + 1, seqlen):
            windows.append((tokens[start:start + seqlen], 1))
    else:
        scored_until = 0  # stream positions before this are scored already
        for start in range(0, total - seqlen + 1, stride):
            windows.append((tokens[start:start + seqlen], max(scored_until - start, 1)))
            scored_until = start + seqlen
    if n is not None:
        if len(windows) < n:
            raise DataError(f"data has {total} tokens: only {len(windows)} windows of {seqlen}, {n} requested")
        windows = windows[:n]
    return windows


def calibration_samples(tokens: torch.Tensor, n: int, seqlen: int, seed: int | None = None) -> torch.Tensor:
    """``[n, seqlen]`` token ids: the first ``n`` consecutive windows in order, or, with
    a seed, ``n`` windows at random offsets (reproducible)."""
    total = tokens.numel()
    if n < 1:
        raise DataError(f"need at least one calibration sample, got {n}")
    if seed is None:
        if total < n * seqlen:
            raise DataError(f"calibration data has {total} tokens; {n} samples of {seqlen} need {n * seqlen}")
        return tokens[: n * seqlen].reshape(n, seqlen).clone()
    if total <= seqlen:
        raise DataError(f"calibration data has {total} tokens, fewer than one sample of {seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen, (n,), generator=generator)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def calibration_set(tokenizer, data: str, samples: int, seqlen: int, seed: int | None) -> tuple[torch.Tensor, dict]:
    """``[samples, seqlen]`` calibration ids from DATA, and a description to store with results."""
    source = load_text(data, role="calib")
    ids = calibration_samples(tokenize(source, tokenizer), samples, seqlen, seed)
    return ids, {**source.describe(), "samples": samples, "seqlen": seqlen, "seed": seed}
