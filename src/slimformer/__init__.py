"""slimformer: make transformer models cheaper to run, and measure what it cost and saved."""

from slimformer._version import __version__

__all__ = ["__version__", "load"]


def load(source, dtype="float32", trust_pickle=False):
    """Load ``(model, tokenizer)`` on CPU; see :func:`slimformer.models.load.load`."""
    from slimformer.api import load as _load

    return _load(source, dtype=dtype, trust_pickle=trust_pickle)


def __getattr__(name):
    # The public API lives in api.py; import lazily so `import slimformer` stays fast.
    if name in ("compress", "evaluate", "compare", "train", "generate", "export", "inspect", "bench"):
        from slimformer import api

        return getattr(api, name)
    raise AttributeError(name)
