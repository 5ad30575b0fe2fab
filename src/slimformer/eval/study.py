"""The W8A32 / W32A8 / W8A8 study: quantising activations hurts far more than weights.

Weights: quantised by the caller (``api.study_w8a8`` uses RTN 8-bit per output channel). Activations: the input of every block
projection, 8-bit, per tensor and per token (dynamic). Decoders are scored by
perplexity; encoders by embedding cosine to the unquantised model."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

from slimformer.formats.primitives import fake_quantize_activation
from slimformer.formats.spec import ActSpec
from slimformer.models.adapters import adapter_for


@contextlib.contextmanager
def quantized_activations(model, spec: ActSpec):
    """Fake-quantise the input of every block projection while inside the block."""
    adapter = adapter_for(model)
    handles = []
    for block in adapter.get_blocks(model):
        for module in adapter.block_linears(block).values():
            handles.append(module.register_forward_pre_hook(
                lambda _m, args: (fake_quantize_activation(args[0], spec),) + tuple(args[1:])))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def study_w8a8(model, tokenizer, data: str, quantize_weights: Callable[[object], None], seqlen: int = 512,
               windows: int = 8, progress: bool = True) -> dict:
    """Score fp32, W8 (``quantize_weights`` applied in place to a copy), A8 per tensor and per
    token, and both together."""
    from slimformer.data import eval_windows, held_out_sentences, load_text, tokenize

    adapter = adapter_for(model)
    text = load_text(data, role="eval")
    w8 = copy.deepcopy(model)
    quantize_weights(w8)
    variants = {"W32A32 (fp32)": (model, None), "W8A32": (w8, None)}
    for gran in ("tensor", "token"):
        spec = ActSpec(bits=8, granularity=gran)
        variants[f"W32A8 per-{gran}"] = (model, spec)
        variants[f"W8A8 per-{gran}"] = (w8, spec)

    if adapter.is_decoder:
        from slimformer.eval.perplexity import perplexity

        wins = eval_windows(tokenize(text, tokenizer), seqlen, windows)

        def score(m):
            return {"perplexity": perplexity(m, wins, progress=False)["perplexity"]}
    else:
        from slimformer.eval.embeddings import embedding_cosine, encode

        sentences = held_out_sentences(text.text)
        reference = encode(model, tokenizer, sentences)

        def score(m):
            return {"embedding_cosine": embedding_cosine(reference, encode(m, tokenizer, sentences))["mean"]}

    rows = []
    for name, (m, spec) in variants.items():
        with quantized_activations(m, spec) if spec else contextlib.nullcontext():
            rows.append({"variant": name, **score(m)})
        if progress:
            print(f"  {name:22s} " + "  ".join(f"{k} {v:.4f}" for k, v in rows[-1].items() if k != "variant"), flush=True)
    metric = "perplexity" if adapter.is_decoder else "embedding_cosine"
    base = rows[0][metric]
    print(f"\n{'variant':22s} {metric:>18s} {'change vs fp32':>15s}")
    for r in rows:
        change = (r[metric] / base - 1) * 100 if adapter.is_decoder else (r[metric] - base)
        unit = "%" if adapter.is_decoder else ""
        print(f"{r['variant']:22s} {r[metric]:18.4f} {change:+14.3f}{unit}")
    return {"data": text.describe(), "metric": metric, "rows": rows, "windows": windows if adapter.is_decoder else None}
