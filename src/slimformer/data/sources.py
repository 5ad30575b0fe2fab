"""Text sources for evaluation and calibration.

``DATA`` is ``pydoc`` (built in: CPython's reference documentation, split into
disjoint calibration and evaluation halves), ``wikitext2`` (Hugging Face dataset,
needs the network), or a path: a text / JSONL file or a directory of them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from slimformer.errors import DataError
from slimformer.util.paths import public_name

Role = Literal["eval", "calib"]
_TEXT_SUFFIXES = (".txt", ".raw", ".tokens", ".md", ".text")


@dataclass(frozen=True)
class TextSource:
    name: str
    text: str

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def describe(self) -> dict:
        return {"name": self.name, "sha256": self.fingerprint, "chars": len(self.text)}


def load_text(data: str, role: Role = "eval") -> TextSource:
    """The text of ``data`` for evaluation or calibration (built-in sources keep the two apart)."""
    if data == "pydoc":
        return _pydoc(role)
    if data == "wikitext2":
        return _wikitext2(role)
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"data not found: {data} (use pydoc, wikitext2, or a text/JSONL file or directory)")
    files = sorted(p for p in path.rglob("*") if p.is_file() and _is_text_file(p)) if path.is_dir() else [path]
    if not files:
        raise DataError(f"no .txt/.raw/.tokens/.jsonl files in {path}")
    text = "\n".join(_read_file(f) for f in files)
    if not text.strip():
        raise DataError(f"data {data} is empty")
    return TextSource(public_name(path), text)


def _is_text_file(path: Path) -> bool:
    return path.suffix in _TEXT_SUFFIXES or path.suffix == ".jsonl"


def _read_file(path: Path) -> str:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    raw = raw.replace("\r\n", "\n")
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{number}: not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{number}: each JSONL line needs a string 'text' field")
        texts.append(record["text"])
    return "\n\n".join(texts)


def _pydoc(role: Role) -> TextSource:
    """CPython's ``pydoc_data.topics``: topics sorted by name; even-numbered ones
    calibrate, odd-numbered ones evaluate. Several topics repeat whole paragraphs
    of others, so each paragraph is kept only where it first appears: the halves
    share no paragraph."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    parts = []
    for index, key in enumerate(sorted(topics)):
        paragraphs = [p for p in topics[key].strip().split("\n\n") if p not in seen]
        seen.update(paragraphs)
        if index % 2 == (0 if role == "calib" else 1) and paragraphs:
            parts.append("\n\n".join(paragraphs))
    return TextSource(f"pydoc:{role}", "\n\n".join(parts))


def _wikitext2(role: Role) -> TextSource:
    try:
        import datasets
    except ImportError:
        raise DataError(
            "wikitext2 needs the 'datasets' package and the network; "
            "or pass the path of a local copy such as wiki.test.raw"
        ) from None
    split = "test" if role == "eval" else "train"
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    except Exception as exc:
        raise DataError(f"cannot load wikitext2 ({split}) from the hub: {str(exc).splitlines()[0]}") from None
    return TextSource(f"wikitext2:{split}", "".join(rows))


def held_out_sentences(text: str, n: int = 256) -> list[str]:
    """Sentences for encoder fidelity: the first ``n`` lines of 5–60 words."""
    lines = [line.strip() for line in text.splitlines()]
    picked = [line for line in lines if 5 <= len(line.split()) <= 60][:n]
    if not picked:
        raise DataError("data holds no lines of 5–60 words to embed")
    return picked
