"""The native library's ABI on the Python side, declared once: the version, the ctypes
mirrors of the structs and every function's argument and return types.

It mirrors ``slimformer.h`` field for field and prototype for prototype;
``tests/kernels/test_abi.py`` parses the header and fails when they differ. When the
header changes, change this file the same way and bump :data:`ABI_VERSION` with
``SF_ABI_VERSION`` (the loader refuses a library whose ``sf_abi_version()`` differs).
Structs only grow at the end.
"""

from __future__ import annotations

import ctypes

ABI_VERSION = 3

P = ctypes.c_void_p
I32 = ctypes.c_int32
I64 = ctypes.c_int64
INT = ctypes.c_int
F32 = ctypes.c_float

# sf_cpu_features() bits and the ISAs of sf_set_isa (as in slimformer.h)
CPU_FEATURES = {"avx2": 1 << 0, "fma": 1 << 1, "f16c": 1 << 2, "avx512f": 1 << 3, "avx512bw": 1 << 4,
                "avx512vl": 1 << 5, "avx512dq": 1 << 6, "avx512vnni": 1 << 7}
ISAS = {"avx2": 1, "avx512": 2}  # best last
ISA_NEEDS = {"avx2": ("avx2", "fma", "f16c"),
             "avx512": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq")}


class CLinear(ctypes.Structure):
    _fields_ = [("kind", I32), ("N", I32), ("K", I32), ("gs", I32), ("half", I32), ("w", P), ("scale", P),
                ("minv", P), ("zero", P), ("bias", P), ("corr", P)]


class CLayer(ctypes.Structure):
    _fields_ = [("attn_norm", P), ("qkv", CLinear), ("o", CLinear), ("mlp_norm", P), ("gate_up", CLinear),
                ("down", CLinear),
                # appended in ABI 2: Qwen3 per-head q/k norm (null: none), sliding window (0: none)
                ("q_norm", P), ("k_norm", P), ("window", ctypes.c_int32)]


class CScratch(ctypes.Structure):
    _fields_ = [(n, P) for n in ("h", "xg", "xb", "qx", "sx", "qsum")]


class CModel(ctypes.Structure):
    _fields_ = [(n, I32) for n in ("n_layers", "hidden", "n_heads", "n_kv", "head_dim", "inter", "vocab",
                                   "max_len", "max_batch", "max_pos")] + [
        ("eps", F32), ("act8", I32), ("n_scratch", I32), ("layers", P), ("final_norm", P), ("lm_head", CLinear),
        ("embed", CLinear), ("rope_cos", P), ("rope_sin", P), ("k_cache", P), ("v_cache", P), ("x", P),
        ("qkv", P), ("att", P), ("gu", P), ("act", P), ("scores", P), ("scratch", P)]


STRUCTS = {"SfLinear": CLinear, "SfLayer": CLayer, "SfScratch": CScratch, "SfModel": CModel}

# name -> (restype, argtypes); every pointer is passed as c_void_p (an int address)
FUNCTIONS: dict[str, tuple[type | None, list[type]]] = {
    # library
    "sf_abi_version": (INT, []),
    "sf_cpu_features": (INT, []),
    "sf_isa_supported": (INT, [INT]),
    "sf_set_isa": (INT, [INT]),
    "sf_get_isa": (INT, []),
    "sf_zq_has_vnni": (INT, []),
    "sf_threads_probe": (INT, [INT]),
    # kernels
    "sf_w8_linear": (None, [P, P, P, P, P, P, I64, I64, I64, INT]),
    "sf_w8_dequant": (None, [P, P, P, P, I64, I64, INT]),
    "sf_w4_linear": (None, [P, P, P, P, P, P, I64, I64, I64, I64, INT]),
    "sf_w4_dequant": (None, [P, P, P, P, I64, I64, I64, INT]),
    "sf_quant_act": (None, [P, P, P, P, I64, I64]),
    "sf_w8a8_linear": (None, [P, P, P, P, P, P, P, P, I64, I64, I64, INT]),
    "sf_w8a8_rescale": (None, [P, P, P, P, P, P, P, I64, I64, INT]),
    "sf_zq_quant_act": (None, [P, P, P, I64, I64, INT]),
    "sf_zq_linear": (None, [P, P, P, P, P, I64, I64, I64, I64, INT]),
    "sf_zqv_linear": (None, [P, P, P, P, P, I64, I64, I64, I64, INT]),
    "sf_zq_accumulate": (None, [P, P, P, P, P, I64, I64, INT, INT, INT]),
    # decode step
    "sf_decode_step": (None, [P, INT, P, P, P, INT]),
    "sf_linear": (None, [P, P, P, INT, P, INT]),
    "sf_dequant_rows": (None, [P, INT, INT, P, INT]),
}


def declare(lib: ctypes.CDLL) -> None:
    """Set argtypes/restype of every exported function on a loaded library."""
    for name, (res, args) in FUNCTIONS.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = list(args), res
