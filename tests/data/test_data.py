import pytest
import torch

from slimformer.data import calibration_samples, eval_windows, load_text, tokenize
from slimformer.errors import DataError
from slimformer.models.tiny import tiny_tokenizer


def test_pydoc_halves_are_disjoint_and_deterministic():
    calib, evaluation = load_text("pydoc", "calib"), load_text("pydoc", "eval")
    assert calib.fingerprint != evaluation.fingerprint
    assert load_text("pydoc", "eval").fingerprint == evaluation.fingerprint
    calib_paragraphs = set(calib.text.split("\n\n"))
    shared = [p for p in evaluation.text.split("\n\n") if p in calib_paragraphs and len(p) > 200]
    assert not shared


def test_text_jsonl_and_directories(tmp_path):
    (tmp_path / "a.txt").write_text("first file\r\nline two\n")
    (tmp_path / "b.jsonl").write_text('{"text": "from json"}\n\n{"text": "second"}\n')
    assert load_text(str(tmp_path / "a.txt")).text == "first file\nline two\n"
    assert load_text(str(tmp_path / "b.jsonl")).text == "from json\n\nsecond"
    combined = load_text(str(tmp_path)).text
    assert "first file" in combined and "second" in combined


@pytest.mark.parametrize("content", ["", "   \n", '{"no_text": 1}\n', "not json\n"])
def test_bad_data_is_a_data_error(tmp_path, content):
    path = tmp_path / ("d.jsonl" if content.strip() and content != "   \n" else "d.txt")
    path.write_text(content)
    with pytest.raises(DataError):
        load_text(str(path))


def test_tokenize_caches_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path))
    from slimformer.data import tokens

    tokens._MEMORY_CACHE.clear()
    source = load_text("pydoc", "calib")
    first = tokenize(source, tiny_tokenizer())
    assert list((tmp_path / "tokens").glob("*.npy"))
    tokens._MEMORY_CACHE.clear()
    assert torch.equal(tokenize(source, tiny_tokenizer()), first)


def test_windows_and_calibration_samples():
    stream = torch.arange(1000)
    windows = eval_windows(stream, 100, n=5)
    assert [int(w[0]) for w, _ in windows] == [0, 100, 200, 300, 400]
    assert calibration_samples(stream, 3, 10).tolist()[1] == list(range(10, 20))
    seeded = calibration_samples(stream, 4, 10, seed=7)
    assert torch.equal(seeded, calibration_samples(stream, 4, 10, seed=7))
    assert not torch.equal(seeded, calibration_samples(stream, 4, 10, seed=8))
    with pytest.raises(DataError, match="only 10 windows"):
        eval_windows(stream, 100, n=11)
    with pytest.raises(DataError):
        calibration_samples(stream, 20, 100)
