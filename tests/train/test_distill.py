"""Distillation terms (logits, hidden states, attention outputs, sentence embeddings), the
shared teacher, layer dropping, data-free teacher text, and their bad input."""

import copy
import json

import pytest
import torch

from slimformer import api
from slimformer.core.runner import TrainingRun, check_shared, run_recipe, shared_teacher
from slimformer.data import load_text, tokenize
from slimformer.errors import DataError, RecipeError, TrainingError
from slimformer.models.adapters import adapter_for
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.plugins import load_builtin
from slimformer.recipes.schema import parse_recipe
from slimformer.techniques.distill.layers import drop_layers
from slimformer.train import TokenBatches, TrainConfig, Trainer
from slimformer.train.losses import (
    AttentionDistillation,
    Distillation,
    EmbeddingCosine,
    HiddenDistillation,
    LanguageModelling,
    distillation_loss,
    embedding_cosine_loss,
    forward_capture,
    hidden_mse,
    parse_terms,
)
from slimformer.train.teacher_data import TeacherTextSettings, parse_teacher_data, teacher_text

load_builtin()


@pytest.fixture(scope="module")
def tokens():
    return tokenize(load_text("pydoc", role="calib"), tiny_tokenizer())


def _count_forwards(model):
    calls = []
    model.register_forward_hook(lambda m, a, o: calls.append(1))
    return calls


def test_recipe_syntax_for_every_term():
    terms = TrainConfig.parse({"loss": [{"causal_lm": {"weight": 0.5}}, {"distill": {"weight": 0.5, "temperature": 2}},
                                        {"distill_hidden": {"weight": 1.0, "normalize": False}},
                                        {"distill_attn": {"layer_map": [0, 2]}}, "embed_cosine"]}).loss_terms()
    assert [t.name for t in terms] == ["causal_lm", "distill", "distill_hidden", "distill_attn", "embed_cosine"]
    assert terms[2].normalize is False and terms[3].layer_map == [0, 2]
    assert terms[3].describe() == {"term": "distill_attn", "weight": 1.0, "normalize": True, "layer_map": [0, 2]}
    for bad, fragment in (([{"distill_hidden": {"normalize": 1}}], "true or false"),
                          ([{"distill_hidden": {"layer_map": [0, -1]}}], "layer_map"),
                          ([{"distill_attn": {"layer_map": "every"}}], "layer_map")):
        with pytest.raises(RecipeError, match=fragment):
            TrainConfig.parse({"loss": bad})


def test_teacher_and_student_run_once_per_micro_batch_however_many_terms_use_them(tokens):
    student, teacher = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    s_calls, t_calls = _count_forwards(student), _count_forwards(teacher)
    terms = [LanguageModelling(), Distillation(weight=0.5), HiddenDistillation(), AttentionDistillation()]
    trainer = Trainer(student, TrainConfig(steps=1, batch_size=2, seq_len=16), TokenBatches(tokens, 2, 16),
                      teacher=teacher, terms=terms, progress=False)
    ids = trainer.batches(0)
    trainer.loss_on(ids)
    assert len(s_calls) == 1 and len(t_calls) == 1 and trainer.teacher_forwards == 1
    trainer.loss_on(ids)   # a new micro-batch: the teacher runs again (no stale cache)
    assert len(t_calls) == 2
    assert not any(p.grad is not None for p in teacher.parameters())


