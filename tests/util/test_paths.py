"""Results name files so the name means the same on another machine."""

import json
from pathlib import Path

from slimformer.data import load_text
from slimformer.util.paths import public_name

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_public_name_is_relative_inside_or_beside_the_root(tmp_path):
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    (tmp_path / "shared").mkdir()
    assert public_name(root / "data" / "a.txt", root) == "data/a.txt"
    assert public_name(tmp_path / "shared" / "b.raw", root) == "../shared/b.raw"
    assert public_name("/opt/x/lib/python3.11/site-packages/pkg/model.gguf", root) == "pkg/model.gguf"
    assert public_name(tmp_path.parent / "elsewhere" / "c.txt", root / "data") == "c.txt"


def test_data_read_from_a_file_is_not_named_by_its_absolute_path(tmp_path, monkeypatch):
    path = tmp_path / "corpus" / "text.txt"
    path.parent.mkdir()
    path.write_text("some words " * 50)
    monkeypatch.chdir(tmp_path)
    assert load_text(str(path)).describe()["name"] == "corpus/text.txt"


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_committed_results_name_no_absolute_path():
    for path in sorted(RESULTS.glob("*.json")):
        for text in _strings(json.loads(path.read_text())):
            assert not (text.startswith("/") and text.count("/") > 1), f"{path.name}: {text}"
