"""Tests for slimformer.runtime.padfree: packed (padding-free) BERT forward.

Reference: Hugging Face's own padded forward ``model(input_ids, attention_mask)``
with right padding, keeping the non-pad positions. Tolerance: atol 1e-5 in fp32
(the two paths differ only in summation order inside matmuls / attention).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimformer.core.runner import run_transforms
from slimformer.errors import DataError, UnsupportedArchitectureError
from slimformer.eval.embeddings import encode
from slimformer.models.adapters import adapter_for
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.nn.quant_linear import QuantLinear
from slimformer.runtime.padfree import (
    ATTENTION_KINDS,
    PackedBatch,
    mean_pool,
    pack,
    padfree_encode,
    padfree_sentence_embeddings,
)
from slimformer.techniques.quant.rtn import RTN

ATOL = 1e-5


@pytest.fixture(scope="module")
def bert():
    return tiny_model("bert")


def random_sequences(lengths: list[int], seed: int = 0, vocab: int = 300) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in lengths]


def padded_reference(model, sequences: list[list[int]], token_types: list[list[int]] | None = None) -> torch.Tensor:
    """HF forward on a right-padded batch, non-pad rows concatenated: ``[T, hidden]``."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    types = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        if token_types is not None:
            types[i, : len(seq)] = torch.tensor(token_types[i])
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    return hidden[mask.bool()]


# ---------------------------------------------------------------- packing


def test_pack_offsets_positions_and_ids():
    seqs = [[5, 6, 7], [8], [9, 10]]
    p = pack(seqs)
    assert p.input_ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert p.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert p.position_ids.tolist() == [0, 1, 2, 0, 0, 1]
    assert p.token_type_ids.tolist() == [0] * 6
    assert p.segment_ids().tolist() == [0, 0, 0, 1, 2, 2]
    assert (p.max_len, p.batch_size, p.total_tokens, p.lengths) == (3, 3, 6, [3, 1, 2])


def test_pack_tokenizer_output_drops_padding_on_either_side():
    tok = tiny_tokenizer()
    sentences = ["def f(x): return x", "a", "The quick brown fox jumps over the lazy dog."]
    plain = pack(tok(sentences)["input_ids"])
    for side in ("right", "left"):
        tok.padding_side = side
        try:
            enc = tok(sentences, padding=True, return_tensors="pt")
        finally:
            tok.padding_side = "right"
        p = pack(enc)
        assert torch.equal(p.input_ids, plain.input_ids) and torch.equal(p.cu_seqlens, plain.cu_seqlens)
        assert torch.equal(p.position_ids, plain.position_ids)


# ---------------------------------------------------------------- equality with the padded forward


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
@pytest.mark.parametrize("lengths", [
    [7, 1, 33, 256, 2, 19, 64, 5, 8, 30, 20, 1],   # 256 == max_position_embeddings of the tiny model
    [9, 9, 9],                                      # equal lengths: the padded path needs no mask
], ids=["mixed", "equal"])
def test_packed_equals_padded_hf(bert, attention, lengths):
    seqs = random_sequences(lengths)
    with torch.no_grad():
        out = padfree_encode(bert, pack(seqs), attention=attention)
    assert out.shape == (sum(lengths), bert.config.hidden_size)
    torch.testing.assert_close(out, padded_reference(bert, seqs), atol=ATOL, rtol=0)


def test_single_sequence(bert):
    seqs = random_sequences([23], seed=3)
    with torch.no_grad():
        out = padfree_encode(bert, pack(seqs))
        direct = bert(input_ids=torch.tensor(seqs)).last_hidden_state[0]
    torch.testing.assert_close(out, direct, atol=ATOL, rtol=0)


def test_token_type_ids_are_used(bert):
    seqs = random_sequences([6, 11, 3], seed=5)
    types = [[0] * 3 + [1] * 3, [0] * 4 + [1] * 7, [1, 1, 1]]
    with torch.no_grad():
        out = padfree_encode(bert, pack(seqs, token_type_ids=types))
        zero = padfree_encode(bert, pack(seqs))
    torch.testing.assert_close(out, padded_reference(bert, seqs, types), atol=ATOL, rtol=0)
    assert (out - zero).abs().max() > 1e-3   # the types really change the result


def test_head_model_uses_its_bert_body(bert):
    from transformers import BertForMaskedLM

    torch.manual_seed(1)
    head = BertForMaskedLM(bert.config).eval()
    seqs = random_sequences([4, 9], seed=7)
    with torch.no_grad():
        out = padfree_encode(head, pack(seqs))
    torch.testing.assert_close(out, padded_reference(head.bert, seqs), atol=ATOL, rtol=0)


def test_bucketed_plan_covers_every_token_once_with_bounded_padding():
    from slimformer.runtime.padfree import BUCKET_RATIO, BUCKET_SLACK, _plan

    lengths = [3, 100, 12, 14, 50, 1, 70, 13, 13, 200]
    packed = pack(random_sequences(lengths))
    groups = _plan(packed, "bucketed")
    assert 1 < len(groups) < len(lengths)
    seen = []
    for g in groups:
        if g.tokens is None:
            seen.extend(range(g.start, g.end))
            continue
        seen.extend(g.tokens.tolist())
        members = g.seq.unique_consecutive(return_counts=True)[1].tolist()
        assert max(members) == g.shape[1] and len(members) == g.shape[0]
        assert max(members) <= max(BUCKET_RATIO * min(members), min(members) + BUCKET_SLACK)
    assert sorted(seen) == list(range(packed.total_tokens))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(min_value=1, max_value=48), min_size=1, max_size=8),
       seed=st.integers(0, 2**16), attention=st.sampled_from(ATTENTION_KINDS))
