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


def inspect_model(model, tokenizer, args) -> dict:
    info = describe(model)
    print("\n".join(f"{k:22s} {v}" for k, v in info.items()))
    result = {"model": info}
    if args.kv_plan:
        shape = ModelShape.from_config(model.config, info["parameters"])
        result["kv_plan"] = plan(shape, args.batch, args.context, kv_bytes_per_value=args.kv_bytes)
        p = result["kv_plan"]
        print(f"\nmemory plan: batch {args.batch}, context {args.context}")
        print(f"  weights   {p['weight_bytes'] / 1e9:10.3f} GB (2 bytes/param)")
        print(f"  KV cache  {p['kv_cache_bytes'] / 1e9:10.3f} GB ({p['kv_bytes_per_token']:,} bytes/token)")
        print(f"  KV/weights {p['kv_to_weights']:.2f}×")
    if args.outliers:
        from slimformer.data import calibration_set
        from slimformer.eval.outliers import channel_absmax, outlier_table

        calib, meta = calibration_set(tokenizer, args.calib, args.calib_samples, args.seqlen, None)
        rows = outlier_table(channel_absmax(model, calib, progress=not args.quiet))
        result["outliers"] = {"calibration": meta, "layers": rows}
        print(f"\n{'layer':44s} {'max|x|':>9s} {'median':>8s} {'≥6':>5s} {'≥20×med':>8s}")
        for r in rows:
            print(f"{r['layer']:44s} {r['max_abs']:9.2f} {r['median_channel_max']:8.3f} "
                  f"{r['channels_ge_6']:5d} {r['channels_ge_20x_median']:8d}")
    return result
