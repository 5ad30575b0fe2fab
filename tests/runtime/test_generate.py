"""Generation loop: greedy equals Hugging Face, sampling filters, stops, streaming, batches, errors."""

import json

import pytest
import torch

from slimformer.cli import main
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.runtime.decoder import GenerationError
from slimformer.runtime.generate import Generator, SamplingConfig, sample_next

PROMPTS = ["def f(x):", "The object", "Built-in functions and"]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=1), tiny_tokenizer()


def _hf_greedy(model, tok, prompt, n):
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("engine", ["native", "hf"])
def test_greedy_equals_hf_generate(llama, engine):
    model, tok = llama
    gen = Generator.from_model(model, tok, engine=engine)
    assert gen.engine_name == engine
    for p in PROMPTS:
        out = gen.generate(p, max_new_tokens=20, ignore_eos=True)[0]
        assert out.token_ids == _hf_greedy(model, tok, p, 20)
        assert out.finish_reason == "length"


@pytest.mark.parametrize("engine", ["native", "hf"])
def test_batch_equals_one_by_one(llama, engine):
    model, tok = llama
    gen = Generator.from_model(model, tok, engine=engine)
    batch = gen.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)
    for p, got in zip(PROMPTS, batch):
        assert got.token_ids == gen.generate(p, max_new_tokens=12, ignore_eos=True)[0].token_ids


def test_gpt2_falls_back_to_hf_engine():
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    with pytest.warns(RuntimeWarning, match="Hugging Face engine"):
        gen = Generator.from_model(model, tok)
    assert gen.engine_name == "hf"
    assert gen.generate("def f", max_new_tokens=8, ignore_eos=True)[0].token_ids == _hf_greedy(model, tok, "def f", 8)
    with pytest.raises(GenerationError, match="native engine cannot run"):
        Generator.from_model(model, tok, engine="native")


def test_eos_and_stop_strings(llama):
    model, tok = llama
    gen = Generator.from_model(model, tok)
    free = gen.generate(PROMPTS[0], max_new_tokens=16, ignore_eos=True)[0]
    stop_token = free.token_ids[5]
    gen.eos_ids = {stop_token}
    out = gen.generate(PROMPTS[0], max_new_tokens=16)[0]
    first = free.token_ids.index(stop_token)
    assert out.finish_reason == "eos" and out.token_ids == free.token_ids[: first + 1]
    assert gen.generate(PROMPTS[0], max_new_tokens=16, ignore_eos=True)[0].token_ids == free.token_ids
    gen.eos_ids = set()
    stop = free.text[3:6]
    cut = gen.generate(PROMPTS[0], max_new_tokens=16, stop=(stop,))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]


def test_stream_pieces_join_to_the_generated_text(llama):
    model, tok = llama
    gen = Generator.from_model(model, tok)
    pieces = list(gen.stream(PROMPTS[1], max_new_tokens=16, ignore_eos=True))
    assert len(pieces) > 1
    assert "".join(pieces) == gen.generate(PROMPTS[1], max_new_tokens=16, ignore_eos=True)[0].text


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    greedy = SamplingConfig(temperature=0)
    assert sample_next(logits, greedy, g).item() == 1
    top1 = SamplingConfig(temperature=1.0, top_k=1)
    assert all(sample_next(logits, top1, g).item() == 1 for _ in range(20))
    top2 = SamplingConfig(temperature=1.0, top_k=2)
    assert {sample_next(logits, top2, g).item() for _ in range(200)} == {1, 2}
    # top_p: the best token holds 0.47 of the mass, the two best 0.90: p=0.7 keeps exactly two
    nucleus = SamplingConfig(temperature=1.0, top_p=0.7)
    assert {sample_next(logits, nucleus, g).item() for _ in range(200)} == {1, 2}
    # temperature 1 without filters draws from softmax(logits)
    draws = torch.cat([sample_next(logits, SamplingConfig(temperature=1.0), g) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=5).float() / 4000
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.03)


def test_seeded_sampling_is_reproducible(llama):
    model, tok = llama
    gen = Generator.from_model(model, tok)
    a = gen.generate(PROMPTS[0], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3, ignore_eos=True)[0]
    b = gen.generate(PROMPTS[0], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3, ignore_eos=True)[0]
    assert a.token_ids == b.token_ids


