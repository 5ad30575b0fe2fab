"""slimformer bench: the timing protocol and its bad input."""

import json

import pytest

from slimformer.cli import main
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.runtime import bench
from slimformer.runtime.decoder import NativeDecoder


def test_round_robin_rates_and_roofline():
    model = tiny_model("llama")
    dec = NativeDecoder.from_model(model)
    calls = []

    def counting(ids, n):
        calls.append(n)

    engines = [bench.native_timed("native", dec), bench.hf_timed(model),
               bench.Timed("counter", counting, bytes_per_token=1000)]
    out = bench.run_benchmark(engines, [5, 6, 7], list(range(5, 37)), new_tokens=4, repeats=2, progress=False)
    # per round: decode needs runs of 1 and 4 tokens, prefill one run of 1; plus a warm-up round
    assert calls == [1, 4, 1] * 3
    for row in out.values():
        assert row["decode_tok_s"]["runs"] == 2 and row["prefill_tok_s"]["runs"] == 2
        assert row["decode_tok_s"]["min"] <= row["decode_tok_s"]["median"] <= row["decode_tok_s"]["max"]
    assert out["native"]["bytes_per_token"] == dec.weight_bytes_per_token()
    bench.add_roofline(out, bandwidth=2e6)
    assert out["counter"]["roofline_tok_s"] == 2000
    assert out["counter"]["roofline_fraction"] == out["counter"]["decode_tok_s"]["median"] / 2000


def test_fp32_decoder_reads_every_weight_once():
    model = tiny_model("llama")
    dec = NativeDecoder.from_model(model)
    params = sum(p.numel() for p in model.parameters())  # tied head: the embedding is the head
    assert dec.weight_bytes_per_token() == 4 * params


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-bench")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_cli_bench_writes_json(saved, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["--quiet", "bench", str(saved), "--vs", "hf", "--new-tokens", "4", "--prompt-len", "16", "--repeats", "1",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"slimformer", "hf eager fp32"}
    assert data["bandwidth_bytes_s"] > 0 and "roofline_fraction" in data["results"]["slimformer"]


@pytest.mark.parametrize("args,message", [
    (["--vs", "llama.cpp"], "needs a .gguf model"),
    (["--vs", "vllm"], "unknown engine 'vllm'"),
])
def test_cli_bench_bad_input(saved, capsys, args, message):
    try:
        code = main(["bench", str(saved), *args])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
