import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Token caches of the test run stay out of $HOME."""
    os.environ.setdefault("SLIMFORMER_CACHE", str(tmp_path_factory.mktemp("slimformer-cache")))
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(params=["avx2", "avx512"])
def isa(request):
    """Run a test once per instruction set the native library has (process-wide switch,
    restored afterwards); skipped where this CPU lacks it, so AVX2-only and AVX-512
    machines each test what they can."""
    from slimformer import kernels

    if not kernels.available():
        pytest.skip(f"kernels unavailable: {kernels.unavailable_reason()}")
    if request.param not in kernels.supported_isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    before = kernels.isa()
    kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa(before)
