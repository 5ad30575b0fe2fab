"""Where slimformer caches derived files (token ids, compiled kernels)."""

import os
from pathlib import Path


def cache_root() -> Path:
    """``$SLIMFORMER_CACHE``, else ``$XDG_CACHE_HOME/slimformer``, else ``~/.cache/slimformer``."""
    explicit = os.environ.get("SLIMFORMER_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slimformer"
