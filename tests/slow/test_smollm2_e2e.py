"""End to end on the real built-in SmolLM2-135M: compress → save → load → evaluate → compare."""

import json

import pytest
import torch

import slimformer
from slimformer.cli import main
from slimformer.data import eval_windows, load_text, tokenize
from slimformer.eval.perplexity import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return slimformer.load("smollm2-135m")


@pytest.fixture(scope="module")
def windows(smollm2):
    return eval_windows(tokenize(load_text("pydoc"), smollm2[1]), 256, 3)


def test_compress_save_load_is_identical_and_smaller(smollm2, windows, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "w4g64"
    result = slimformer.compress(smollm2, "rtn-w4-g64", out=out, progress=False)
    loaded, _ = slimformer.load(out)
    ids = windows[0][0].unsqueeze(0)
    with torch.inference_mode():
        assert torch.equal(result.model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    fp32_bytes = sum(p.numel() * 4 for p in {id(p): p for p in smollm2[0].parameters()}.values())
    # decoder linears at ~4.5 bits, the tied embedding / LM head (28M params) int8 (QuantizeEmbeddings);
    # it was 0.25-0.40 with the table in fp32
    assert 0.13 < result.stored_bytes / fp32_bytes < 0.20
    meta = json.loads((out / "slimformer.json").read_text())
    assert meta["recipe"].startswith("name: rtn-w4-g64")


def test_quality_ordering_fp32_w8_w4_w3(smollm2, windows):
    ppl = {"fp32": perplexity(smollm2[0], windows, progress=False)["perplexity"]}
    for name in ("rtn-w8", "rtn-w4-g64", "rtn-w3-g64"):
        model = slimformer.compress(smollm2, name, progress=False).model
        ppl[name] = perplexity(model, windows, progress=False)["perplexity"]
    assert ppl["fp32"] < 40
    assert abs(ppl["rtn-w8"] / ppl["fp32"] - 1) < 0.02          # 8-bit is nearly lossless
    assert ppl["rtn-w8"] < ppl["rtn-w4-g64"] < ppl["rtn-w3-g64"]


def test_compare_writes_the_report(tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["--quiet", "compare", "smollm2-135m", "--recipes", "rtn-w8,rtn-w4-g64", "--windows", "2",
                 "--seqlen", "128", "--new-tokens", "4", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["fp32", "rtn-w8", "rtn-w4-g64"]
    for row in report["rows"]:
        assert row["perplexity"] > 1 and row["stored_bytes"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["peak_rss_bytes"] > 100e6
    assert report["rows"][2]["stored_bytes"] < report["rows"][1]["stored_bytes"] < report["rows"][0]["stored_bytes"]
    html = (out / "report.html").read_text()
    assert "rtn-w4-g64" in html and "<svg" in html or "data:image/svg" in html
