"""``slimformer inspect``: what a model is, and optionally its outliers and memory plan."""

from __future__ import annotations

from slimformer.eval.planner import ModelShape, plan
from slimformer.models.adapters import adapter_for


def describe(model) -> dict:
    adapter = adapter_for(model)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    shape = ModelShape.from_config(model.config, params)
    swapped = getattr(model, "slimformer_meta", {}).get("modules", {})
    return {
        "family": adapter.family,
        "model_type": model.config.model_type,
        "decoder": adapter.is_decoder,
        "parameters": params,
        "layers": shape.layers,
        "hidden": shape.hidden,
        "heads": shape.heads,
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "vocab": shape.vocab,
        "projections_per_block": list(adapter.linears),
        "compressed_modules": len(swapped),
    }


def inspect_model(model, tokenizer, *, outliers: bool = False, calib: str = "pydoc", calib_samples: int = 8,
                  seqlen: int = 512, kv_plan: bool = False, batch: int = 1, context: int = 2048,
                  kv_bytes: float = 2, progress: bool = True) -> dict:
    """``{"model": describe(model), "kv_plan": ..., "outliers": ...}`` (the last two when asked)."""
    info = describe(model)
    result = {"model": info}
    if kv_plan:
        shape = ModelShape.from_config(model.config, info["parameters"])
        result["kv_plan"] = {"batch": batch, "context": context,
                             **plan(shape, batch, context, kv_bytes_per_value=kv_bytes)}
    if outliers:
        from slimformer.data import calibration_set
        from slimformer.eval.outliers import channel_absmax, outlier_table

        calib_ids, meta = calibration_set(tokenizer, calib, calib_samples, seqlen, None)
        rows = outlier_table(channel_absmax(model, calib_ids, progress=progress))
        result["outliers"] = {"calibration": meta, "layers": rows}
    return result


def format_inspection(result: dict) -> str:
    """The text ``slimformer inspect`` prints."""
    lines = [f"{k:22s} {v}" for k, v in result["model"].items()]
    if "kv_plan" in result:
        p = result["kv_plan"]
        lines += ["", f"memory plan: batch {p['batch']}, context {p['context']}",
                  f"  weights   {p['weight_bytes'] / 1e9:10.3f} GB (2 bytes/param)",
                  f"  KV cache  {p['kv_cache_bytes'] / 1e9:10.3f} GB ({p['kv_bytes_per_token']:,} bytes/token)",
                  f"  KV/weights {p['kv_to_weights']:.2f}×"]
    if "outliers" in result:
        lines += ["", f"{'layer':44s} {'max|x|':>9s} {'median':>8s} {'≥6':>5s} {'≥20×med':>8s}"]
        for r in result["outliers"]["layers"]:
            lines.append(f"{r['layer']:44s} {r['max_abs']:9.2f} {r['median_channel_max']:8.3f} "
                         f"{r['channels_ge_6']:5d} {r['channels_ge_20x_median']:8d}")
    return "\n".join(lines)
