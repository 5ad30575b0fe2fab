"""Build slimformer's one native library (``kernels.cpp`` + ``decoder.cpp``, one copy
per instruction set, and ``dispatch.cpp``) with g++, cache it, check it and load it.

Why not ``torch.utils.cpp_extension.load``: the library needs no torch headers, and
including them makes the first compile take ~40 s on a 2-core machine (plus a
``ninja`` dependency); plain g++ runs take seconds. ``python -m slimformer.kernels``
builds at install time (``make setup``); a first use without it compiles then.

The cache (``<cache root>/kernels``, see :mod:`slimformer.util.cache`) holds
``libslimformer_<key>.so``, where the key hashes every source and header of this
directory, the flags, the compiler's path and its ``--version``. A cached file is
loaded only when it is ours (see :func:`untrusted_reason`): owned by this user, not
group/world-writable (nor its directory), and its bytes match the sha256 recorded in
the ``.sha256`` sidecar written at build time. Otherwise one warning names the file
and the reason and the library is rebuilt; the suspect file is never loaded. Builds
go to temporary names renamed into place (sidecar first), under a file lock, so
concurrent first uses neither see a half-written file nor build twice.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

from slimformer.kernels import abi
from slimformer.util.cache import cache_root

_DIR = Path(__file__).parent
SOURCES = ("slimformer.h", "simd.h", "kernels.cpp", "decoder.cpp", "dispatch.cpp")
# -ffp-contract=off: a written a * b + c stays two roundings (as torch computes the
# reference dequantisation); explicit FMA intrinsics are unaffected.
COMMON_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-fPIC", "-std=c++17"]
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
}
# dispatch.cpp gets no -m flags: it detects the CPU, so it must run on any x86-64.
UNITS = [("dispatch.cpp", None)] + [(src, isa) for src in ("kernels.cpp", "decoder.cpp") for isa in ISA_FLAGS]
LINK_FLAGS = ["-shared", "-fopenmp", "-Wl,-z,defs"]
_ABI_TAG = b"SLIMFORMER_ABI_VERSION=%d;"
_lock = threading.RLock()


class BuildError(RuntimeError):
    """The library could not be built or loaded (no compiler, failed compile, ...)."""


def cache_dir() -> Path:
    return cache_root() / "kernels"


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@functools.lru_cache(maxsize=8)
def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"cannot run the C++ compiler {cxx}: {exc}") from exc


def _unit_flags(isa: str | None) -> list[str]:
    return COMMON_FLAGS + ([] if isa is None else ISA_FLAGS[isa] + [f"-DSF_NS=sf_{isa}"])


def build_key(cxx: str) -> str:
    """Hash of every source and header here, every flag, the compiler and its version."""
    h = hashlib.sha256()
    for p in sorted(list(_DIR.glob("*.cpp")) + list(_DIR.glob("*.h"))):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(repr([(src, _unit_flags(isa)) for src, isa in UNITS] + LINK_FLAGS).encode())
    h.update(cxx.encode() + b"\0" + _compiler_version(cxx).encode())
    return h.hexdigest()[:20]


def library_path(cxx: str | None = None) -> Path:
    cxx = cxx or compiler()
    if cxx is None:
        raise BuildError("no C++ compiler (g++) found")
    return cache_dir() / f"libslimformer_{build_key(cxx)}.so"


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


# ----------------------------------------------------------------------- trust
def _unsafe_mode(st: os.stat_result) -> str | None:
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not by you ({os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"group/world-writable (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def untrusted_reason(path: Path) -> str | None:
    """Why the cached library at ``path`` must not be loaded (None: it is ours)."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot stat it ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    why = _unsafe_mode(st)
    if why:
        return why
    why = _unsafe_mode(os.stat(path.parent))
    if why:
        return f"its directory is {why}"
    try:
        recorded = sidecar(path).read_text().split()[0]
    except (OSError, IndexError):
        return "no sha256 sidecar"
    if hashlib.sha256(path.read_bytes()).hexdigest() != recorded:
        return "sha256 differs from the one recorded at build time"
    return None


def _prepare_dir() -> bool:
    """Create the cache dir (0700). True when it had to be made private (then nothing
    already in it is trusted). Raises BuildError when it belongs to someone else."""
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.stat(d)
    if st.st_uid != os.getuid():
        raise BuildError(f"kernel cache {d} is owned by uid {st.st_uid}, not by you: refusing to use it")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        warnings.warn(f"slimformer.kernels: {d} was group/world-writable; made it private and rebuilding "
                      "instead of loading what it holds", RuntimeWarning, stacklevel=4)
        os.chmod(d, 0o700)
        return True
    return False


