"""Benchmark slimformer.kernels against fp32 F.linear on SmolLM2-135M shapes.

    python benchmarks/kernels.py [--quick] [--out benchmarks/results/kernels.json]

Per shape and M (1 = decode matvec, 512 = prefill): median time over >= 5 runs
after warm-up, 2 threads, for fp32 / int8 / int4-g32-asym / int4-g64-sym / W8A8,
plus numba versions of the int8 and int4 matvec (when numba is installed) — the
measurement behind choosing C++ for the kernels. Also bytes of weight read per
matvec, achieved GB/s, a measured streaming-read bandwidth (sum over a 1 GiB fp32
buffer), the sum over one decoder layer x30 + LM head, and a "cold" decode pass
over 30 distinct layers' weights + LM head (weights stream from DRAM, as in real
decoding; the per-shape numbers re-read one weight, which may sit in L2/L3).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from slimformer import kernels as K  # noqa: E402
from slimformer.formats.primitives import quantize_weight  # noqa: E402
from slimformer.formats.spec import WeightSpec  # noqa: E402

THREADS = 2
HIDDEN, KV, INTER, VOCAB, LAYERS = 576, 192, 1536, 49152, 30
# name: (out, in, count per decoder layer)
SHAPES = {
    "q/o 576x576": (HIDDEN, HIDDEN, 2),
    "k/v 192x576": (KV, HIDDEN, 2),
    "gate/up 1536x576": (INTER, HIDDEN, 2),
    "down 576x1536": (HIDDEN, INTER, 1),
    "lm_head 49152x576": (VOCAB, HIDDEN, 0),
}
KERNELS = ["fp32", "int8", "int4-g32-asym", "int4-g64-sym", "w8a8"]

try:
    import numba
    import numpy as np
    from numba import njit, prange

    @njit(parallel=True, fastmath=True, cache=True)
    def nb_int8_gemv(q, scale, corr, x, y):
        n_out, k_in = q.shape
        xs = x.sum()
        for n in prange(n_out):
            acc = np.float32(0.0)
            for k in range(k_in):
                acc += np.float32(q[n, k]) * x[k]
            y[n] = scale[n] * (acc + corr[n] * xs)

    @njit(parallel=True, fastmath=True, cache=True)
    def nb_int4_gemv(pk, scale, zo, x, gs, y):
        n_out = pk.shape[0]
        k_in = pk.shape[1] * 2
        n_g = k_in // gs
        xg = np.empty(n_g, np.float32)
        for g in range(n_g):
            xg[g] = x[g * gs:(g + 1) * gs].sum()
        for n in prange(n_out):
            tot = np.float32(0.0)
            for g in range(n_g):
                acc = np.float32(0.0)
                for b in range(g * gs // 32, (g + 1) * gs // 32):  # the Q4 layout: 32 codes in 16 bytes
                    for j in range(16):
                        v = pk[n, b * 16 + j]
                        acc += np.float32(v & 15) * x[b * 32 + j] + np.float32(v >> 4) * x[b * 32 + 16 + j]
                tot += scale[n, g] * (acc - np.float32(zo[n, g]) * xg[g])
            y[n] = tot
except ImportError:  # numba is optional: only this comparison needs it
    numba = None


def median_s(fn, runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def stream_bandwidth_gbs(runs: int) -> float:
    buf = torch.ones(256 * 1024 * 1024)  # 1 GiB fp32
    t = median_s(lambda: buf.sum(), runs, warmup=1)
    del buf
    return (1 << 30) / t / 1e9


def make_weights(n: int, k: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    c8, s8, _ = quantize_weight(w, WeightSpec(8, True, "channel"))
    c4a, s4a, z4a = quantize_weight(w, WeightSpec(4, False, "group", 32))
    c4s, s4s, _ = quantize_weight(w, WeightSpec(4, True, "group", 64))
    p8 = K.prepare_int8(c8, s8, None, 8, True)
    return {
        "fp32": w,
        "int8": p8,
        "int4-g32-asym": K.prepare_int4(c4a, s4a, z4a, 32, False),
        "int4-g64-sym": K.prepare_int4(c4s, s4s, None, 64, True),
        "w8a8": p8,
    }


def call(kind: str, x: torch.Tensor, w):
    if kind == "fp32":
        return F.linear(x, w)
    if kind == "int8":
        return K.int8_linear(x, w)
    if kind == "w8a8":
        return K.w8a8_linear(x, w)
    return K.int4_linear(x, w)


def weight_bytes(kind: str, w) -> int:
    return w.numel() * 4 if kind == "fp32" else w.nbytes()


def bench_shapes(ms, quick: bool) -> dict:
    out = {}
    for name, (n, k, _) in SHAPES.items():
        ws = make_weights(n, k)
        entry = {"out": n, "in": k}
        for m in ms:
            x = torch.randn(m, k)
            runs = 5 if (m > 1 and n == VOCAB) else (7 if m > 1 else (10 if quick else 50))
            row = {}
            for kind in KERNELS:
                t = median_s(lambda: call(kind, x, ws[kind]), runs)
                nbytes = weight_bytes(kind, ws[kind])
                row[kind] = {"median_us": round(t * 1e6, 1), "weight_bytes": nbytes}
                if m == 1:
                    row[kind]["GBps"] = round(nbytes / t / 1e9, 2)
            if m == 1 and numba is not None:
                x1 = x[0].numpy()
                p8, p4 = ws["int8"], ws["int4-g32-asym"]
                y = np.empty(n, np.float32)
                a8 = (p8.q.numpy(), p8.scale.numpy(), p8.corr.numpy())
                a4 = (p4.packed.numpy(), p4.scale.numpy(), p4.zo.numpy())
                row["numba-int8"] = {"median_us": round(median_s(lambda: nb_int8_gemv(*a8, x1, y), runs) * 1e6, 1)}
                row["numba-int4-g32-asym"] = {
                    "median_us": round(median_s(lambda: nb_int4_gemv(*a4, x1, 32, y), runs) * 1e6, 1)}
            base = row["fp32"]["median_us"]
            for kind, r in row.items():
                r["speedup_vs_fp32"] = round(base / r["median_us"], 2)
            entry[f"M={m}"] = row
            print(f"{name:18s} M={m:<4d} " + "  ".join(f"{kd} {r['median_us']:.0f}us" for kd, r in row.items()),
                  flush=True)
        out[name] = entry
    return out


def model_sum(shapes: dict, ms) -> dict:
    res = {}
    for m in ms:
        kinds = [kd for kd in shapes["q/o 576x576"][f"M={m}"]]
        tot = {}
        for kind in kinds:
            t = 0.0
            for name, (_, _, per_layer) in SHAPES.items():
                count = per_layer * LAYERS if per_layer else 1
                t += count * shapes[name][f"M={m}"][kind]["median_us"]
            tot[kind] = {"sum_us": round(t, 1)}
        for kind in kinds:
            tot[kind]["speedup_vs_fp32"] = round(tot["fp32"]["sum_us"] / tot[kind]["sum_us"], 2)
        res[f"M={m}"] = tot
    return res


def cold_decode_pass(runs: int) -> dict:
    """One token through 30 distinct layers' linears + LM head (weights from DRAM)."""
    res = {}
    protos = {name: make_weights(n, k) for name, (n, k, _) in SHAPES.items()}
    for kind in KERNELS:
        seq = []
        nbytes = 0
        for _ in range(LAYERS):
            for name, (n, k, per_layer) in SHAPES.items():
                for _ in range(per_layer):
                    w = protos[name][kind]
                    w = w.clone() if kind == "fp32" else _clone_packed(w)
                    seq.append((k, w))
                    nbytes += weight_bytes(kind, w)
        seq.append((HIDDEN, protos["lm_head 49152x576"][kind]))
        nbytes += weight_bytes(kind, seq[-1][1])
        xs = {HIDDEN: torch.randn(1, HIDDEN), INTER: torch.randn(1, INTER)}

        def run():
            for k, w in seq:
                call(kind, xs[k], w)

        t = median_s(run, runs, warmup=1)
        res[kind] = {"median_ms": round(t * 1e3, 2), "weight_bytes": nbytes, "GBps": round(nbytes / t / 1e9, 2)}
        del seq
        print(f"cold decode pass {kind}: {t * 1e3:.2f} ms, {nbytes / t / 1e9:.1f} GB/s", flush=True)
    for kind in KERNELS:
        res[kind]["speedup_vs_fp32"] = round(res["fp32"]["median_ms"] / res[kind]["median_ms"], 2)
    return res


