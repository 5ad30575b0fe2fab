import pytest
import torch

from slimformer.eval import cost
from slimformer.models.tiny import tiny_model, tiny_tokenizer


def test_a_measured_child_reports_its_own_peak_memory_not_its_parents(tmp_path):
    path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    ballast = torch.ones(700 * 2**20 // 4)   # 700 MiB resident in the parent
    assert cost.peak_rss_bytes() > 700 * 2**20
    measured = cost.measure_in_subprocess(str(path), prompt_len=16, new_tokens=3, repeats=1)
    assert measured["peak_rss_bytes"] < 600 * 2**20
    assert measured["decode_tokens_per_s"] > 0 and measured["prefill_tokens_per_s"] > 0
    del ballast


@pytest.mark.parametrize("family,engine", [("llama", "native"), ("gpt2", "hf")])
def test_decode_rate_cancels_prefill_and_set_up(family, engine):
    model = tiny_model(family)
    result = cost.measure_speed(model, prompt_len=16, new_tokens=5, repeats=1)
    assert result["engine"] == engine  # the native runtime wherever it runs the model
    long = cost.measure_speed(model, prompt_len=400, new_tokens=2, repeats=1, decode=False)
    assert long["prefill_prompt_len"] == 256  # tiny models have 256 positions
    assert result["decode_latency_ms"] == 1000 / result["decode_tokens_per_s"]
    lo, hi = result["decode_tokens_per_s_range"]
    assert lo <= result["decode_tokens_per_s"] <= hi


def test_speed_falls_back_to_hf_when_the_native_library_is_unavailable(monkeypatch):
    monkeypatch.setenv("SLIMFORMER_DISABLE_KERNELS", "1")
    with pytest.warns(RuntimeWarning, match="Hugging Face engine.*SLIMFORMER_DISABLE_KERNELS"):
        result = cost.measure_speed(tiny_model("llama"), prompt_len=8, new_tokens=3, repeats=1)
    assert result["engine"] == "hf" and result["decode_tokens_per_s"] > 0
