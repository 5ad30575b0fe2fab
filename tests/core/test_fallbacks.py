"""No silent fallbacks: a layer that will run a slower path than its format asked for is
named in a warning and recorded in the run result, ``slimformer.json`` and the report."""

import json

import pytest

from slimformer import api
from slimformer import kernels
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.report import write_report


def _pair():
    return tiny_model("llama"), tiny_tokenizer()


def test_static_activation_scales_are_recorded_in_the_result_and_the_saved_model(tmp_path):
    out = tmp_path / "static"
    with pytest.warns(RuntimeWarning, match="static activation scales have no kernel"):
        result = api.compress(_pair(), "rtn-w8a8-static", out, calib="pydoc", calib_samples=4, seqlen=32,
                              progress=False)
    assert result.run.fallbacks, "the runner recorded nothing"
    assert all("static activation scales" in line for line in result.run.fallbacks)
    assert result.run.fallbacks[0].startswith("model.layers.0.")
    saved = json.loads((out / "slimformer.json").read_text())
    assert saved["fallbacks"] == result.run.fallbacks


def test_formats_with_kernels_record_no_fallback(tmp_path):
    if not kernels.kernels_available():
        pytest.skip("kernels unavailable on this machine")
    result = api.compress(_pair(), "rtn-w4-g32", progress=False)
    assert result.run.fallbacks == []


def test_kernels_unavailable_is_recorded_for_every_quantised_layer(monkeypatch):
    monkeypatch.setattr(kernels, "kernels_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="kernels unavailable"):
        result = api.compress(_pair(), "rtn-w8", progress=False)
    n_linears = 7 * len(result.model.model.layers)
    # and the tied int8 LM head of the recipe's QuantizeEmbeddings stage
    assert len(result.run.fallbacks) == n_linears + 1
    assert result.run.fallbacks[-1].startswith("lm_head: kernels unavailable")


def test_the_report_lists_the_fallbacks(tmp_path):
    rows = [{"name": "fp32", "recipe": None, "perplexity": 10.0, "stored_bytes": 100},
            {"name": "rtn-w8a8-static", "recipe": "x", "perplexity": 11.0, "stored_bytes": 40,
             "fallbacks": ["model.layers.0.self_attn.q_proj: static activation scales have no kernel"]}]
    write_report(rows, tmp_path, {"model": "tiny", "data": {"name": "pydoc:eval"}, "seqlen": 32, "windows": 1})
    for name in ("report.md", "report.html"):
        assert "static activation scales have no kernel" in (tmp_path / name).read_text()
