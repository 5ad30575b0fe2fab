"""Compile ``_kernels.cpp`` (and the runtime's ``_decoder.cpp``) once with g++ and load them with ctypes.

Why not ``torch.utils.cpp_extension.load``: the kernels need no torch headers, and
including them makes the first compile take ~40 s on a 2-core machine (plus a
``ninja`` dependency); a plain ``g++ -O3 -mavx2 -mfma -fopenmp -shared`` build takes
~2 s. The library is cached under ``~/.cache/slimformer/kernels`` keyed by a hash of
the source and flags, and built to a temporary name then renamed, so concurrent
first uses do not see a half-written file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from slimformer.util.cache import cache_root

_SRC = Path(__file__).with_name("_kernels.cpp")
# -ffp-contract=off: a written a * b + c stays two roundings (as torch computes the
# reference dequantisation); explicit FMA intrinsics are unaffected.
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def cache_dir() -> Path:
    return cache_root() / "kernels"


def cpu_has_avx2_fma() -> bool:
    """AVX2 + FMA (and F16C, which every AVX2 CPU has) — what the kernels are compiled for."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags and " f16c" in flags


def _compile(src_path: Path = _SRC) -> Path:
    src = src_path.read_bytes()
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    key = hashlib.sha256(src + " ".join([cxx, *_FLAGS]).encode()).hexdigest()[:16]
    out = cache_dir() / f"slimformer_{src_path.stem.lstrip('_')}_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *_FLAGS, str(src_path), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {src_path.name} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _declare(lib: ctypes.CDLL) -> None:
    P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    sigs = {
        "sf_w8_linear": [P, P, P, P, P, P, I64, I64, I64, INT],
        "sf_w8_dequant": [P, P, P, P, I64, I64, INT],
        "sf_w4_linear": [P, P, P, P, P, P, I64, I64, I64, I64, INT],
        "sf_w4_dequant": [P, P, P, P, I64, I64, I64, INT],
        "sf_quant_act": [P, P, P, P, I64, I64],
        "sf_w8a8_linear": [P, P, P, P, P, P, P, P, I64, I64, I64, INT],
        "sf_w8a8_rescale": [P, P, P, P, P, P, P, I64, I64, INT],
    }
    for name, args in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = None


def load_library(src_path: Path) -> ctypes.CDLL:
    """Compile (cached) and load another C++ source of the package with the same flags.
    Raises RuntimeError when kernels are disabled, the CPU lacks AVX2/FMA or the build fails."""
    if os.environ.get("SLIMFORMER_DISABLE_KERNELS"):
        raise RuntimeError("disabled by SLIMFORMER_DISABLE_KERNELS")
    if not cpu_has_avx2_fma():
        raise RuntimeError("CPU lacks AVX2/FMA")
    with _lock:
        return ctypes.CDLL(str(_compile(src_path)))


def get_lib() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (reason in :func:`load_error`) when this
    CPU lacks AVX2/FMA or no compiler is available."""
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is None and _error is None:
            try:
                if os.environ.get("SLIMFORMER_DISABLE_KERNELS"):
                    raise RuntimeError("disabled by SLIMFORMER_DISABLE_KERNELS")
                if not cpu_has_avx2_fma():
                    raise RuntimeError("CPU lacks AVX2/FMA")
                lib = ctypes.CDLL(str(_compile()))
                _declare(lib)
                _lib = lib
            except Exception as exc:  # noqa: BLE001 - any failure means: use the reference
                _error = str(exc)
    return _lib


def load_error() -> str | None:
    return _error
