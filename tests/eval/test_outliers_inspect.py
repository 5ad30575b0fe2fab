import json

import torch

from slimformer.cli import main
from slimformer.eval.outliers import channel_absmax, outlier_table
from slimformer.models.tiny import tiny_model, tiny_tokenizer


def test_a_planted_outlier_channel_is_found():
    model = tiny_model("llama")
    # make hidden channel 5 huge in the residual stream: every layer's attention input sees it after the norm
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = 200.0
    calib = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    rows = {r["layer"]: r for r in outlier_table(channel_absmax(model, calib, progress=False))}
    q = rows["model.layers.0.self_attn.q_proj"]
    assert q["top_channels"][0] == 5
    assert q["channels_ge_6"] >= 1 and q["channels_ge_20x_median"] >= 1
    assert rows["model.layers.0.mlp.down_proj"]["channels"] == 128
    assert len(rows) == 2 * 7


def _save_tiny(tmp_path, family="llama"):
    path = tmp_path / family
    tiny_model(family).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def test_inspect_kv_plan_and_outliers(tmp_path, capsys):
    model = _save_tiny(tmp_path)
    out = tmp_path / "inspect.json"
    assert main(["--quiet", "inspect", model, "--kv-plan", "--batch", "4", "--context", "100",
                 "--outliers", "--calib-samples", "2", "--seqlen", "32", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"]["kv_heads"] == 2 and result["model"]["layers"] == 2
    # 2 (K, V) x 2 layers x 2 KV heads x 16 head dim x 4 x 100 x 2 bytes
    assert result["kv_plan"]["kv_cache_bytes"] == 2 * 2 * 2 * 16 * 4 * 100 * 2
    assert len(result["outliers"]["layers"]) == 14
    assert "KV cache" in capsys.readouterr().out


def test_study_w8a8_on_a_tiny_decoder_and_encoder(tmp_path, capsys):
    for family, metric in (("llama", "perplexity"), ("bert", "embedding_cosine")):
        out = tmp_path / f"{family}.json"
        assert main(["--quiet", "study-w8a8", _save_tiny(tmp_path, family), "--seqlen", "32", "--windows", "2",
                     "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        variants = [r["variant"] for r in result["rows"]]
        assert variants[:2] == ["W32A32 (fp32)", "W8A32"] and len(variants) == 6
        assert result["metric"] == metric
        if metric == "embedding_cosine":
            assert result["rows"][0][metric] > 0.9999
            assert all(0 < r[metric] <= 1.0001 for r in result["rows"])


def test_compare_on_a_tiny_model_writes_a_report_with_every_row(tmp_path):
    model = _save_tiny(tmp_path)
    out = tmp_path / "report"
    assert main(["--quiet", "compare", model, "--recipes", "rtn-w8,rtn-w4-g32", "--windows", "2", "--seqlen", "32",
                 "--new-tokens", "3", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["fp32", "rtn-w8", "rtn-w4-g32"]
    fp32, w8, w4 = report["rows"]
    assert w4["stored_bytes"] < w8["stored_bytes"] < fp32["stored_bytes"]
    assert w8["kl"] < w4["kl"] and w8["top1_agreement"] >= w4["top1_agreement"]
    assert all(r["decode_tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0 for r in report["rows"])
    assert report["meta"]["data"]["name"] == "pydoc:eval"
    assert {"report.html", "report.md", "report.json"} <= {p.name for p in out.iterdir()}
