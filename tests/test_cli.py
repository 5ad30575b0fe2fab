"""The command line: every user mistake ends in exactly one ``slimformer: error:`` line
on stderr, a non-zero exit and no partial output; plus the happy path."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimformer.cli import build_parser, main
from slimformer.models.tiny import tiny_model, tiny_tokenizer

SEQ = ["--seqlen", "32"]


# ---------------------------------------------------------------- helpers

@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SLIMFORMER_TASK_DATA", raising=False)


def _save(model, d: Path) -> Path:
    model.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    dirs = {fam: _save(tiny_model(fam), root / fam) for fam in ("llama", "gpt2", "bert")}
    dirs["llama-v300"] = _save(tiny_model("llama", vocab_size=300), root / "llama-v300")
    return dirs


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: --help, usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, *fragments: str) -> str:
    assert code not in (0, None), (code, out, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got:\n{err}"
    assert lines[0].startswith("slimformer: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def assert_no_output(path: Path) -> None:
    assert not path.exists(), f"{path} was left behind"
    strays = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
    assert not strays, f"stray temporary files next to {path}: {strays}"


def recipe_file(tmp_path: Path, body: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def compress_fails(capsys, tmp_path, model, recipe, *extra, fragments=()) -> str:
    out = tmp_path / "out"
    line = assert_one_line_error(*cli(capsys, "--quiet", "compress", model, "--recipe", recipe, "--out", out,
                                      *SEQ, *extra), *fragments)
    assert_no_output(out)
    return line


def eval_fails(capsys, tmp_path, model, *extra, fragments=()) -> str:
    report = tmp_path / "report.json"
    line = assert_one_line_error(*cli(capsys, "--quiet", "eval", model, *SEQ, "--json", report, *extra),
                                 *fragments)
    assert_no_output(report)
    return line


# ---------------------------------------------------------------- models

def test_missing_model_path(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    out = tmp_path / "out"
    # Not --quiet: nothing may reach stderr before the error line either.
    assert_one_line_error(*cli(capsys, "compress", missing, "--recipe", "rtn-w8", "--out", out), str(missing))
    assert_no_output(out)
    eval_fails(capsys, tmp_path, missing, fragments=(str(missing),))


def test_directory_without_config(capsys, tmp_path):
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    eval_fails(capsys, tmp_path, empty, fragments=("config.json",))


def test_corrupt_gguf_random_bytes(capsys, tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(os.urandom(4096))
    compress_fails(capsys, tmp_path, path, "rtn-w8", fragments=("x.gguf",))
    eval_fails(capsys, tmp_path, path, fragments=("x.gguf",))


@pytest.mark.parametrize("tail", [
    os.urandom(4096),                                  # absurd version number
    struct.pack("<I", 3) + os.urandom(4096),           # valid version, junk counts
    struct.pack("<IQQ", 3, 0, 0),                      # valid, empty header: no architecture
    struct.pack("<IQQ", 3, 1, 1) + b"junk" * 20,       # counts promise more than the file holds
], ids=["junk", "v3-junk", "v3-empty", "v3-truncated"])
def test_corrupt_gguf_with_magic(capsys, tmp_path, tail):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + tail)
    compress_fails(capsys, tmp_path, path, "rtn-w8", fragments=("bad.gguf",))


def test_gguf_magic_without_suffix_is_read_as_gguf(capsys, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"GGUF" + os.urandom(512))
    eval_fails(capsys, tmp_path, path, fragments=("GGUF",))


def test_unsupported_architecture(capsys, tmp_path):
    import transformers

    d = tmp_path / "t5"
    transformers.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=2, vocab_size=128).save_pretrained(d)
    line = compress_fails(capsys, tmp_path, d, "rtn-w8", fragments=("t5",))
    assert "unsupported architecture" in line
    eval_fails(capsys, tmp_path, d, fragments=("unsupported architecture 't5'",))


def test_pickle_checkpoint_refused_unless_trusted(capsys, tmp_path):
    d = tmp_path / "pickled"
    model = tiny_model("llama")
    model.save_pretrained(d, safe_serialization=False)
    # Recent transformers ignore safe_serialization=False: make sure only pickle weights remain.
    for f in d.glob("*.safetensors"):
        f.unlink()
    if not (d / "pytorch_model.bin").exists():
        torch.save(model.state_dict(), d / "pytorch_model.bin")
    tiny_tokenizer().save_pretrained(d)
    assert not list(d.glob("*.safetensors"))

    out = tmp_path / "out"
    compress_fails(capsys, tmp_path, d, "rtn-w8", fragments=("pickle", "--trust-pickle"))
    eval_fails(capsys, tmp_path, d, "--windows", "1", fragments=("--trust-pickle",))

    code, stdout, err = cli(capsys, "--quiet", "compress", d, "--trust-pickle", "--recipe", "rtn-w8",
                            "--out", out, *SEQ)
    assert code == 0, err
    assert (out / "slimformer.json").exists()
    code, stdout, err = cli(capsys, "--quiet", "eval", d, "--trust-pickle", *SEQ, "--windows", "2")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["windows"] == 2 and result["perplexity"] > 1


# ---------------------------------------------------------------- data

def test_empty_data_file(capsys, tmp_path, models):
    data = tmp_path / "empty.txt"
    data.write_text("")
    eval_fails(capsys, tmp_path, models["llama"], "--data", data, fragments=("empty",))
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n \n")
    eval_fails(capsys, tmp_path, models["llama"], "--data", blank, fragments=("empty",))


def test_empty_calibration_file(capsys, tmp_path, models):
    data = tmp_path / "empty.txt"
    data.write_text("")
    compress_fails(capsys, tmp_path, models["llama"], "rtn-w8a8-static", "--calib", data,
                   "--calib-samples", "2", fragments=("empty",))


def test_missing_data_file(capsys, tmp_path, models):
    eval_fails(capsys, tmp_path, models["llama"], "--data", tmp_path / "nope.txt", fragments=("nope.txt",))


def test_data_too_short_for_windows(capsys, tmp_path, models):
    data = tmp_path / "short.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    # A few windows fit ...
    code, out, err = cli(capsys, "--quiet", "eval", models["llama"], "--data", data, *SEQ, "--windows", "1")
    assert code == 0, err
    # ... a thousand do not.
    eval_fails(capsys, tmp_path, models["llama"], "--data", data, "--windows", "1000",
               fragments=("1000 requested",))
    # Less than one window at all.
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello world")
    eval_fails(capsys, tmp_path, models["llama"], "--data", tiny, fragments=("fewer than one window",))


@pytest.mark.parametrize("damage", [b"", b"garbage", None], ids=["empty", "garbage", "truncated"])
def test_damaged_token_cache_is_recomputed(capsys, tmp_path, models, monkeypatch, damage):
    from slimformer.data import tokens

    monkeypatch.setattr(tokens, "_MEMORY_CACHE", {})
    data = tmp_path / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    argv = ("--quiet", "eval", models["llama"], "--data", data, *SEQ)
    code, first, err = cli(capsys, *argv)
    assert code == 0, err
    (entry,) = (tmp_path / "cache" / "tokens").glob("*.npy")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2] if damage is None else damage)
    tokens._MEMORY_CACHE.clear()
    code, second, err = cli(capsys, *argv)
    assert code == 0 and err == "", err
    assert json.loads(second)["perplexity"] == json.loads(first)["perplexity"]


def test_calibration_data_too_short(capsys, tmp_path, models):
    data = tmp_path / "short.txt"
    data.write_text("hello world, hello there")
    compress_fails(capsys, tmp_path, models["llama"], "rtn-w8a8-static", "--calib", data,
                   "--calib-samples", "4", fragments=("calibration data",))


def test_calibrating_recipe_without_calib(capsys, tmp_path, models):
    compress_fails(capsys, tmp_path, models["llama"], "rtn-w8a8-static", fragments=("--calib",))


# ---------------------------------------------------------------- recipes

@pytest.mark.parametrize("body, fragments", [
    ("stages:\n  - RTN: {bits: 4\n", ("invalid recipe YAML", "line")),
    ("stages:\n  - GPTQ9000: {bits: 4}\n", ("unknown technique 'GPTQ9000'", "RTN")),
    ("stages:\n  - RTN: {bitz: 4}\n", ("unknown argument 'bitz'",)),
    ('stages:\n  - RTN: {bits: "four"}\n', ("'bits'", "'four'", "int")),
    ("stages:\n  - RTN: {bits: 4, symmetric: 3}\n", ("'symmetric'",)),
    ("stages:\n  - RTN: {bits: 4, granularity: rows}\n", ("'granularity'", "'rows'")),
    ("stages: []\n", ("stages",)),
    ("- RTN: {bits: 4}\n", ("mapping",)),
    ("stages:\n  - RTN: {bits: 4}\nstagez: 1\n", ("unknown recipe key 'stagez'",)),
    ("stages:\n  - RTN: 4\n", ("arguments must be a mapping",)),
    ("stages:\n  - RTN: {bits: 4, targets: {blocks: [a]}}\n", ("blocks", "'a'")),
    ("stages:\n  - RTN: {bits: 4, targets: {blocks: [true]}}\n", ("blocks",)),
    ("stages:\n  - RTN: {bits: 4, targets: {include: [1]}}\n", ("include", "strings")),
    ("stages:\n  - RTN: {bits: 4, targets: \"(\"}\n", ("invalid pattern '('",)),
    ("stages:\n  - RTN: {bits: 4, targets: {nclude: q}}\n", ("unknown key 'nclude'",)),
    # Targets that select nothing would write an uncompressed "compressed" model.
    ("stages:\n  - RTN: {bits: 4, targets: q_proj}\n", ("stage 1 (RTN)", "select no projection", "self_attn.q_proj")),
    ("stages:\n  - RTN: {bits: 4, targets: []}\n", ("select no projection",)),
    ("stages:\n  - RTN: {bits: 4, targets: {blocks: [7]}}\n", ("select no projection", "blocks 0-1")),
], ids=["syntax", "unknown-technique", "unknown-argument", "wrong-type", "wrong-type-bool",
        "bad-literal", "no-stages", "not-a-mapping", "unknown-key", "args-not-mapping",
        "blocks-not-int", "blocks-bool", "pattern-not-str", "bad-regex", "targets-unknown-key",
        "selects-nothing", "empty-include", "block-out-of-range"])
def test_invalid_recipe(capsys, tmp_path, models, body, fragments):
    compress_fails(capsys, tmp_path, models["llama"], recipe_file(tmp_path, body), fragments=fragments)


def test_recipe_with_null_name_is_named_after_its_file(capsys, tmp_path, models):
    recipe = recipe_file(tmp_path, "name:\ndescription:\nstages:\n  - RTN: {bits: 8, act_bits: 8, "
                                   "act_granularity: tensor, act_dynamic: false}\n", "my-static.yaml")
    compress_fails(capsys, tmp_path, models["llama"], recipe, fragments=("recipe my-static needs calibration",))


def test_targets_selecting_some_blocks_work(capsys, tmp_path, models):
    recipe = recipe_file(tmp_path, "stages:\n  - RTN: {bits: 4, targets: {include: '.*q_proj', blocks: [1]}}\n")
    out = tmp_path / "out"
    code, _, err = cli(capsys, "--quiet", "compress", models["llama"], "--recipe", recipe, "--out", out, *SEQ)
    assert code == 0, err
    assert list(json.loads((out / "slimformer.json").read_text())["modules"]) == ["model.layers.1.self_attn.q_proj"]


def test_unknown_recipe_name_and_missing_file(capsys, tmp_path, models):
    compress_fails(capsys, tmp_path, models["llama"], "rtn-w5", fragments=("unknown recipe 'rtn-w5'",))
    compress_fails(capsys, tmp_path, models["llama"], tmp_path / "missing.yaml", fragments=("missing.yaml",))


@pytest.mark.parametrize("bits", [9, 1, 0, -4])
def test_bits_out_of_range(capsys, tmp_path, models, bits):
    recipe = recipe_file(tmp_path, f"stages:\n  - RTN: {{bits: {bits}, granularity: channel}}\n")
    compress_fails(capsys, tmp_path, models["llama"], recipe, fragments=("bits", str(bits), "2 to 8"))


def test_activation_bits_out_of_range(capsys, tmp_path, models):
    recipe = recipe_file(tmp_path, "stages:\n  - RTN: {bits: 8, act_bits: 16}\n")
    compress_fails(capsys, tmp_path, models["llama"], recipe, fragments=("16",))


def test_group_size_not_dividing_layer_names_the_layer(capsys, tmp_path, models):
    # hidden 64: 48 divides neither 64 (q_proj input) nor 128 (down_proj input).
    recipe = recipe_file(tmp_path, "stages:\n  - RTN: {bits: 4, granularity: group, group_size: 48}\n")
    compress_fails(capsys, tmp_path, models["llama"], recipe,
                   fragments=("model.layers.0.self_attn.q_proj", "48", "64"))
    # GPT-2's Conv1D stores [in, out]: the error must still count input columns (64).
    compress_fails(capsys, tmp_path, models["gpt2"], recipe, fragments=("transformer.h.0.attn.c_attn", "64"))


def test_group_size_without_group_granularity(capsys, tmp_path, models):
    recipe = recipe_file(tmp_path, "stages:\n  - RTN: {bits: 4, granularity: channel, group_size: 32}\n")
    compress_fails(capsys, tmp_path, models["llama"], recipe, fragments=("group_size",))


# ---------------------------------------------------------------- output directory

def test_existing_output_needs_overwrite(capsys, tmp_path, models):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    line = assert_one_line_error(*cli(capsys, "--quiet", "compress", models["llama"], "--recipe", "rtn-w8",
                                      "--out", out, *SEQ), str(out), "--overwrite")
    assert line
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []

    # A failing compress with --overwrite leaves the old directory untouched.
    bad = recipe_file(tmp_path, "stages:\n  - RTN: {bits: 4, granularity: group, group_size: 48}\n")
    assert_one_line_error(*cli(capsys, "--quiet", "compress", models["llama"], "--recipe", bad, "--out", out,
                               "--overwrite", *SEQ), "group_size")
    assert (out / "keep.txt").read_text() == "precious"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]

    # With --overwrite a successful run replaces it entirely.
    code, stdout, err = cli(capsys, "--quiet", "compress", models["llama"], "--recipe", "rtn-w8", "--out", out,
                            "--overwrite", *SEQ)
    assert code == 0, err
    assert not (out / "keep.txt").exists()
    assert (out / "slimformer.json").exists() and (out / "model.safetensors").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_existing_compare_output_needs_overwrite(capsys, tmp_path, models):
    out = tmp_path / "report"
    out.mkdir()
    assert_one_line_error(*cli(capsys, "--quiet", "compare", models["llama"], "--out", out, *SEQ), "--overwrite")
    assert list(out.iterdir()) == []


def test_compressing_a_compressed_model(capsys, tmp_path, models):
    first = tmp_path / "first"
    code, _, err = cli(capsys, "--quiet", "compress", models["llama"], "--recipe", "rtn-w8", "--out", first, *SEQ)
    assert code == 0, err
    out = tmp_path / "out"
    line = compress_fails(capsys, tmp_path, first, "rtn-w4-g32", fragments=(str(first), "already compressed"))
    assert line
    assert_no_output(out)


def test_mismatched_reference(capsys, tmp_path, models):
    eval_fails(capsys, tmp_path, models["llama"], "--windows", "1", "--reference", models["bert"],
               fragments=("encoder", "decoder"))
    eval_fails(capsys, tmp_path, models["bert"], "--windows", "1", "--reference", models["llama"],
               fragments=("encoder", "decoder"))
    eval_fails(capsys, tmp_path, models["llama"], "--windows", "1", "--reference", models["llama-v300"],
               fragments=("300", "384"))
    eval_fails(capsys, tmp_path, models["llama"], "--windows", "1", "--reference", tmp_path / "gone",
               fragments=("gone",))


# ---------------------------------------------------------------- tasks and usage errors

def test_tasks_without_task_data(capsys, tmp_path, models):
    eval_fails(capsys, tmp_path, models["llama"], "--windows", "1", "--tasks", "lambada",
               fragments=("--task-data", "SLIMFORMER_TASK_DATA"))
    eval_fails(capsys, tmp_path, models["llama"], "--windows", "1", "--tasks", "piqa",
               "--task-data", tmp_path / "nowhere", fragments=("nowhere",))


def test_unknown_task_name(capsys, tmp_path, models):
    eval_fails(capsys, tmp_path, models["llama"], "--tasks", "lambada,squad", fragments=("squad", "lambada"))


@pytest.mark.parametrize("argv", [
    ["eval", "MODEL", "--seqlen", "0"],
    ["eval", "MODEL", "--windows", "many"],
    ["compress", "MODEL", "--out", "OUT"],          # --recipe missing
    ["frobnicate"],
    [],
])
def test_usage_errors_are_one_line(capsys, tmp_path, models, argv):
    argv = [str(models["llama"]) if a == "MODEL" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert_one_line_error(*cli(capsys, *argv))
    assert_no_output(tmp_path / "out")


# ---------------------------------------------------------------- happy path

def test_compress_then_eval(capsys, tmp_path, models):
    out = tmp_path / "tiny-w4"
    code, stdout, err = cli(capsys, "--quiet", "compress", models["llama"], "--recipe", "rtn-w4-g32",
                            "--out", out, *SEQ)
    assert code == 0, err
    assert err == ""
    assert f"wrote {out}" in stdout
    meta = json.loads((out / "slimformer.json").read_text())
    assert "group_size: 32" in meta["recipe"]
    assert "model.layers.1.mlp.down_proj" in meta["modules"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tiny-w4.")]

    report = tmp_path / "r" / "eval.json"
    code, stdout, err = cli(capsys, "--quiet", "eval", out, *SEQ, "--windows", "3", "--json", report)
    assert code == 0, err
    printed = json.loads(stdout)
    for key in ("perplexity", "tokens", "stored_bytes", "peak_rss_bytes"):
        assert key in printed, key
    assert 1 < printed["perplexity"] < 2 * len(tiny_tokenizer())
    assert printed["tokens"] == 3 * 31
    assert printed["stored_bytes"] == (out / "model.safetensors").stat().st_size
    assert printed["peak_rss_bytes"] > 10_000_000
    assert json.loads(report.read_text()) == printed

    # The compressed model is smaller on disk than the fp32 original.
    assert printed["stored_bytes"] < (models["llama"] / "model.safetensors").stat().st_size * 0.7

    # Outputs are ordinary files and directories (umask), not private temporary ones.
    mask = os.umask(0o022)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask
    assert (report.stat().st_mode & 0o777) == 0o666 & ~mask

    # Agreement with the uncompressed model as reference.
    code, stdout, err = cli(capsys, "--quiet", "eval", out, *SEQ, "--windows", "3", "--reference", models["llama"])
    assert code == 0, err
    agreed = json.loads(stdout)
    assert 0 <= agreed["kl"] < 0.5 and 0.5 < agreed["top1_agreement"] <= 1
    assert agreed["perplexity"] == pytest.approx(printed["perplexity"])


def test_recipes_lists_builtins(capsys):
    from slimformer.recipes import builtin_recipes

    code, stdout, err = cli(capsys, "recipes")
    assert code == 0 and err == ""
    names = [line.split()[0] for line in stdout.splitlines() if line.strip()]
    assert names == list(builtin_recipes())
    assert {"rtn-w8", "rtn-w4-g32", "rtn-w3-g64"} <= set(names)


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return list(action.choices)


@pytest.mark.parametrize("command", [None, *_subcommands()])
def test_help(capsys, command):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: slimformer") and err == ""
    if command:
        assert command in out.splitlines()[0]


# ---------------------------------------------------------------- a real process

def _subprocess(*argv, env_extra=None, tmp_path):
    env = {**os.environ, "SLIMFORMER_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "slimformer", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_subprocess_missing_model(tmp_path):
    out = tmp_path / "out"
    proc = _subprocess("compress", tmp_path / "nope", "--recipe", "rtn-w8", "--out", out, tmp_path=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"slimformer: error: model not found: {tmp_path / 'nope'}"]
    assert_no_output(out)


def test_subprocess_group_size_error(tmp_path, models):
    out = tmp_path / "out"
    recipe = recipe_file(tmp_path, "stages:\n  - RTN: {bits: 4, granularity: group, group_size: 48}\n")
    proc = _subprocess("--quiet", "compress", models["llama"], "--recipe", recipe, "--out", out, *SEQ,
                       tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimformer: error: model.layers.0.self_attn.q_proj"), proc.stderr
    assert_no_output(out)
