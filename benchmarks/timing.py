"""Side-by-side timing shared by the benchmarks: variants called round-robin, so drift in
the machine's load reaches every variant alike."""

from __future__ import annotations

import time


def round_robin_samples(fns: dict, x, repeats: int, reference: str) -> dict[str, list[float]]:
    """Seconds per call, ``repeats`` samples per variant; each round calls every variant once
    (after a warm-up). Each sample repeats the call enough times to last ~1 ms (as long as
    ``fns[reference]`` takes), above the timer's resolution and scheduler noise."""
    for fn in fns.values():
        fn(x)
        fn(x)
    t = time.perf_counter()
    fns[reference](x)
    inner = max(1, int(1e-3 / max(time.perf_counter() - t, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(inner):
                fn(x)
            samples[name].append((time.perf_counter() - t) / inner)
    return samples
