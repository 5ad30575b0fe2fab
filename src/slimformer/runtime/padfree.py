"""Padding-free ("packed") inference for BERT-family encoders.

A padded batch spends every Linear, LayerNorm and GELU on pad tokens too. Here all
real tokens of a batch are concatenated into one ``[total_tokens, hidden]`` tensor
(with flash-attention-style ``cu_seqlens`` offsets): everything that works token by
token runs once on the packed tensor, and only attention, the one step that mixes
tokens, is done per sequence without padding.

Results equal Hugging Face's padded forward with right padding (positions restart at
0 in every sequence) up to float rounding. One caveat for quantised models: a
``QuantLinear`` with *per-tensor dynamic* activation quantisation takes its scale
from the whole input, so pad tokens change it in the padded path and the two paths
then legitimately differ; per-token activations and weight-only formats agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from slimformer.errors import DataError, UnsupportedArchitectureError
from slimformer.models.adapters import adapter_for

AttentionKind = Literal["loop", "padded", "bucketed"]
ATTENTION_KINDS: tuple[str, ...] = ("loop", "padded", "bucketed")
BUCKET_RATIO = 1.5    # "bucketed": longest / shortest sequence within one attention call
BUCKET_SLACK = 8      # ... or at most this many tokens longer (short sequences)


@dataclass(frozen=True)
class PackedBatch:
    """Real tokens of ``B`` sequences, concatenated (``T`` tokens in all).

    Sequence ``i`` occupies ``input_ids[cu_seqlens[i]:cu_seqlens[i + 1]]``;
    ``position_ids`` restart at 0 in each sequence.
    """

    input_ids: torch.Tensor       # [T] int64
    position_ids: torch.Tensor    # [T] int64
    token_type_ids: torch.Tensor  # [T] int64
    cu_seqlens: torch.Tensor      # [B + 1] int64, cu_seqlens[0] == 0, cu_seqlens[-1] == T
    max_len: int

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def total_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def lengths(self) -> list[int]:
        """Length of each sequence, as Python ints."""
        return self.cu_seqlens.diff().tolist()

    def segment_ids(self) -> torch.Tensor:
        """``[T]``: the index of the sequence each token belongs to."""
        counts = self.cu_seqlens.diff()
        return torch.repeat_interleave(torch.arange(self.batch_size, device=counts.device), counts)

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device),
                           self.token_type_ids.to(device), self.cu_seqlens.to(device), self.max_len)


def _as_id_lists(values: Any, name: str) -> list[list[int]]:
    if isinstance(values, torch.Tensor):
        if values.ndim == 1:
            values = values.unsqueeze(0)
        if values.ndim != 2:
            raise DataError(f"{name}: expected a [batch, length] tensor, got shape {tuple(values.shape)}")
        return values.tolist()
    out = []
    for seq in values:
        out.append(seq.reshape(-1).tolist() if isinstance(seq, torch.Tensor) else [int(t) for t in seq])
    return out


def pack(
    sequences: Sequence[Sequence[int]] | Sequence[torch.Tensor] | Mapping[str, Any],
    token_type_ids: Sequence[Sequence[int]] | None = None,
) -> PackedBatch:
    """Concatenate the real tokens of a batch.

    ``sequences`` is a list of token-id lists (or 1-D tensors), or a tokenizer
    output (``input_ids`` with optional ``attention_mask`` and ``token_type_ids``,
    padded or not; with a mask, only the positions where it is 1 are kept, so right
    or left padding both pack to the same real tokens). Token types default to 0.
    """
    mask_lists = None
    if isinstance(sequences, Mapping):
        if "input_ids" not in sequences:
            raise DataError("tokenizer output has no 'input_ids'")
        ids_lists = _as_id_lists(sequences["input_ids"], "input_ids")
        if sequences.get("attention_mask") is not None:
            mask_lists = _as_id_lists(sequences["attention_mask"], "attention_mask")
        if token_type_ids is None and sequences.get("token_type_ids") is not None:
            token_type_ids = sequences["token_type_ids"]
    else:
        ids_lists = _as_id_lists(sequences, "sequences")
    types_lists = _as_id_lists(token_type_ids, "token_type_ids") if token_type_ids is not None else None

    if not ids_lists:
        raise DataError("empty batch: no sequences to pack")
    for name, other in (("attention_mask", mask_lists), ("token_type_ids", types_lists)):
        if other is not None and [len(s) for s in other] != [len(s) for s in ids_lists]:
            raise DataError(f"{name} does not have the same shape as input_ids")
    if mask_lists is not None:
        keep = [[j for j, m in enumerate(mask) if m] for mask in mask_lists]
        ids_lists = [[seq[j] for j in k] for seq, k in zip(ids_lists, keep)]
        if types_lists is not None:
            types_lists = [[seq[j] for j in k] for seq, k in zip(types_lists, keep)]
    for i, seq in enumerate(ids_lists):
        if not seq:
            raise DataError(f"sequence {i} of the batch is empty (no real tokens)")

    lengths = torch.tensor([len(s) for s in ids_lists], dtype=torch.long)
    cu_seqlens = torch.zeros(len(ids_lists) + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=cu_seqlens[1:])
    total = int(cu_seqlens[-1])
    input_ids = torch.tensor([t for s in ids_lists for t in s], dtype=torch.long)
    starts = torch.repeat_interleave(cu_seqlens[:-1], lengths)
    position_ids = torch.arange(total, dtype=torch.long) - starts
    if types_lists is None:
        types = torch.zeros(total, dtype=torch.long)
    else:
        types = torch.tensor([t for s in types_lists for t in s], dtype=torch.long)
    return PackedBatch(input_ids, position_ids, types, cu_seqlens, int(lengths.max()))


def _base_bert(model: nn.Module) -> nn.Module:
    """The BertModel inside ``model`` (itself, or the body of a BertFor... head model)."""
    adapter = adapter_for(model)   # raises UnsupportedArchitectureError for unknown families
    if adapter.family != "bert":
        raise UnsupportedArchitectureError(
            f"padding-free encoding needs a BERT-family encoder, got family '{adapter.family}'"
        )
    base = getattr(model, "base_model", model)
    config = base.config
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise UnsupportedArchitectureError("padding-free encoding needs a bidirectional encoder, "
                                           "got a BERT configured as a decoder (is_decoder=True)")
    kind = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if kind != "absolute":
        raise UnsupportedArchitectureError(f"padding-free encoding supports absolute position embeddings, "
                                           f"got position_embedding_type '{kind}'")
    if not hasattr(base, "embeddings") or not hasattr(base, "encoder"):
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no BERT embeddings/encoder")
    return base


def _check_fits(base: nn.Module, packed: PackedBatch) -> None:
    config = base.config
    limit = config.max_position_embeddings
    if packed.max_len > limit:
        longest = max(range(packed.batch_size), key=lambda i: packed.lengths[i])
        raise DataError(f"sequence {longest} has {packed.max_len} tokens, more than the model's "
                        f"max_position_embeddings ({limit})")
    if packed.total_tokens:
        lo, hi = int(packed.input_ids.min()), int(packed.input_ids.max())
        if lo < 0 or hi >= config.vocab_size:
            bad = lo if lo < 0 else hi
            raise DataError(f"token id {bad} is outside the model's vocabulary (size {config.vocab_size})")
        types = getattr(config, "type_vocab_size", 2)
        tlo, thi = int(packed.token_type_ids.min()), int(packed.token_type_ids.max())
        if tlo < 0 or thi >= types:
            raise DataError(f"token type id {tlo if tlo < 0 else thi} is outside the model's "
                            f"type_vocab_size ({types})")


@dataclass(frozen=True)
class _Group:
    """Sequences whose attention is computed in one SDPA call.

    A single sequence is a plain slice ``[start, end)`` of the packed tokens; several
    are gathered into a zero-padded ``[n, length, heads, d]`` copy (``tokens``: their
    packed indices, ``seq`` / ``pos``: where each lands), with a key mask unless all
    have the same length.
    """

    start: int
    end: int
    tokens: torch.Tensor | None = None
    seq: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    shape: tuple[int, int] = (1, 0)
    key_mask: torch.Tensor | None = None   # [n, 1, 1, length] bool, True = attend


def _group_of(packed: PackedBatch, members: list[int]) -> _Group:
    bounds = packed.cu_seqlens.tolist()
    if len(members) == 1:
        return _Group(bounds[members[0]], bounds[members[0] + 1])
    device = packed.cu_seqlens.device
    lengths = [bounds[i + 1] - bounds[i] for i in members]
    tokens = torch.cat([torch.arange(bounds[i], bounds[i + 1], device=device) for i in members])
    seq = torch.repeat_interleave(torch.arange(len(members), device=device), torch.tensor(lengths, device=device))
    width = max(lengths)
    mask = None
    if min(lengths) != width:
        mask = (torch.arange(width, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None])
        mask = mask[:, None, None, :]
    return _Group(0, 0, tokens, seq, packed.position_ids[tokens], (len(members), width), mask)


def _plan(packed: PackedBatch, attention: AttentionKind) -> list[_Group]:
    """How the batch's attention is split into SDPA calls (computed once, used by every layer)."""
    lengths = packed.lengths
    if attention == "loop":
        return [_group_of(packed, [i]) for i in range(len(lengths))]
    if attention == "padded":
        return [_group_of(packed, list(range(len(lengths))))]
    # "bucketed": sorted by length, a new bucket once a sequence is more than BUCKET_RATIO
    # times the bucket's shortest - few SDPA calls, little padding inside each.
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    buckets: list[list[int]] = []
    for i in order:
        if buckets and lengths[i] <= max(BUCKET_RATIO * lengths[buckets[-1][0]], lengths[buckets[-1][0]] + BUCKET_SLACK):
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return [_group_of(packed, members) for members in buckets]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: list[_Group], scale: float) -> torch.Tensor:
    """Attention within each sequence. ``q, k, v``: ``[T, heads, d]``; returns ``[T, heads, d]``."""
    out = torch.empty_like(q)
    for g in groups:
        if g.tokens is None:
            s, e = g.start, g.end
            out[s:e] = F.scaled_dot_product_attention(
                q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None], v[s:e].transpose(0, 1)[None], scale=scale
            )[0].transpose(0, 1)
            continue
        padded = []
        for x in (q, k, v):
            buf = x.new_zeros((*g.shape, *x.shape[1:]))
            buf[g.seq, g.pos] = x[g.tokens]
            padded.append(buf.transpose(1, 2))   # [n, heads, length, d]
        o = F.scaled_dot_product_attention(*padded, attn_mask=g.key_mask, scale=scale)
        out[g.tokens] = o.transpose(1, 2)[g.seq, g.pos]
    return out


