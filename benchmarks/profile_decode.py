"""Profile behind the issue-4 note: each projection kind over all 30 layers through the
decode kernel (one native_linear call per layer, so ~15 us of Python/ctypes per call is
included), Q4_1 groups of 32 (the GGUF) against int4 g64, plus the LM head.

    python benchmarks/profile_decode.py
"""
import time

import torch

import slimformer

torch.set_num_threads(2)
from slimformer.runtime.decoder import NativeDecoder, gguf_source_path

m, tok = slimformer.load("smollm2-135m")
dg = NativeDecoder.from_model(m, gguf_path=gguf_source_path("smollm2-135m"))
v64 = slimformer.compress((m, tok), "rtn-w4-g64", progress=False).model
d64 = NativeDecoder.from_model(v64, head="int8")
def tm(dec, name):
    s = dec.new_session(1, 8)
    # one projection kind in all 30 layers: weights come from memory, not cache
    lins = [getattr(l, name) for l in dec.layers]
    x = torch.randn(1, lins[0].K)
    for l in lins: dec.native_linear(s, l, x)
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        for l in lins: dec.native_linear(s, l, x)
        ts.append(time.perf_counter() - t)
    t = sorted(ts)[3]; b = sum(l.nbytes() for l in lins)
    return t * 1e3, b / t / 1e9
for name in ("qkv", "gate_up", "down"):
    a = tm(dg, name); b = tm(d64, name)
    print(f"{name:8s} Q4_1 g32: {a[0]:.2f} ms ({a[1]:.1f} GB/s)   int4 g64: {b[0]:.2f} ms ({b[1]:.1f} GB/s)")
for dec, lab in ((dg, "Q8_0 head g32"), (d64, "int8 head per-row")):
    s = dec.new_session(1, 8); x = torch.randn(1, 576); dec.native_linear(s, dec.lm_head, x)
    t = time.perf_counter(); [dec.native_linear(s, dec.lm_head, x) for _ in range(10)]; t = (time.perf_counter() - t) / 10
    print(f"{lab}: {t*1e3:.2f} ms ({dec.lm_head.nbytes()/t/1e9:.1f} GB/s)")
