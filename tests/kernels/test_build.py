"""The native library's build cache, trust check, ABI check, ISA choice, thread count
and the switch that disables it.

The trust tests build into a private cache with a stand-in compiler that copies the
library this session already built (a real, loadable .so) through the real install
step (sidecar + rename), so they cost no compile."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import stat
import warnings

import pytest
import torch

from slimformer import kernels as K
from slimformer.kernels import _build, abi

pytestmark = pytest.mark.skipif(not K.available(), reason=f"kernels unavailable: {K.unavailable_reason()}")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A fresh cache dir and a copying stand-in for the compiler; yields the call list."""
    real = K.library()._name  # the library this process loaded
    calls = []

    def fake_compile(out, cxx):
        calls.append(out)
        tmp = out.with_name(".fake.so")
        shutil.copyfile(real, tmp)
        _build._install(tmp, out)

    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_build, "_compile", fake_compile)
    return calls


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cache_key_covers_every_source_and_header():
    names = {p.name for p in _build._DIR.glob("*") if p.suffix in (".cpp", ".h")}
    assert names == set(_build.SOURCES)
    key = _build.build_key(_build.compiler())
    assert key == _build.build_key(_build.compiler())
    assert _build.library_path().name == f"libslimformer_{key}.so"
    assert K.library()._name.endswith(_build.library_path().name)


def test_key_changes_with_a_header(monkeypatch):
    cxx = _build.compiler()
    before = _build.build_key(cxx)
    real = _build.Path.read_bytes

    def patched(self):
        data = real(self)
        return data + b"// changed" if self.name == "simd.h" else data

    monkeypatch.setattr(_build.Path, "read_bytes", patched)
    assert _build.build_key(cxx) != before


def test_fresh_build_is_trusted_and_reused(private_cache):
    path = _build.build()
    assert private_cache == [path]
    assert _build.untrusted_reason(path) is None
    assert _build.sidecar(path).read_text().strip() == _sha(path)
    assert not os.stat(path).st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    assert _build.build() == path and len(private_cache) == 1  # cached: no second build


def test_tampered_library_is_rebuilt_not_loaded(private_cache, monkeypatch):
    path = _build.build()
    good = _sha(path)
    with open(path, "ab") as f:
        f.write(b"\0")
    assert "sha256" in _build.untrusted_reason(path)
    loaded = []
    real_cdll = ctypes.CDLL
    monkeypatch.setattr(_build.ctypes, "CDLL", lambda p, *a, **k: (loaded.append(_sha(_build.Path(p))),
                                                                     real_cdll(p, *a, **k))[1])
    with pytest.warns(RuntimeWarning, match=f"not loading {path}: sha256 differs"):
        lib = _build.load()
    assert len(private_cache) == 2  # rebuilt
    assert loaded == [good]  # only the rebuilt file was loaded
    assert lib.sf_abi_version() == abi.ABI_VERSION


@pytest.mark.parametrize("bits", [stat.S_IWOTH, stat.S_IWGRP])
def test_writable_library_is_refused(private_cache, bits):
    path = _build.build()
    os.chmod(path, os.stat(path).st_mode | bits)
    assert "group/world-writable" in _build.untrusted_reason(path)
    with pytest.warns(RuntimeWarning, match=r"group/world-writable \(mode \d+\); rebuilding"):
        _build.build()
    assert len(private_cache) == 2 and _build.untrusted_reason(path) is None


def test_writable_directory_distrusts_its_files(private_cache):
    path = _build.build()
    os.chmod(path.parent, 0o777)
    assert "directory" in _build.untrusted_reason(path)
    with pytest.warns(RuntimeWarning, match="group/world-writable"):
        _build.build()
    assert len(private_cache) == 2
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


def test_missing_sidecar_rebuilds(private_cache):
    path = _build.build()
    _build.sidecar(path).unlink()
    with pytest.warns(RuntimeWarning, match="no sha256 sidecar"):
        _build.build()
    assert len(private_cache) == 2


def test_abi_mismatch_rebuilds_once_then_errors(private_cache, monkeypatch):
    _build.build()
    monkeypatch.setattr(abi, "ABI_VERSION", abi.ABI_VERSION + 1)
    with pytest.warns(RuntimeWarning, match="ABI version"), pytest.raises(_build.BuildError, match="ABI version"):
        _build.build()
    assert len(private_cache) == 2


def test_no_compiler_is_a_reason_not_an_exception(monkeypatch):
    monkeypatch.setattr(_build, "compiler", lambda: None)
    monkeypatch.setenv("SLIMFORMER_CACHE", "/nonexistent-for-this-test")
    K._reset()
    try:
        assert not K.available()
        assert "no C++ compiler" in K.unavailable_reason()
        with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
            K.library()
    finally:
        monkeypatch.undo()
        K._reset()
    assert K.available()


# ----------------------------------------------------------------------- switches
@pytest.fixture
def reload(monkeypatch):
    """Reload the library under changed environment; the original comes back afterwards."""
    yield lambda: K._reset()
    monkeypatch.undo()
    K._reset()
    assert K.available()


def test_disable_switch(monkeypatch, reload):
    monkeypatch.setenv("SLIMFORMER_DISABLE_KERNELS", "1")
    reload()
    assert not K.available()
    assert "SLIMFORMER_DISABLE_KERNELS" in K.unavailable_reason()
    packed = K.prepare_int8(torch.randint(0, 256, (4, 32), dtype=torch.uint8), torch.ones(4, 1))
    with pytest.warns(RuntimeWarning, match="reference path"):
        y = K.int8_linear(torch.randn(2, 32), packed)
    assert y.shape == (2, 4)


def test_isa_override(monkeypatch, reload):
    for name in K.supported_isas():
        monkeypatch.setenv("SLIMFORMER_ISA", name)
        reload()
        assert K.isa() == name


def test_isa_override_refused_when_cpu_lacks_it(monkeypatch, reload):
    monkeypatch.setenv("SLIMFORMER_ISA", "avx512")
    monkeypatch.setattr(_build, "_cpu_supports", lambda lib, isa: isa == "avx2")
    reload()
    assert not K.available()
    assert "SLIMFORMER_ISA=avx512 but this CPU lacks" in K.unavailable_reason()
    monkeypatch.setenv("SLIMFORMER_ISA", "sse2")
    reload()
    assert "choose one of avx2, avx512" in K.unavailable_reason()


def test_default_isa_is_the_best_supported():
    assert K.isa() == K.supported_isas()[-1]
    assert "avx2" in K.cpu_features() and "fma" in K.cpu_features()
    with pytest.raises(ValueError):
        K.set_isa("neon")


# ----------------------------------------------------------------------- threads
@pytest.mark.parametrize("n", [1, 2])
def test_kernel_threads_follow_torch(n, monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        assert K.num_threads() == n
        lib = K.library()
        assert lib.sf_threads_probe(K.num_threads()) == n
        seen = []
        real = lib.sf_w8_linear
        monkeypatch.setattr(lib, "sf_w8_linear", lambda *a: (seen.append(a[-1]), real(*a))[1])
        packed = K.prepare_int8(torch.randint(0, 256, (64, 64), dtype=torch.uint8), torch.ones(64, 1))
        K.int8_linear(torch.randn(1, 64), packed)
        assert seen == [n]
    finally:
        torch.set_num_threads(before)


def test_set_num_threads_overrides_then_follows_torch_again():
    try:
        K.set_num_threads(3)
        assert K.num_threads() == 3
    finally:
        K.set_num_threads(None)
    assert K.num_threads() == torch.get_num_threads()