def padfree_encode(model: nn.Module, packed: PackedBatch, attention: AttentionKind = "loop") -> torch.Tensor:
    """Last hidden states ``[T, hidden]`` of a packed batch (row ``t`` is token ``t`` of ``packed``).

    Embeddings, every Linear (QuantLinear modules included: the model's own modules
    are called), LayerNorm and GELU run on the packed tokens. ``attention`` picks how
    attention is split into SDPA calls: ``"loop"`` (one per sequence, no padding),
    ``"padded"`` (one masked call over a padded copy of q, k, v) or ``"bucketed"``
    (sequences of similar length share a call). Inference only: dropout is skipped,
    as in eval mode.
    """
    base = _base_bert(model)
    if attention not in ATTENTION_KINDS:
        raise DataError(f"unknown attention strategy {attention!r} (choose one of {', '.join(ATTENTION_KINDS)})")
    _check_fits(base, packed)
    emb = base.embeddings
    device = emb.position_embeddings.weight.device   # (word_embeddings may be an int8 QuantEmbedding)
    packed = packed.to(device)

    # Same order of additions as BertEmbeddings.forward: word + type, then + position.
    hidden = emb.word_embeddings(packed.input_ids) + emb.token_type_embeddings(packed.token_type_ids)
    hidden = emb.LayerNorm(hidden + emb.position_embeddings(packed.position_ids))

    groups = _plan(packed, attention)
    total = packed.total_tokens
    for layer in base.encoder.layer:
        attn = layer.attention.self
        heads, d = attn.num_attention_heads, attn.attention_head_size
        q, k, v = (proj(hidden).unflatten(-1, (heads, d)) for proj in (attn.query, attn.key, attn.value))
        ctx = _attend(q, k, v, groups, attn.scaling).view(total, heads * d)
        # BertSelfOutput / BertIntermediate / BertOutput are token-wise: call them on the packed tensor.
        hidden = layer.attention.output(ctx, hidden)
        hidden = layer.output(layer.intermediate(hidden), hidden)
    return hidden


