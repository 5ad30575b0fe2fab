"""Tests for slimformer.report: Pareto frontier and the three report files."""

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimformer.report import pareto_front, plots, write_report

FILES = {"report.json", "report.md", "report.html"}


# ---------------------------------------------------------------- pareto_front

def _dominates(a, b):
    """a dominates b: no worse on both axes, strictly better on one."""
    return a[1] <= b[1] and a[2] <= b[2] and (a[1] < b[1] or a[2] < b[2])


# Small integer coordinates make ties and duplicates common.
coord = st.one_of(st.integers(0, 6).map(float), st.none())
points_st = st.lists(st.tuples(st.just(""), coord, coord), max_size=12).map(
    lambda pts: [(f"p{i}", x, y) for i, (_, x, y) in enumerate(pts)]
)


@settings(max_examples=200, deadline=None)
@given(points_st)
def test_pareto_front_properties(points):
    front = set(pareto_front(points))
    valid = [p for p in points if p[1] is not None and p[2] is not None]
    assert front <= {p[0] for p in valid}  # None coordinates never make the front
    on = [p for p in valid if p[0] in front]
    off = [p for p in valid if p[0] not in front]
    for p in on:
        assert not any(_dominates(q, p) for q in valid)
    for p in off:
        assert any(_dominates(q, p) for q in on)


def test_pareto_front_hand_example():
    pts = [
        ("fp32", 500.0, 10.0),
        ("w8", 130.0, 10.1),
        ("w8-dup", 130.0, 10.1),   # tie: identical points both stay
        ("w4", 70.0, 11.0),
        ("bad", 140.0, 12.0),      # dominated by w8
        ("same-x", 70.0, 11.5),    # dominated by w4 (same x, worse y)
        ("nan", float("nan"), 1.0),
        ("none", None, 1.0),
    ]
    assert pareto_front(pts) == ["fp32", "w8", "w8-dup", "w4"]
    assert pareto_front([]) == []


# ---------------------------------------------------------------- write_report

RECIPE = "name: rtn-w4-g64\nsteps:\n  - rtn: {bits: 4, group_size: 64}  # <b>&\n"


def _rows():
    return [
        dict(name="fp32", recipe=None, perplexity=20.0, tokens=4096, stored_bytes=540_000_000,
             peak_rss_bytes=900_000_000, prefill_tokens_per_s=850.0, decode_tokens_per_s=42.5,
             decode_latency_ms=23.5, kl=0.0, top1_agreement=1.0, compress_seconds=None,
             tasks={"lambada": {"acc": 0.41, "n": 100}}, fallbacks=None),
        dict(name="rtn-w8", recipe="name: rtn-w8\n", perplexity=20.1, stored_bytes=140_000_000,
             decode_latency_ms=30.0, decode_tokens_per_s=33.3, kl=0.0021, top1_agreement=0.981,
             compress_seconds=1.5, tasks={"lambada": {"acc": 0.40, "n": 100}}),
        dict(name="rtn-w4-g64", recipe=RECIPE, perplexity=23.7, stored_bytes=80_000_000,
             decode_latency_ms=None, kl=float("nan"), fallbacks=["model.lm_head"]),
        dict(name="<script>alert(1)</script>", perplexity=float("inf"), stored_bytes=70_000_000),
        dict(name="worse", perplexity=25.0, stored_bytes=150_000_000, decode_latency_ms=40.0),
    ]


META = {
    "model": "SmolLM2-135M",
    "data": {"name": "wikitext-2", "sha256": "ab" * 32},
    "seqlen": 512, "windows": 8,
    "versions": {"torch": "2.13.0", "transformers": "4.50", "slimformer": "0.1.0"},
    "date": "2025-01-01T00:00:00Z",
    "command": ["slimformer", "compare", "m", "--recipes", "a,b"],
    "machine": {"cpu_count": 16},
}


