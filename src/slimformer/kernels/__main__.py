"""``python -m slimformer.kernels``: build the native library now (``make setup`` runs
it after installing) and say which instruction set it will run with.

Exit status 0 when the library is ready; 1 (with a one-line warning, not a traceback)
when it cannot be built here, e.g. no compiler: then the first use tries again, and
without a library the torch reference paths are used.
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    from slimformer import kernels

    t = time.perf_counter()
    if not kernels.available():
        print(f"warning: slimformer native library not built: {kernels.unavailable_reason()} "
              "(the first use retries; without it the slower reference paths run)", file=sys.stderr)
        return 1
    from slimformer.kernels import _build

    print(f"slimformer native library: {_build.library_path()} ({time.perf_counter() - t:.1f} s)")
    print(f"instruction set: {kernels.isa()} (this CPU supports: {', '.join(kernels.supported_isas())}; "
          f"features: {', '.join(sorted(kernels.cpu_features()))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
