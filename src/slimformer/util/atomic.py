"""Write outputs to a temporary path and rename, so a failure never leaves half a result."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from slimformer.errors import OutputExistsError


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing output (a directory, or a file for single-file formats such as
    GGUF) unless ``overwrite``."""
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        what = "directory" if out.is_dir() else "file"
        raise OutputExistsError(f"output {what} {out} exists; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary path next to ``out`` (not yet created); on success it replaces
    ``out`` by one rename, on failure it is removed (``out`` is left as it was)."""
    out = Path(out)
    check_output_dir(out, overwrite)
    if out.is_dir() and not out.is_symlink():
        raise OutputExistsError(f"output {out} is a directory; this format writes one file")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes it private (0600)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary sibling directory; on success it replaces ``out``."""
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp makes it private (0700); the result is an ordinary directory
    try:
        yield tmp
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)) / "old"
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)   # put the previous result back
                raise
            finally:
                shutil.rmtree(old.parent, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes it private (0600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def publish_into(tmp: Path, out: Path, last: str) -> None:
    """Move every file of the finished directory ``tmp`` into ``out`` (which may hold other
    things, e.g. training checkpoints), each by an atomic rename, ``last`` at the end: until
    that marker lands, ``out`` holds no loadable result. ``tmp`` is removed."""
    out.mkdir(parents=True, exist_ok=True)
    stale = out / last
    if stale.exists():
        stale.unlink()   # the old result stops being loadable before its files change
    entries = sorted(tmp.iterdir(), key=lambda p: p.name == last)
    for entry in entries:
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    shutil.rmtree(tmp, ignore_errors=True)