@contextmanager
def _locked():
    with _lock:
        fd = os.open(cache_dir() / ".build.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


# ----------------------------------------------------------------------- build
def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compile(out: Path, cxx: str) -> None:
    """Compile every unit (in parallel), link, record the sha256, rename into place."""
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    try:
        procs, objs = [], []
        for src, isa in UNITS:
            obj = work / f"{Path(src).stem}_{isa or 'base'}.o"
            cmd = [cxx, *_unit_flags(isa), "-c", str(_DIR / src), "-o", str(obj)]
            procs.append((src, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
            objs.append(str(obj))
        errors = []
        for src, p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                errors.append(f"compiling {src} failed:\n{err[-2000:]}")
        if errors:
            raise BuildError("\n".join(errors))
        so = work / "lib.so"
        proc = subprocess.run([cxx, *objs, *LINK_FLAGS, "-o", str(so)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"linking the kernel library failed:\n{proc.stderr[-2000:]}")
        _install(so, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _install(so: Path, out: Path) -> None:
    """Record ``so``'s sha256 in the sidecar, make it private, rename it to ``out``."""
    os.chmod(so, 0o755)
    # sidecar first: a reader that sees the new .so also sees its hash
    _atomic_write(sidecar(out), hashlib.sha256(so.read_bytes()).hexdigest().encode() + b"\n", 0o644)
    os.replace(so, out)


def _abi_tag_ok(path: Path) -> bool:
    return _ABI_TAG % abi.ABI_VERSION in path.read_bytes()


def build(force: bool = False) -> Path:
    """The path of a trusted, current library, compiling it when needed."""
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler (g++) found")
    force |= _prepare_dir()
    out = library_path(cxx)
    with _locked():
        if out.exists() and not force:
            why = untrusted_reason(out)
            if why is None and not _abi_tag_ok(out):
                why = f"its ABI version is not {abi.ABI_VERSION}"
            if why is None:
                return out
            warnings.warn(f"slimformer.kernels: not loading {out}: {why}; rebuilding", RuntimeWarning, stacklevel=3)
        _compile(out, cxx)
        why = untrusted_reason(out)
        if why is not None:
            raise BuildError(f"freshly built {out} fails the trust check: {why}")
        if not _abi_tag_ok(out):
            raise BuildError(f"{out}: built from slimformer.h with an ABI version other than abi.ABI_VERSION="
                             f"{abi.ABI_VERSION} (update kernels/abi.py with the header)")
        return out


# ----------------------------------------------------------------------- load
def _cpu_supports(lib: ctypes.CDLL, isa: str) -> bool:
    return bool(lib.sf_isa_supported(abi.ISAS[isa]))


def choose_isa(lib: ctypes.CDLL) -> str:
    """``$SLIMFORMER_ISA`` (refused when this CPU lacks it), else the best this CPU runs."""
    want = os.environ.get("SLIMFORMER_ISA", "").strip().lower()
    if want:
        if want not in abi.ISAS:
            raise BuildError(f"SLIMFORMER_ISA={want!r}: choose one of {', '.join(abi.ISAS)}")
        if not _cpu_supports(lib, want):
            raise BuildError(f"SLIMFORMER_ISA={want} but this CPU lacks "
                             f"{'/'.join(f for f in abi.ISA_NEEDS[want] if not has_feature(lib, f))}")
        return want
    for isa in reversed(list(abi.ISAS)):
        if _cpu_supports(lib, isa):
            return isa
    raise BuildError("CPU lacks AVX2/FMA/F16C: the kernels need at least those")


def has_feature(lib: ctypes.CDLL, name: str) -> bool:
    return bool(lib.sf_cpu_features() & abi.CPU_FEATURES[name])



def disabled() -> bool:
    """``SLIMFORMER_DISABLE_KERNELS`` set (to anything but 0): the native library is off."""
    return os.environ.get("SLIMFORMER_DISABLE_KERNELS", "").strip() not in ("", "0")

def load() -> ctypes.CDLL:
    """Build (cached), check and load the library, with every function declared and the
    ISA chosen. Raises BuildError (a RuntimeError) on any failure."""
    if disabled():
        raise BuildError("disabled by SLIMFORMER_DISABLE_KERNELS")
    path = build()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise BuildError(f"cannot load {path}: {exc}") from exc
    abi.declare(lib)
    got = lib.sf_abi_version()
    if got != abi.ABI_VERSION:
        raise BuildError(f"{path} has ABI version {got}, this slimformer expects {abi.ABI_VERSION}")
    isa = choose_isa(lib)
    if lib.sf_set_isa(abi.ISAS[isa]) != 0:
        raise BuildError(f"the library refused instruction set {isa}")
    return lib