def test_captured_blocks_and_attention_match_independent_references():
    model = tiny_model("llama", seed=3, num_hidden_layers=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    got = forward_capture(model, ids, blocks=True, attention=True)
    with torch.no_grad():
        hf = model(input_ids=ids, output_hidden_states=True)
    # HF's hidden_states[i + 1] is block i's output (the last one after the final norm).
    for i in range(2):
        torch.testing.assert_close(got.blocks[i], hf.hidden_states[i + 1])
    seen = []
    handles = [layer.self_attn.register_forward_hook(lambda m, a, o: seen.append(o[0])) for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    assert len(got.attention) == 3
    for mine, ref in zip(got.attention, seen):
        torch.testing.assert_close(mine, ref)
    torch.testing.assert_close(got.logits, hf.logits)


def test_layer_terms_follow_the_layer_map_and_are_zero_for_the_teacher_itself(tokens):
    teacher = tiny_model("llama", seed=4, num_hidden_layers=4)
    student = copy.deepcopy(teacher)
    drop_layers(student, adapter_for(student), [1, 3])
    assert student.config.slimformer_layer_map == [1, 3]
    ids = tokens[:64].view(2, 32)
    trainer = Trainer(student, TrainConfig(steps=1, batch_size=2, seq_len=32), TokenBatches(tokens, 2, 32),
                      teacher=teacher, terms=[HiddenDistillation(), AttentionDistillation()], progress=False)
    s = forward_capture(student, ids, blocks=True, attention=True)
    t = forward_capture(teacher, ids, blocks=True, attention=True)
    trainer._teacher_out, trainer.student = {}, s
    want_hidden = (hidden_mse(s.blocks[0], t.blocks[1]) + hidden_mse(s.blocks[1], t.blocks[3])) / 2
    torch.testing.assert_close(trainer.terms[0](trainer, ids, s.logits), want_hidden)
    want_attn = (hidden_mse(s.attention[0], t.attention[1]) + hidden_mse(s.attention[1], t.attention[3])) / 2
    torch.testing.assert_close(trainer.terms[1](trainer, ids, s.logits), want_attn)
    # Block 1 of the student is teacher block 3 fed different inputs: non-zero; the
    # teacher against itself (identity map): zero.
    assert float(want_hidden) > 0
    same = Trainer(copy.deepcopy(teacher), TrainConfig(steps=1, batch_size=2, seq_len=32),
                   TokenBatches(tokens, 2, 32), teacher=teacher,
                   terms=[HiddenDistillation(weight=1.0), AttentionDistillation(weight=1.0), Distillation(temperature=1.0)],
                   progress=False)
    assert float(same.loss_on(ids)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("teacher_kwargs,term,fragment", [
    ({"vocab_size": 500}, Distillation(), "vocabulary has 500"),
    ({"hidden_size": 32, "intermediate_size": 64}, HiddenDistillation(), "hidden size is 32"),
    ({"num_hidden_layers": 3}, HiddenDistillation(), "student has 2 blocks, the teacher 3"),
    ({}, HiddenDistillation(layer_map=[0, 5]), "does not fit"),
])
def test_a_teacher_that_does_not_fit_is_refused(tokens, teacher_kwargs, term, fragment):
    teacher = tiny_model("llama", seed=2, **teacher_kwargs)
    with pytest.raises(TrainingError, match=fragment):
        Trainer(tiny_model("llama"), TrainConfig(steps=1, batch_size=2, seq_len=16), TokenBatches(tokens, 2, 16),
                teacher=teacher, terms=[term], progress=False)
    with pytest.raises(TrainingError, match="teacher is a gpt2 model"):
        Trainer(tiny_model("llama"), TrainConfig(steps=1, batch_size=2, seq_len=16), TokenBatches(tokens, 2, 16),
                teacher=tiny_model("gpt2"), terms=[Distillation()], progress=False)


def test_terms_that_need_an_lm_head_are_refused_on_an_encoder_and_cosine_on_a_decoder(tokens):
    for term in (LanguageModelling(), Distillation()):
        with pytest.raises(TrainingError, match="needs a language-model head"):
            Trainer(tiny_model("bert"), TrainConfig(steps=1, batch_size=2, seq_len=16), TokenBatches(tokens, 2, 16),
                    teacher=tiny_model("bert"), terms=[term], progress=False)
    with pytest.raises(TrainingError, match="embed_cosine compares sentence embeddings of an encoder"):
        Trainer(tiny_model("llama"), TrainConfig(steps=1, batch_size=2, seq_len=16), TokenBatches(tokens, 2, 16),
                teacher=tiny_model("llama"), terms=[EmbeddingCosine()], progress=False)


def test_too_little_data_is_refused_and_repeated_data_is_a_recorded_warning(tokens):
    small = tokens[:32 * 8]   # 8 windows: 4 batches of 2
    with pytest.raises(TrainingError, match="too little training data"):
        Trainer(tiny_model("llama"), TrainConfig(steps=401, batch_size=2, seq_len=32), TokenBatches(small, 2, 32),
                progress=False)
    model = tiny_model("llama").requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="repeats the training data"):
        trainer = Trainer(model, TrainConfig(steps=6, batch_size=2, seq_len=32, lr=1e-3), TokenBatches(small, 2, 32),
                          progress=False)
    result = trainer.run()
    assert result.epochs == pytest.approx(1.5) and "1.50 epochs" in result.warnings[0]


def _recipe(text):
    return parse_recipe(text)


def test_the_teacher_shares_frozen_tensors_and_stays_the_model_before_training(tokens):
    model = tiny_model("llama", seed=6)
    ids = tokens[:64].view(2, 32)
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    recipe = _recipe("name: d\nstages:\n  - FineTune: {}\n")
    config = TrainConfig(steps=3, batch_size=2, seq_len=32, lr=3e-3, freeze=["embeddings", "norms"],
                         loss=[{"causal_lm": {"weight": 0.5}}, {"distill": {"weight": 0.5}}, "distill_hidden"])
    teacher, shared = shared_teacher(model, recipe.stages, config.freeze)
    emb = model.model.embed_tokens.weight
    assert teacher.model.embed_tokens.weight.data_ptr() == emb.data_ptr()
    assert teacher.model.norm.weight.data_ptr() == model.model.norm.weight.data_ptr()
    assert teacher.model.layers[0].self_attn.q_proj.weight.data_ptr() != model.model.layers[0].self_attn.q_proj.weight.data_ptr()
    assert "model.embed_tokens.weight" in shared
    emb_before = emb.detach().clone()
    run = run_recipe(model, recipe.stages, train=TrainingRun(config, TokenBatches(tokens, 2, 32)), progress=False)
    assert torch.equal(model.model.embed_tokens.weight, emb_before)      # frozen: untouched
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert not torch.allclose(after, before)                              # the student trained
    memory = run.training.memory
    assert memory["shared_with_teacher"] >= emb.numel() * 4
    assert memory["teacher_only"] == memory["teacher_total"] - memory["shared_with_teacher"]
    trained = sum(p.numel() * 4 for n, p in model.named_parameters() if "embed" not in n and "norm" not in n)
    n_trained = sum(1 for n, p in model.named_parameters() if "embed" not in n and "norm" not in n)
    # AdamW: two moments per parameter, and a step counter (a scalar tensor) each
    assert memory["gradients"] == trained and 2 * trained <= memory["optimizer"] <= 2 * trained + 8 * n_trained
    assert memory["total"] == memory["student"] + memory["teacher_only"] + memory["gradients"] + memory["optimizer"]


def test_the_teachers_outputs_do_not_change_while_the_student_trains(tokens):
    model = tiny_model("llama", seed=7)
    ids = tokens[:64].view(2, 32)
    recipe = _recipe("name: d\nstages:\n  - FineTune: {}\n")
    config = TrainConfig(steps=3, batch_size=2, seq_len=32, lr=3e-3, freeze=["embeddings"], loss="distill")
    teacher, shared = shared_teacher(model, recipe.stages, config.freeze)
    with torch.no_grad():
        before = teacher(input_ids=ids).logits.clone()
    trainer = Trainer(model.requires_grad_(True), config, TokenBatches(tokens, 2, 32), teacher=teacher, progress=False)
    trainer.run()
    with torch.no_grad():
        torch.testing.assert_close(teacher(input_ids=ids).logits, before, rtol=0, atol=0)
    check_shared(shared)
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] += 1   # a stage that changed a shared tensor is caught
    with pytest.raises(TrainingError, match="embed_tokens.weight: a stage changed this tensor"):
        check_shared(shared)


def test_freeze_settings():
    with pytest.raises(RecipeError, match="matches no parameter"):
        Trainer(tiny_model("llama"), TrainConfig(steps=1, batch_size=1, seq_len=8, freeze=["nothing\\.here"]),
                TokenBatches(torch.arange(64), 1, 8), progress=False)
    with pytest.raises(RecipeError, match="freeze must be a list"):
        TrainConfig(freeze=[1])


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_drop_layers_gives_a_smaller_model_that_saves_and_reloads(family, tmp_path):
    model = tiny_model(family, seed=8, num_hidden_layers=4)
    recipe = _recipe("name: drop\nstages:\n  - DropLayers: {keep: every_other}\n")
    teacher = copy.deepcopy(model)
    result = api.compress((model, tiny_tokenizer()), recipe, tmp_path / "out", inplace=True)
    blocks = adapter_for(model).get_blocks(model)
    assert len(blocks) == 2 and model.config.num_hidden_layers == 2 and model.config.slimformer_layer_map == [0, 2]
    ids = torch.randint(4, model.config.vocab_size, (1, 10))
    # The student's blocks are the teacher's blocks 0 and 2, unchanged.
    tb = adapter_for(teacher).get_blocks(teacher)
    for mine, theirs in zip(blocks, (tb[0], tb[2])):
        for (n, p), (_, q) in zip(mine.named_parameters(), theirs.named_parameters()):
            assert torch.equal(p, q), n
    loaded, _ = api.load(str(result.out))
    assert loaded.config.num_hidden_layers == 2 and loaded.config.slimformer_layer_map == [0, 2]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids)[0], model(input_ids=ids)[0])
    if family == "llama":
        assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
        with torch.no_grad():   # the KV cache works with renumbered layers
            cached = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
            full = ids
            for _ in range(4):
                nxt = model(input_ids=full).logits[:, -1].argmax(-1, keepdim=True)
                full = torch.cat([full, nxt], 1)
        assert torch.equal(cached, full)


