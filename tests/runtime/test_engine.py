"""The engine protocol and the one generation loop."""

import torch

from slimformer.models.tiny import tiny_model
from slimformer.runtime.decoder import NativeDecoder
from slimformer.runtime.engine import Engine, HFEngine, Session, build_engine
from slimformer.runtime.loop import generate_ids, greedy, token_steps


def test_both_engines_implement_the_protocol_and_agree():
    model = tiny_model("llama", seed=2)
    engines = [NativeDecoder.from_model(model), HFEngine(model)]
    prompts = [[5, 6, 7, 8], [9, 10]]
    outs = []
    for e in engines:
        assert isinstance(e, Engine) and e.max_positions == 256 and e.describe()["engine"] in ("native", "hf")
        sess = e.new_session(2, 12)
        assert isinstance(sess, Session) and sess.batch == 2 and sess.max_len == 12
        first = e.prefill(sess, prompts)
        assert first.shape == (2, model.config.vocab_size) and sess.lengths == [4, 2]
        e.decode(sess, [1, 2])
        assert sess.lengths == [5, 3]
        outs.append(generate_ids(e, prompts, 6))
    assert outs[0] == outs[1]


class _Scripted:
    """An engine whose logits pick token ``step + row`` (so each row's sequence is known)."""

    max_positions = 100

    def __init__(self):
        self.decodes = 0

    def describe(self):
        return {"engine": "scripted"}

    def new_session(self, batch, max_len):
        return {"batch": batch, "step": 0}

    def _logits(self, sess):
        out = torch.zeros(sess["batch"], 50)
        for b in range(sess["batch"]):
            out[b, sess["step"] + b] = 1
        return out

    def prefill(self, sess, seqs):
        return self._logits(sess)

    def decode(self, sess, tokens):
        self.decodes += 1
        sess["step"] += 1
        return self._logits(sess)


def test_loop_stops_rows_and_decodes_no_further_than_needed():
    e = _Scripted()
    steps = list(token_steps(e, [[1], [1], [1]], 10, stop_ids={3}))
    # row 0 emits 0,1,2,3 (stop); row 1 emits 1,2,3 (stop); row 2 emits 2,3 (stop)
    assert steps == [[0, 1, 2], [1, 2, 3], [2, 3, None], [3, None, None]]
    assert e.decodes == 3  # no decode after the last row stopped
    e = _Scripted()
    assert generate_ids(e, [[1]], 4) == [[0, 1, 2, 3]] and e.decodes == 3  # no decode after the last token
    assert list(token_steps(_Scripted(), [[1]], 0)) == []


def test_greedy_pick_and_auto_selection():
    assert greedy(torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 3.0]])) == [1, 0]  # first maximum on ties
    engine, name = build_engine(tiny_model("llama"))
    assert name == "native" and isinstance(engine, NativeDecoder)