def test_write_report_files_and_json(tmp_path):
    paths = write_report(_rows(), tmp_path / "out", META)
    assert set(os.listdir(tmp_path / "out")) == FILES  # no temp files left over
    assert {p.name for p in paths.values()} == FILES

    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["meta"] == META
    assert [r["name"] for r in doc["rows"]][0] == "fp32"
    assert doc["rows"][2]["kl"] is None and doc["rows"][3]["perplexity"] is None  # NaN/inf
    assert doc["pareto"]["bytes"] == ["fp32", "rtn-w8", "rtn-w4-g64"]
    assert doc["pareto"]["latency"] == ["fp32"]


def test_markdown_content(tmp_path):
    write_report(_rows(), tmp_path, META)
    md = (tmp_path / "report.md").read_text()
    assert "| rtn-w8 ★ | 20.10 | +0.50% | 140.0 | 3.86× |" in md
    assert "worse ★" not in md
    assert "+0.50%" in md and "3.86×" in md           # Δ% and ×smaller vs baseline
    assert "lambada acc" in md and "—" in md
    assert "```yaml\n" + RECIPE.rstrip("\n") + "\n```" in md  # recipe verbatim
    assert "model.lm\\_head" in md                    # fallbacks listed
    assert "ab" * 32 in md and "2.13.0" in md


def test_html_self_contained_and_escaped(tmp_path):
    write_report(_rows(), tmp_path, META)
    page = (tmp_path / "report.html").read_text()
    assert 'src="http' not in page and 'href="http' not in page
    assert "<link" not in page and "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    for value in ("20.10", "+0.50%", "3.86×", "98.1%", "0.410", "rtn-w8 ★", "model.lm_head"):
        assert value in page
    assert page.count('src="data:image/svg+xml;base64,') == 2
    assert "<pre>" + "name: rtn-w4-g64\nsteps:\n  - rtn: {bits: 4, group_size: 64}  # &lt;b&gt;&amp;" in page
    # rows without a latency are left out of that plot, with a note
    assert "Not plotted (decode_latency_ms or perplexity missing): rtn-w4-g64" in page


def test_missing_values_render_as_dash(tmp_path):
    rows = [{"name": "fp32"}, {"name": "x", "perplexity": None, "tasks": None, "fallbacks": None}]
    write_report(rows, tmp_path, {})
    md = (tmp_path / "report.md").read_text()
    assert "| fp32 | — | — | — |" in md
    page = (tmp_path / "report.html").read_text()
    assert "nothing to plot" in page and "<td class=\"num\">—</td>" in page
    assert json.loads((tmp_path / "report.json").read_text())["pareto"] == {"bytes": [], "latency": []}


def test_failure_while_plotting_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(plots, "plot_tradeoff", boom)
    with pytest.raises(RuntimeError, match="plot failed"):
        write_report(_rows(), tmp_path, META)
    assert os.listdir(tmp_path) == []


def test_failure_while_renaming_leaves_nothing(tmp_path, monkeypatch):
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk full"):
        write_report(_rows(), tmp_path, META)
    assert os.listdir(tmp_path) == []


def test_plot_is_svg_and_deterministic():
    pts = [("a", 1.0, 3.0), ("b$", 2.0, 2.0), ("c", 3.0, 2.5)]
    svg = plots.plot_tradeoff(pts, ["a", "b$"], title="t", xlabel="x", logx=True)
    assert "<svg" in svg and "http://www.w3.org/2000/svg" in svg
    assert svg == plots.plot_tradeoff(pts, ["a", "b$"], title="t", xlabel="x", logx=True)


def test_numpy_values_and_empty_rows(tmp_path):
    np = pytest.importorskip("numpy")
    rows = [{"name": "fp32", "perplexity": np.float32(20.0), "stored_bytes": np.int64(100)},
            {"name": "w4", "perplexity": np.float64("nan"), "stored_bytes": np.int64(25)}]
    write_report(rows, tmp_path / "a", {"model": "m"})
    doc = json.loads((tmp_path / "a" / "report.json").read_text())
    assert doc["rows"][0]["perplexity"] == 20.0 and doc["rows"][1]["perplexity"] is None
    assert doc["pareto"]["bytes"] == ["fp32"]
    write_report([], tmp_path / "b", {})
    assert set(os.listdir(tmp_path / "b")) == FILES