def test_drop_layers_bad_keep():
    from slimformer.core.transform import build_transform
    with pytest.raises(RecipeError, match="every_other or a list"):
        build_transform("DropLayers", {"keep": "half"})
    model = tiny_model("llama", num_hidden_layers=4)
    with pytest.raises(RecipeError, match="outside 0-3"):
        drop_layers(model, adapter_for(model), [0, 4])
    with pytest.raises(RecipeError, match="increasing"):
        drop_layers(model, adapter_for(model), [2, 1])


DISTIL_DECODER = """name: half-distill
stages:
  - DropLayers: {keep: every_other}
  - FineTune: {}
train:
  steps: 3
  batch_size: 2
  seq_len: 32
  lr: 3.0e-3
  freeze: [embeddings]
  loss: [{causal_lm: {weight: 0.2}}, {distill: {weight: 0.8, temperature: 2}}, {distill_hidden: {weight: 1.0}}]
"""


def test_train_a_half_depth_decoder_student_end_to_end(tmp_path):
    model = tiny_model("llama", seed=9, num_hidden_layers=4)
    out = api.train((model, tiny_tokenizer()), _recipe(DISTIL_DECODER), "pydoc", tmp_path / "o", progress=False)
    assert out.model.config.num_hidden_layers == 2
    meta = json.loads((out.out / "slimformer.json").read_text())
    record = meta["training"]
    assert meta["layer_map"] == [0, 2]
    assert record["memory_bytes"]["shared_with_teacher"] > 0
    assert [t["term"] for t in record["loss_terms"]] == ["causal_lm", "distill", "distill_hidden"]
    loaded, _ = api.load(str(out.out))
    assert loaded.config.num_hidden_layers == 2