def test_bad_input(llama):
    model, tok = llama
    gen = Generator.from_model(model, tok)
    with pytest.raises(GenerationError, match="unknown sampling option 'top_q'"):
        gen.generate("x", top_q=0.5)
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_new_tokens=0)):
        with pytest.raises(GenerationError):
            SamplingConfig(**bad)
    long_prompt = list(range(5, 5 + 250))  # context is 256
    with pytest.raises(GenerationError, match="exceeds the model's context of 256"):
        gen.generate(long_prompt, max_new_tokens=10)
    out = gen.generate(long_prompt, max_new_tokens=10, truncate=True, ignore_eos=True)[0]
    assert out.prompt_tokens == 246 and len(out.token_ids) == 10
    with pytest.raises(GenerationError, match="unknown engine"):
        Generator.from_model(model, tok, engine="vllm")


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory, llama):
    path = tmp_path_factory.mktemp("tiny-llama")
    model, tok = llama
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cli_generate(saved_llama, capsys, tmp_path):
    out_json = tmp_path / "g.json"
    assert main(["generate", str(saved_llama), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                 "--max-new-tokens", "6", "--ignore-eos", "--json", str(out_json)]) == 0
    data = json.loads(out_json.read_text())
    assert data["engine"] == "native" and [len(g["token_ids"]) for g in data["generations"]] == [6, 6]
    capsys.readouterr()
    assert main(["generate", str(saved_llama), "--prompt", PROMPTS[0], "--max-new-tokens", "6", "--ignore-eos",
                 "--stream"]) == 0
    assert capsys.readouterr().out.strip() == data["generations"][0]["text"].strip()


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "1.5"], "top_p must be in"),
    (["--top-q", "1"], "unrecognized arguments: --top-q"),
    (["--max-new-tokens", "300"], "exceeds the model's context of 256"),
    (["--engine", "vllm"], "invalid choice"),
])
def test_cli_generate_bad_input(saved_llama, capsys, args, message):
    with pytest.raises(SystemExit) if "--top-q" in args or "vllm" in args else _nullcontext():
        code = main(["generate", str(saved_llama), "--prompt", "hello", *args])
        assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_cli_generate_tensor_parallel_equals_one_process(saved_llama, capsys):
    common = ["generate", str(saved_llama), "--prompt", PROMPTS[2], "--max-new-tokens", "8", "--ignore-eos"]
    assert main(common) == 0
    single = capsys.readouterr().out
    assert main(common + ["--tensor-parallel", "2"]) == 0
    assert capsys.readouterr().out == single
    assert main(common + ["--tensor-parallel", "3"]) == 2  # 4 heads do not split 3 ways
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not divide" in err[0]


def test_cli_generate_with_a_memory_budget_streams_blocks(saved_llama, capsys):
    common = ["generate", str(saved_llama), "--prompt", PROMPTS[0], "--max-new-tokens", "8", "--ignore-eos"]
    assert main(common) == 0
    in_memory = capsys.readouterr().out
    assert main(common + ["--memory-budget", "300KB"]) == 0  # embedding + one of the two blocks resident
    assert capsys.readouterr().out == in_memory
    assert main(common + ["--memory-budget", "lots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lots" in err[0]


# ------------------------------------------------------------------ the native library unavailable
def test_native_available_honours_the_disable_switch(monkeypatch):
    from slimformer.runtime.decoder import native_available

    assert native_available() == (True, "")
    monkeypatch.setenv("SLIMFORMER_DISABLE_KERNELS", "1")
    ok, why = native_available()
    assert not ok and "SLIMFORMER_DISABLE_KERNELS" in why


def test_auto_falls_back_to_hf_when_the_library_is_unavailable(llama, monkeypatch):
    model, tok = llama
    hf = Generator.from_model(model, tok, engine="hf").generate(PROMPTS[0], max_new_tokens=8, ignore_eos=True)[0]
    monkeypatch.setenv("SLIMFORMER_DISABLE_KERNELS", "1")
    with pytest.warns(RuntimeWarning, match="Hugging Face engine.*SLIMFORMER_DISABLE_KERNELS"):
        gen = Generator.from_model(model, tok)
    assert gen.engine_name == "hf"
    assert gen.generate(PROMPTS[0], max_new_tokens=8, ignore_eos=True)[0].token_ids == hf.token_ids
    with pytest.raises(GenerationError, match="native engine cannot run this model.*SLIMFORMER_DISABLE_KERNELS"):
        Generator.from_model(model, tok, engine="native")


def test_cli_generate_without_the_native_library(saved_llama, capsys, monkeypatch):
    import os
    import subprocess
    import sys

    common = ["generate", str(saved_llama), "--prompt", PROMPTS[0], "--max-new-tokens", "8", "--ignore-eos"]
    assert main(common + ["--engine", "hf"]) == 0
    hf_text = capsys.readouterr().out
    # a fresh process, so the warning reaches stderr as the user sees it
    env = {**os.environ, "SLIMFORMER_DISABLE_KERNELS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-m", "slimformer", *common], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout == hf_text
    warning = [line for line in out.stderr.splitlines() if "Hugging Face engine" in line]
    assert len(warning) == 1 and warning[0].startswith("slimformer: warning:") and "SLIMFORMER_DISABLE_KERNELS" in warning[0]
    assert "Traceback" not in out.stderr
    # an explicit --engine native: one line, non-zero exit
    monkeypatch.setenv("SLIMFORMER_DISABLE_KERNELS", "1")
    assert main(common + ["--engine", "native"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slimformer: error: native engine") and "SLIMFORMER_DISABLE_KERNELS" in err[0]
