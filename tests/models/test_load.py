"""slimformer.load: every tiny family round-trips exactly, adapters find every block
and projection, bad sources fail with a SlimformerError, and the built-ins load."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch
import torch.nn as nn

import slimformer
from slimformer.errors import (
    ModelLoadError,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
)
from slimformer.models.adapters import adapter_for
from slimformer.models.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    from transformers.modeling_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))


def _outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _ids(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def check_adapter(model) -> None:
    """The adapter's names resolve, in every block, to exactly the projections there are."""
    adapter = adapter_for(model)
    blocks = adapter.get_blocks(model)
    assert isinstance(blocks, nn.ModuleList)
    assert len(blocks) == model.config.num_hidden_layers
    assert len(set(adapter.linears)) == len(adapter.linears)
    for i, block in enumerate(blocks):
        for name in adapter.linears:
            module = block.get_submodule(name)
            assert isinstance(module, LINEAR_TYPES), f"block {i}: {name} is {type(module).__name__}"
            assert isinstance(module, Conv1D) == adapter.transposed_linears, name
        present = {n for n, m in block.named_modules() if isinstance(m, LINEAR_TYPES)}
        assert present == set(adapter.linears), f"block {i}: projections not covered: {present ^ set(adapter.linears)}"
        for group in adapter.norms:
            norm = block.get_submodule(group.norm)
            assert "norm" in type(norm).__name__.lower(), (group.norm, type(norm).__name__)
            assert set(group.linears) <= set(adapter.linears)
    if adapter.lm_head is not None:
        head = model.get_submodule(adapter.lm_head)
        assert isinstance(head, nn.Linear) and head.out_features == model.config.vocab_size


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_round_trip_identical(family, tmp_path, capfd):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / family)
    tiny_tokenizer().save_pretrained(tmp_path / family)
    capfd.readouterr()

    loaded, tokenizer = slimformer.load(tmp_path / family)

    assert capfd.readouterr().err == "", "loading a model must not write to stderr (progress bars)"
    assert type(loaded) is type(model)
    assert not loaded.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in loaded.parameters())
    ids = _ids(model.config.vocab_size)
    assert torch.equal(_outputs(loaded, ids), _outputs(model, ids))
    assert tokenizer("def f(x): return x")["input_ids"] == tiny_tokenizer()("def f(x): return x")["input_ids"]
    adapter = adapter_for(loaded)
    assert adapter.family == family
    assert adapter.is_decoder == (family != "bert")
    check_adapter(loaded)
    if family == "llama":
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_load_in_bfloat16(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    loaded, _ = slimformer.load(str(tmp_path / "m"), dtype="bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    with pytest.raises(ModelLoadError, match="float8"):
        slimformer.load(str(tmp_path / "m"), dtype="float8")


def test_unsupported_architecture_names_model_type(tmp_path):
    import transformers

    config = transformers.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=2, vocab_size=128)
    config.save_pretrained(tmp_path / "t5")
    with pytest.raises(UnsupportedArchitectureError, match="'t5'") as exc:
        slimformer.load(tmp_path / "t5")
    assert "llama" in str(exc.value)   # lists what is supported
    with pytest.raises(UnsupportedArchitectureError, match="'t5'"):
        adapter_for(config)


def test_pickle_only_checkpoint(tmp_path):
    model = tiny_model("gpt2")
    d = tmp_path / "pickled"
    model.config.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="trust-pickle"):
        slimformer.load(d)
    loaded, _ = slimformer.load(d, trust_pickle=True)
    ids = _ids(model.config.vocab_size)
    assert torch.equal(_outputs(loaded, ids), _outputs(model, ids))


def test_bad_sources(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        slimformer.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        slimformer.load(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        slimformer.load(tmp_path / "notes.txt")
    (tmp_path / "x.gguf").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="GGUF"):
        slimformer.load(tmp_path / "x.gguf")
    (tmp_path / "y.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="GGUF"):
        slimformer.load(tmp_path / "y.gguf")


def test_config_without_weights(tmp_path):
    model = tiny_model("opt")
    model.config.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    with pytest.raises(ModelLoadError):
        slimformer.load(tmp_path / "m")


def test_corrupt_compressed_marker(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "slimformer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="slimformer.json"):
        slimformer.load(tmp_path / "m")


# ---------------------------------------------------------------- built-ins

def test_builtin_minilm():
    model, tokenizer = slimformer.load("minilm-l6")
    assert type(model).__name__ == "BertModel"
    assert model.config.model_type == "bert"
    assert len(adapter_for(model).get_blocks(model)) == 6
    check_adapter(model)
    batch = tokenizer(["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell."],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert hidden.shape[-1] == 384
    # A sentence encoder: paraphrases are closer than an unrelated sentence.
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


@pytest.fixture(scope="module")
def smollm2():
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        model, tokenizer = slimformer.load("smollm2-135m")
    return model, tokenizer, stderr.getvalue()


PARAGRAPH = (
    "The if statement is used for conditional execution. It selects exactly one of the suites by "
    "evaluating the expressions one by one until one is found to be true; then that suite is executed, "
    "and no other part of the if statement is executed or evaluated. If all expressions are false, the "
    "suite of the else clause, if present, is executed. The while statement is used for repeated "
    "execution as long as an expression is true. A break statement executed in the first suite "
    "terminates the loop without executing the else clause's suite."
)


@pytest.mark.slow
def test_builtin_smollm2_structure(smollm2):
    model, tokenizer, stderr = smollm2
    assert "de-quantizing" not in stderr and "Loading weights" not in stderr, stderr
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert config.num_hidden_layers == 30
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert adapter_for(model).num_heads(config) == (9, 3)
    assert config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert len(adapter_for(model).get_blocks(model)) == 30
    check_adapter(model)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features * 3 == attn.q_proj.out_features


@pytest.mark.slow
def test_builtin_smollm2_predicts_english(smollm2):
    model, tokenizer, _ = smollm2
    ids = tokenizer(PARAGRAPH, return_tensors="pt", add_special_tokens=False).input_ids
    assert 80 < ids.shape[1] < 200
    assert tokenizer.decode(ids[0]) == PARAGRAPH
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert math.exp(loss.item()) < 100
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = model(input_ids=prompt).logits[0, -1].argmax()
    assert "Paris" in tokenizer.decode(next_token)
