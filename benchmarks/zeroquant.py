"""ZeroQuant's fused group-wise W8A8 kernel against the unfused torch path and fp32.

    python benchmarks/zeroquant.py [--repeats 15] [--threads 2] [--out benchmarks/results/zeroquant.json]

SmolLM2-135M projection shapes (K=576 -> N=576/1536/192, K=1536 -> N=576), weights
8-bit symmetric in groups of 64, activations 8-bit dynamic per token, M tokens in
{1, 16, 512}. Variants, timed round-robin (one call of each variant in turn, repeated;
the median per variant), 2 threads:

  fp32         F.linear on the fp32 weight;
  unfused      what torch alone does for this format: fake-quantise x per token,
               dequantise the weight, F.linear (QuantLinear.forward_reference);
  zeroquant    QuantLinear.forward, i.e. kernels.w8a8_group_linear with its own dispatch
               (the best fused kernel, or per-group torch._int_mm from ZQ_INT_MM_MIN_M tokens);
  fused-<isa>  the fused kernel (tokens quantised in its input pass) forced, per
               instruction set this CPU has (avx2, vnni);
  int_mm       the large-M alternative: tokens quantised once by our kernel, one
               torch._int_mm per group, our epilogue applies group and token scales.

The numbers decide kernels.ZQ_INT_MM_MIN_M (when per-group _int_mm replaces the fused kernel).

Also the error of each layer's output against fp32 (relative Frobenius) and the
difference between the kernel and the unfused reference (they compute the same
function; only fp32 summation order differs), and the sum over one decoder layer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timing import round_robin_samples  # noqa: E402

from slimformer import kernels as K  # noqa: E402
from slimformer.formats.spec import ActSpec, WeightSpec  # noqa: E402
from slimformer.nn.quant_linear import QuantLinear  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GROUP = 64
# name: (out N, in K, count per SmolLM2 decoder layer)
SHAPES = {
    "q/o 576x576": (576, 576, 2),
    "gate/up 1536x576": (1536, 576, 2),
    "k/v 192x576": (192, 576, 2),
    "down 576x1536": (576, 1536, 1),
}
TOKENS = (1, 16, 512)


def variants(layer: QuantLinear, weight: torch.Tensor) -> dict:
    isas = ["avx2", "vnni"] if K.zq_isa() == "vnni" else ["avx2"]
    packed = {isa: K.prepare_w8a8_groups(layer.codes(), layer.scale, GROUP, isa=isa) for isa in isas}

    def forced(isa: str, int_mm_from: int | None):
        def run(x):
            saved = K.ZQ_INT_MM_MIN_M
            K.ZQ_INT_MM_MIN_M = {isa: int_mm_from}
            try:
                return K.w8a8_group_linear(x, packed[isa])
            finally:
                K.ZQ_INT_MM_MIN_M = saved
        return run

    out = {
        "fp32": lambda x: F.linear(x, weight),
        "unfused": layer.forward_reference,
        "zeroquant": layer.forward,
    }
    out.update({f"fused-{isa}": forced(isa, None) for isa in isas})
    out["int_mm"] = forced("avx2", 1)  # the layout with row-major q, which per-group _int_mm reads
    return out


def zeroquant_path(m: int) -> str:
    """What QuantLinear.forward runs for m tokens on this CPU."""
    isa = K.zq_isa()
    large = K.ZQ_INT_MM_MIN_M.get(isa)
    return "int_mm" if large is not None and m >= large else f"fused-{isa}"


def round_robin(fns: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median microseconds per call."""
    samples = round_robin_samples(fns, x, repeats, reference="fp32")
    return {name: round(statistics.median(v) * 1e6, 2) for name, v in samples.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "zeroquant.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    K.set_num_threads(args.threads)
    if not K.kernels_available():
        raise SystemExit(f"kernels unavailable: {K.load_error()}")

    results, layer_sum = {}, {}
    for shape, (n, k, count) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        weight = torch.randn(n, k, generator=g) * 0.05
        layer = QuantLinear.from_float(weight, None, WeightSpec(8, True, "group", GROUP), ActSpec(8, True, "token", True))
        fns = variants(layer, weight)
        results[shape] = {"out": n, "in": k}
        for m in TOKENS:
            x = torch.randn(m, k, generator=g)
            times = round_robin(fns, x, args.repeats)
            exact, reference, fast = F.linear(x, weight), layer.forward_reference(x), layer(x)
            row = {
                "median_us": times,
                "zeroquant_path": zeroquant_path(m),
                "speedup_vs_fp32": round(times["fp32"] / times["zeroquant"], 2),
                "speedup_vs_unfused": round(times["unfused"] / times["zeroquant"], 2),
                "rel_error_vs_fp32": round(rel(fast, exact), 5),
                "rel_diff_kernel_vs_unfused": float(f"{rel(fast, reference):.2e}"),
            }
            results[shape][f"M={m}"] = row
            for name, us in times.items():
                layer_sum.setdefault(f"M={m}", {}).setdefault(name, 0.0)
                layer_sum[f"M={m}"][name] += count * us
            print(f"{shape:>18} M={m:<4} " + "  ".join(f"{a}={b:.1f}us" for a, b in times.items()), flush=True)
    for m, sums in layer_sum.items():
        layer_sum[m] = {name: {"sum_us": round(us, 1), "speedup_vs_fp32": round(sums["fp32"] / us, 2)}
                        for name, us in sums.items()}

    from slimformer.models.compressed import library_versions

    payload = {
        "benchmark": "zeroquant",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "zeroquant_isa": K.zq_isa(), "int_mm_from_M": K.ZQ_INT_MM_MIN_M,
                    "loadavg_at_end": os.getloadavg()[0]},
        "versions": library_versions(),
        "protocol": {"weights": f"8-bit symmetric, groups of {GROUP} input columns (fp16 scales)",
                     "activations": "8-bit symmetric, dynamic, per token",
                     "timing": f"round-robin over variants, median of {args.repeats} samples, each >= ~1 ms of calls"},
        "shapes": results,
        "one_smollm2_decoder_layer": layer_sum,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
