"""The exporter registry: named writers that take a loaded model and write it in one format.

An exporter is ``write(model, tokenizer, out, *, overwrite=False, **options) -> Path`` and
must write atomically (a temporary path, then a rename). The registry never imports the
exporters; ``slimformer.plugins`` imports ``export.builtin`` and any third-party plugin.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slimformer.errors import ExportError


@dataclass(frozen=True)
class Exporter:
    name: str
    write: Callable[..., Path]
    description: str          # one line: what loads the output
    options: tuple[str, ...] = ()   # keyword options ``write`` takes besides ``overwrite``
    single_file: bool = False       # ``out`` is a file (GGUF), not a directory


_EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str, description: str, options: tuple[str, ...] = (), single_file: bool = False):
    """Decorator: ``write`` becomes the exporter called ``name``; ``options`` names the
    keyword options it accepts (others are refused before the model loads)."""
    def wrap(write: Callable[..., Path]) -> Callable[..., Path]:
        _EXPORTERS[name] = Exporter(name, write, description, tuple(options), single_file)
        return write
    return wrap


def exporters() -> dict[str, Exporter]:
    return dict(_EXPORTERS)


def exporter(name: str) -> Exporter:
    if name not in _EXPORTERS:
        known = ", ".join(sorted(_EXPORTERS)) or "none: slimformer.plugins.load_builtin() registers the built-in ones"
        raise ExportError(f"unknown export format '{name}' (known: {known})")
    return _EXPORTERS[name]


def check_options(format: str, options: dict) -> None:
    """Refuse an option the exporter called ``format`` does not take (one line)."""
    known = exporter(format).options
    for key in options:
        if key not in known:
            takes = ", ".join(known) if known else "no options"
            raise ExportError(f"export format '{format}' does not take option '{key}' (it takes {takes})")


def export_model(model, tokenizer, out: str | os.PathLike, format: str, *, overwrite: bool = False,
                 **options) -> Path:
    """Write ``model`` to ``out`` with the exporter called ``format``."""
    check_options(format, options)
    return exporter(format).write(model, tokenizer, Path(out), overwrite=overwrite, **options)