ENCODER = """name: minilm-half
stages:
  - DropLayers: {keep: every_other}
  - FineTune: {}
train:
  steps: 8
  batch_size: 4
  seq_len: 16
  lr: 1.0e-3
  loss: [embed_cosine, {distill_hidden: {weight: 0.5}}]
"""


def test_train_an_encoder_student_with_the_cosine_loss(tmp_path):
    tok = tiny_tokenizer()
    # Layer dropping + cosine + hidden terms through the API: runs, records, keeps 2 blocks.
    out = api.train((tiny_model("bert", seed=10, num_hidden_layers=4), tok), _recipe(ENCODER), "pydoc",
                    tmp_path / "o", progress=False)
    assert len(out.result.history) == 8 and out.model.config.num_hidden_layers == 2
    # Learning: a random 2-block student moves its sentence embeddings towards the teacher's.
    teacher, student = tiny_model("bert", seed=10, num_hidden_layers=4), tiny_model("bert", seed=11)
    untrained = copy.deepcopy(student)
    recipe = _recipe("name: cos\nstages:\n  - FineTune: {}\ntrain: {steps: 8, batch_size: 4, seq_len: 16, "
                     "lr: 1.0e-3, loss: [embed_cosine]}\n")
    trained = api.train((student, tok), recipe, "pydoc", tmp_path / "c", teacher=(teacher, tok), progress=False).model
    ids = TokenBatches(tokenize(load_text("pydoc", role="calib"), tok), 4, 16, wrap=(2, 3)).windows[:64]

    def distance(model):
        with torch.no_grad():
            return float(embedding_cosine_loss(model(input_ids=ids).last_hidden_state,
                                               teacher(input_ids=ids).last_hidden_state))
    assert distance(trained) < 0.8 * distance(untrained)
    with pytest.raises(TrainingError, match="needs a language-model head"):
        api.train((tiny_model("bert"), tok), _recipe(ENCODER.replace("embed_cosine", "causal_lm")), "pydoc",
                  tmp_path / "bad", progress=False)


