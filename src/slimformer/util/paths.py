"""How results name local files: never by this machine's absolute path."""

from __future__ import annotations

import os
from pathlib import Path


def public_name(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """A name for ``path`` that means the same on another machine: the part after
    ``site-packages/`` for an installed package's file, else the path relative to ``root``
    (default: the working directory) when it lies within it or beside it (``../shared/...``),
    else the file name."""
    path = Path(path).expanduser().absolute()
    parts = path.parts
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1:])
    rel = Path(os.path.relpath(path, Path(root or os.getcwd()).absolute()))
    if rel.parts[:1] != ("..",) or rel.parts[1:2] != ("..",):   # inside root, or one level up at most
        return rel.as_posix()
    return path.name
