"""Sentence-embedding quality for encoder models (BERT family).

Embeddings are made the sentence-transformers way for all-MiniLM-L6-v2: mean of
the last hidden states over real (attention-mask) tokens, then L2
normalisation. Two checks are offered:

* :func:`embedding_cosine` - how close a compressed model's embeddings stay to
  the reference model's, sentence by sentence;
* :func:`stsb_spearman` - STS Benchmark: Spearman correlation between the
  cosine similarity of each sentence pair and the human 0-5 score.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from slimformer.errors import DataError


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def encode(
    model,
    tokenizer,
    sentences: Sequence[str],
    batch_size: int = 64,
    max_length: int = 256,
) -> torch.Tensor:
    """``[n, d]`` float32 embeddings: masked mean pooling, then L2 normalisation."""
    device = _model_device(model)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.inference_mode():
            for start in range(0, len(sentences), max(1, batch_size)):
                batch = list(sentences[start : start + max(1, batch_size)])
                enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                enc = {k: v.to(device) for k, v in enc.items()}
                hidden = model(**enc).last_hidden_state.float()  # [b, t, d]
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, t, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                chunks.append(F.normalize(pooled, p=2, dim=1).cpu())
    finally:
        model.train(was_training)
    if not chunks:
        hidden_size = getattr(getattr(model, "config", None), "hidden_size", 0)
        return torch.zeros(0, hidden_size)
    return torch.cat(chunks)


def embedding_cosine(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Per-sentence cosine between two models' embeddings: ``{"mean", "min"}``."""
    if reference.shape != candidate.shape or reference.ndim != 2 or len(reference) == 0:
        raise ValueError(f"need two non-empty [n, d] tensors of one shape, got {tuple(reference.shape)} "
                         f"and {tuple(candidate.shape)}")
    cos = F.cosine_similarity(reference.float(), candidate.float(), dim=1)
    return {"mean": cos.mean().item(), "min": cos.min().item()}


def load_stsb(data_dir: str | Path, split: str = "test", limit: int | None = None) -> list[tuple[str, str, float]]:
    """``(sentence1, sentence2, score)`` rows of ``data_dir/stsb/sts-{split}.csv``.

    The files are tab-separated with stray quotes, so lines are split on tabs
    (no CSV quoting). Fields: genre, file, year, id, score, sentence1, sentence2[, licence].
    """
    path = Path(data_dir) / "stsb" / f"sts-{split}.csv"
    if not path.is_file():
        raise DataError(f"STS-B split {split!r}: data file not found, expected {path}")
    rows = []
    with path.open(encoding="utf-8", newline="") as fh:
        for lineno, fields in enumerate(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if limit is not None and len(rows) >= limit:
                break
            if not fields or not "".join(fields).strip():
                continue
            try:
                rows.append((fields[5], fields[6], float(fields[4])))
            except (IndexError, ValueError):
                raise DataError(f"STS-B: malformed line {lineno} in {path}") from None
    if not rows:
        raise DataError(f"STS-B split {split!r}: data file is empty: {path}")
    return rows


def stsb_spearman(
    model,
    tokenizer,
    data_dir: str | Path,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 64,
) -> dict:
    """STS-B Spearman (cosine of the pair's embeddings vs gold score): ``{"spearman", "n"}``."""
    rows = load_stsb(data_dir, split, limit)
    first = encode(model, tokenizer, [a for a, _, _ in rows], batch_size)
    second = encode(model, tokenizer, [b for _, b, _ in rows], batch_size)
    cosine = (first * second).sum(1)  # both are unit length
    rho = spearmanr(cosine.numpy(), [s for _, _, s in rows]).statistic
    return {"spearman": float(rho), "n": len(rows)}