def test_encoder_batches_are_wrapped_in_cls_and_sep():
    batches = TokenBatches(torch.arange(10, 40), 2, 8, wrap=(2, 3))
    assert batches.windows.shape == (5, 8)
    assert (batches.windows[:, 0] == 2).all() and (batches.windows[:, -1] == 3).all()
    assert batches.windows[0, 1:-1].tolist() == list(range(10, 16))


def test_teacher_text_is_sampled_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    model, tok = tiny_model("llama", seed=11), tiny_tokenizer()
    settings = TeacherTextSettings(sequences=5, seq_len=12, greedy=3, batch_size=2)
    ids, meta = teacher_text(model, tok, settings, progress=False)
    assert ids.shape == (5, 12) and not meta["from_cache"]
    start = tok.bos_token_id if tok.bos_token_id is not None else model.config.bos_token_id
    assert (ids[:, 0] == start).all()
    # Tokens 2..4 are the teacher's greedy choices after the sampled first token.
    with torch.no_grad():
        for pos in range(2, 2 + settings.greedy):
            greedy = model(input_ids=ids[:, :pos]).logits[:, -1].argmax(-1)
            assert torch.equal(greedy, ids[:, pos])
    again, meta2 = teacher_text(model, tok, settings, progress=False)
    assert meta2["from_cache"] and torch.equal(again, ids)
    files = list((tmp_path / "cache" / "teacher_text").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"      # no temporary left behind
    other, meta3 = teacher_text(tiny_model("llama", seed=12), tok, settings, progress=False)
    assert not meta3["from_cache"]                                    # another teacher: another key
    assert parse_teacher_data("teacher:64") == 64 and parse_teacher_data("pydoc") is None
    with pytest.raises(DataError, match="how many sequences"):
        parse_teacher_data("teacher:lots")


def test_data_free_training_through_the_api(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    recipe = _recipe(DISTIL_DECODER.replace("steps: 3", "steps: 2"))
    out = api.train((tiny_model("llama", seed=13, num_hidden_layers=4), tiny_tokenizer()), recipe, "teacher:8",
                    tmp_path / "o", progress=False)
    record = json.loads((out.out / "slimformer.json").read_text())["training"]
    assert record["data"]["source"] == "teacher:8" and record["data"]["tokens"] == 8 * 32
    with pytest.raises(DataError, match="encoder"):
        api.train((tiny_model("bert"), tiny_tokenizer()), _recipe(ENCODER), "teacher:8", tmp_path / "b", progress=False)


@pytest.mark.parametrize("recipe,family", [("distill-half-layers", "llama"), ("distill-half-layers-encoder", "bert")])
def test_builtin_distillation_recipes_train_a_tiny_model(recipe, family, tmp_path):
    out = api.train((tiny_model(family, seed=14, num_hidden_layers=4), tiny_tokenizer()), recipe, "pydoc",
                    tmp_path / "o", steps=2, batch_size=2, seq_len=16, progress=False)
    assert out.model.config.num_hidden_layers == 2 and out.result.steps == 2


def test_uniform_layer_map_aligns_the_last_student_block_with_the_last_teacher_block():
    teacher = tiny_model("llama", seed=4, num_hidden_layers=6)
    student = copy.deepcopy(teacher)
    drop_layers(student, adapter_for(student), "every_other")          # blocks 0, 2, 4
    term = TrainConfig.parse({"loss": [{"distill_hidden": {"layer_map": "uniform"}}]}).loss_terms()[0]
    term.teacher = teacher
    assert term.resolved_map(student) == [1, 3, 5]
    assert HiddenDistillation(teacher=teacher).resolved_map(student) == [0, 2, 4]   # DropLayers' record