def mean_pool(hidden: torch.Tensor, packed: PackedBatch, normalize: bool = True) -> torch.Tensor:
    """``[B, hidden]`` float32 sentence embeddings from packed hidden states.

    Mean over each sequence's tokens, then L2 normalisation: the pooling of
    :func:`slimformer.eval.embeddings.encode` (sentence-transformers' for all-MiniLM-L6-v2).
    """
    hidden = hidden.float()
    seg = packed.segment_ids().to(hidden.device)
    sums = hidden.new_zeros(packed.batch_size, hidden.shape[-1]).index_add_(0, seg, hidden)
    counts = packed.cu_seqlens.diff().to(hidden.device, hidden.dtype)[:, None]
    pooled = sums / counts.clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=1) if normalize else pooled


def padfree_sentence_embeddings(
    model: nn.Module,
    tokenizer: Callable,
    sentences: Sequence[str],
    batch_size: int = 64,
    max_length: int = 256,
    attention: AttentionKind = "loop",
) -> torch.Tensor:
    """``[n, hidden]`` float32 embeddings of ``sentences``, as
    :func:`slimformer.eval.embeddings.encode` makes them (same truncation, mean pooling,
    L2 normalisation), computed with the padding-free forward."""
    base = _base_bert(model)
    if isinstance(sentences, str):
        raise DataError("sentences must be a list of strings, got a single string")
    if len(sentences) == 0:
        raise DataError("empty batch: no sentences to embed")
    step = max(1, batch_size)
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(sentences), step):
            batch = list(sentences[start:start + step])
            enc = tokenizer(batch, truncation=True, max_length=max_length)
            packed = pack(enc)
            chunks.append(mean_pool(padfree_encode(base, packed, attention), packed).cpu())
    return torch.cat(chunks)


__all__ = ["ATTENTION_KINDS", "AttentionKind", "PackedBatch", "mean_pool", "pack", "padfree_encode", "padfree_sentence_embeddings"]
