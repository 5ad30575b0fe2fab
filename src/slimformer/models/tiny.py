"""Tiny random models and a tiny tokenizer, built offline in seconds, for tests and
examples. One builder per supported family."""

from __future__ import annotations

import functools

import torch

TINY_VOCAB = 384


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE trained on CPython's documentation (always installed)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<pad>", "<eos>", "[CLS]", "[SEP]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [topics[k] for k in sorted(topics)[:60]]
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   cls_token="[CLS]", sep_token="[SEP]")


def _config(family: str, **overrides):
    import transformers as tf

    vocab = len(tiny_tokenizer())
    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    if family == "llama":
        cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common)
    elif family in ("qwen3", "mistral"):  # Llama's shape; Qwen3 adds q/k norms, Mistral a sliding window
        cls = tf.Qwen3Config if family == "qwen3" else tf.MistralConfig
        extra = {} if family == "qwen3" else {"sliding_window": 8}
        cfg = cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
                  **extra, **common)
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    elif family == "opt":
        cfg = tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=256, word_embed_proj_dim=64, **common)
    elif family == "bert":
        cfg = tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=256, **common)
    else:
        raise ValueError(f"no tiny builder for family {family!r}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides):
    """A random model of ``family`` (llama, gpt2, opt, bert; also qwen3, mistral) in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    config = _config(family, **overrides)
    cls = tf.AutoModel if family == "bert" else tf.AutoModelForCausalLM
    return cls.from_config(config).eval()


TINY_FAMILIES = ("llama", "gpt2", "opt", "bert")