def _clone_packed(p):
    import dataclasses

    return dataclasses.replace(p, **{f.name: getattr(p, f.name).clone() for f in dataclasses.fields(p)
                                     if isinstance(getattr(p, f.name), torch.Tensor)})


def compile_time_s() -> float:
    """First-use build of the kernel library into an empty cache."""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, SLIMFORMER_CACHE=d)
        code = "import time;t=time.perf_counter();from slimformer.kernels import get_lib;" \
               "assert get_lib() is not None;print(time.perf_counter()-t)"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return round(float(out.stdout.strip().splitlines()[-1]), 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels.json"))
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    K.set_num_threads(THREADS)
    if numba is not None:
        numba.set_num_threads(THREADS)
    assert K.kernels_available(), K.load_error()
    ms = [1, 512]
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": THREADS,
                    "torch": torch.__version__, "numba": getattr(numba, "__version__", None),
                    "nice": os.nice(0)},
        "note": args.note,
        "compile_time_s": compile_time_s(),
        "stream_read_GBps": round(stream_bandwidth_gbs(3 if args.quick else 5), 2),
    }
    print(f"streaming read bandwidth: {result['stream_read_GBps']} GB/s; compile {result['compile_time_s']} s")
    shapes = bench_shapes(ms, args.quick)
    result["shapes"] = shapes
    result["model_sum_30_layers_plus_lm_head"] = model_sum(shapes, ms)
    result["cold_decode_pass_M1"] = cold_decode_pass(3 if args.quick else 7)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["model_sum_30_layers_plus_lm_head"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
