"""The families slimformer knows. Adding one: a new ``register_adapter`` entry here,
a tiny-model builder in ``models/tiny.py`` and a loader test."""

from dataclasses import replace

from slimformer.models.adapters.base import Adapter, NormGroup, register_adapter

LLAMA = register_adapter(
    Adapter(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "smollm3"),
        blocks="model.layers",
        attention_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        attention_out=("self_attn.o_proj",),
        mlp_in=("mlp.gate_proj", "mlp.up_proj"),
        mlp_out=("mlp.down_proj",),
        norms=(
            NormGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            NormGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ),
        embed_tokens="model.embed_tokens",
        final_norm="model.norm",
        rotary="model.rotary_emb",
        attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        gguf_linears=(("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                      ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                      ("ffn_down", "mlp.down_proj")),
    )
)

# Qwen3: Llama's layout plus an RMSNorm per head on q and k, before rotary.
QWEN3 = register_adapter(replace(LLAMA, model_types=("qwen3",), q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"))

GPT2 = register_adapter(
    Adapter(
        family="gpt2",
        model_types=("gpt2",),
        blocks="transformer.h",
        attention_in=("attn.c_attn",),
        attention_out=("attn.c_proj",),
        mlp_in=("mlp.c_fc",),
        mlp_out=("mlp.c_proj",),
        norms=(NormGroup("ln_1", ("attn.c_attn",)), NormGroup("ln_2", ("mlp.c_fc",))),
        transposed_linears=True,
    )
)

OPT = register_adapter(
    Adapter(
        family="opt",
        model_types=("opt",),
        blocks="model.decoder.layers",
        attention_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        attention_out=("self_attn.out_proj",),
        mlp_in=("fc1",),
        mlp_out=("fc2",),
        norms=(
            NormGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            NormGroup("final_layer_norm", ("fc1",)),
        ),
    )
)

BERT = register_adapter(
    Adapter(
        family="bert",
        model_types=("bert",),
        blocks="encoder.layer",
        attention_in=("attention.self.query", "attention.self.key", "attention.self.value"),
        attention_out=("attention.output.dense",),
        mlp_in=("intermediate.dense",),
        mlp_out=("output.dense",),
        # BERT is post-norm: a LayerNorm closes each sub-block and feeds the next one.
        norms=(),
        is_decoder=False,
        lm_head=None,
    )
)