def test_property_any_lengths_match_padded(bert, lengths, seed, attention):
    seqs = random_sequences(lengths, seed=seed)
    with torch.no_grad():
        out = padfree_encode(bert, pack(seqs), attention=attention)
    torch.testing.assert_close(out, padded_reference(bert, seqs), atol=ATOL, rtol=0)


# ---------------------------------------------------------------- sentence embeddings


def test_sentence_embeddings_equal_encode(bert):
    tok = tiny_tokenizer()
    sentences = ["x = 1", "The quick brown fox jumps over the lazy dog.", "for item in items: print(item)",
                 "a", "Raise an exception if the object is not callable, otherwise return it."]
    ours = padfree_sentence_embeddings(bert, tok, sentences, batch_size=2)
    reference = encode(bert, tok, sentences, batch_size=3)
    assert ours.shape == (len(sentences), bert.config.hidden_size)
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(len(sentences)), atol=1e-6, rtol=0)


def test_mean_pool_is_per_sequence_mean():
    hidden = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    p = pack([[1, 1, 1], [1], [1, 1]])
    pooled = mean_pool(hidden, p, normalize=False)
    expected = torch.stack([hidden[0:3].mean(0), hidden[3:4].mean(0), hidden[4:6].mean(0)])
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(mean_pool(hidden, p), F.normalize(expected, dim=1))


# ---------------------------------------------------------------- quantised models


@pytest.mark.parametrize("spec", [
    RTN(bits=4, granularity="group", group_size=32, symmetric=False),
    RTN(bits=8, act_bits=8, act_granularity="token"),   # W8A8, dynamic per-token activations
], ids=["w4g32", "w8a8-token"])
def test_quantised_model_packed_equals_padded(spec):
    model = tiny_model("bert")
    run_transforms(model, [spec], progress=False)
    adapter = adapter_for(model)
    for block in adapter.get_blocks(model):
        assert all(isinstance(m, QuantLinear) for m in adapter.block_linears(block).values())
    seqs = random_sequences([12, 3, 40, 1, 27], seed=11)
    with torch.no_grad():
        out = padfree_encode(model, pack(seqs))
    torch.testing.assert_close(out, padded_reference(model, seqs), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- errors


def test_refuses_non_bert_model():
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        padfree_encode(tiny_model("llama"), pack([[5, 6]]))


def test_refuses_bert_decoder():
    model = tiny_model("bert", is_decoder=True)
    with pytest.raises(UnsupportedArchitectureError, match="is_decoder"):
        padfree_encode(model, pack([[5, 6]]))


def test_refuses_empty_batch_and_empty_sequence(bert):
    with pytest.raises(DataError, match="empty batch"):
        pack([])
    with pytest.raises(DataError, match="sequence 1"):
        pack([[5, 6], []])
    with pytest.raises(DataError, match="sequence 0"):
        pack({"input_ids": [[5, 6]], "attention_mask": [[0, 0]]})
    with pytest.raises(DataError, match="empty batch"):
        padfree_sentence_embeddings(bert, tiny_tokenizer(), [])


def test_refuses_too_long_sequence(bert):
    limit = bert.config.max_position_embeddings
    with pytest.raises(DataError, match=r"sequence 1 has 257 tokens.*max_position_embeddings \(256\)"):
        padfree_encode(bert, pack(random_sequences([3, limit + 1])))


def test_refuses_out_of_vocabulary_ids(bert):
    with pytest.raises(DataError, match="vocabulary"):
        padfree_encode(bert, pack([[5, bert.config.vocab_size]]))


def test_refuses_unknown_attention_strategy(bert):
    with pytest.raises(DataError, match="attention strategy"):
        padfree_encode(bert, pack([[5]]), attention="flash")


def test_packed_batch_is_a_plain_dataclass():
    p = pack([[1, 2]])
    assert isinstance(p, PackedBatch) and p.to("cpu").input_ids.tolist() == [1, 2]


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_minilm_packed_equals_padded_on_real_sentences():
    from slimformer.models.load import load

    model, tokenizer = load("minilm-l6")
    sentences = [
        "A man is playing a guitar.",
        "Someone plays the guitar.",
        "The stock market fell sharply on Tuesday after the central bank raised interest rates again.",
        "Hi.",
        ("Padding-free batching concatenates the real tokens of every sentence and runs attention "
         "per sentence, so no work is spent on pad tokens in the linear layers."),
        "Cats sleep.",
    ]
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        reference = model(**enc).last_hidden_state[enc["attention_mask"].bool()]
        out = padfree_encode(model, pack(enc))
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
    ours = padfree_sentence_embeddings(model, tokenizer, sentences, batch_size=4)
    torch.testing.assert_close(ours, encode(model, tokenizer, sentences, batch_size=4), atol=ATOL, rtol=0)
