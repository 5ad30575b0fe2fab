"""The CLI is derived from api.py: defaults from the signatures, --set overrides through the
recipe validation path, the export command, and every README command line parses."""

from __future__ import annotations

import inspect
import json
import re
import shlex
from pathlib import Path

import pytest

from slimformer.cli import build_parser, main, param_help
from slimformer.core.transform import registered
from slimformer.errors import RecipeError
from slimformer.recipes import apply_overrides, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def _subparsers(parser):
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            return action.choices
    raise AssertionError("no subcommands")


def _norm(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def test_every_mapped_cli_default_is_the_api_signature_default():
    checked = 0
    for command, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            mapped = getattr(action, "api_parameter", None)
            if mapped is None:
                continue
            func, name = mapped
            default = inspect.signature(func).parameters[name].default
            assert _norm(action.default) == _norm(default), f"{command} {action.option_strings}: {action.default!r} != {default!r}"
            assert action.help, f"{command} {action.option_strings}: no help text"
            checked += 1
    assert checked > 60


def test_mapped_options_cover_the_api_keywords_of_each_command():
    """Every keyword of compress/evaluate/compare/inspect/generate/bench that a user sets has an option."""
    import slimformer.api as api

    internal = {"progress", "source_name", "inplace", "overrides", "decode", "prefill", "reference", "dtype"}
    commands = {"compress": api.compress, "eval": api.evaluate, "compare": api.compare, "inspect": api.inspect,
                "generate": api.generate, "bench": api.bench, "export": api.export, "train": api.train}
    subs = _subparsers(build_parser())
    for command, func in commands.items():
        dests = {a.dest for a in subs[command]._actions}
        wanted = {n for n, p in inspect.signature(func).parameters.items()
                  if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD} - internal
        if command == "train":
            wanted -= {"teacher"}
        assert wanted <= dests, f"{command}: no option for {sorted(wanted - dests)}"


def test_help_comes_from_the_docstring():
    import slimformer.api as api

    assert param_help(api.compress)["calib_samples"] == "calibration sequences"
    sub = _subparsers(build_parser())["compress"]
    action = next(a for a in sub._actions if a.dest == "calib_samples")
    assert action.help == "calibration sequences (default 128)"


def _readme_commands() -> list[str]:
    lines, found = (ROOT / "README.md").read_text().splitlines(), []
    for i, line in enumerate(lines):
        if line.startswith("slimformer "):
            command = line
            while i + 1 < len(lines) and lines[i + 1].startswith(" " * 10) and lines[i + 1].strip().startswith("["):
                i += 1
                command += " " + lines[i].strip()
            found.append(command)
    makefile = (ROOT / "Makefile").read_text()
    found += ["slimformer " + m for m in re.findall(r"\$\(BIN\)/slimformer (.*)", makefile)]
    return found


def test_readme_and_makefile_command_lines_parse():
    parser = build_parser()
    subs = _subparsers(parser)
    commands = _readme_commands()
    assert len(commands) > 20
    for command in commands:
        command = command.split("   #")[0]
        if "[" in command or "|" in command or "NAME_OR_YAML" in command:
            # a synopsis: every flag it names exists
            name = command.split()[1]
            flags = {s for a in subs[name]._actions for s in a.option_strings}
            for flag in re.findall(r"(--[a-z0-9-]+)", command):
                assert flag in flags, f"{command}: {flag}"
        else:
            parser.parse_args(shlex.split(command)[1:])


def test_set_applies_a_value_checked_like_the_recipe():
    recipe = apply_overrides(load_recipe("gptq-w4-g64"), ["GPTQ.block_size=64", "GPTQ.dampening=0.02"])
    assert recipe.stages[0].block_size == 64 and recipe.stages[0].dampening == 0.02   # (last: QuantizeEmbeddings)
    assert "# overridden: --set GPTQ.block_size=64" in recipe.text
    hawq = apply_overrides(load_recipe("hawq-4.5"), [("--budget-bits 5", "HAWQ.budget_bits=5")])
    assert hawq.stages[0].budget_bits == 5


@pytest.mark.parametrize("override,fragment", [
    ("Nope.bits=4", "unknown technique 'Nope'"),
    ("GPTQ.bits=4", "needs a recipe with a GPTQ stage"),
    ("RTN.bitz=4", "unknown argument 'bitz'"),
    ("RTN.bits=four", "bad value 'four'"),
    ("RTN.bits=99", "RTN"),
    ("RTN.granularity=rows", "granularity"),
    ("RTN bits 4", "STAGE.FIELD=VALUE"),
])
def test_set_errors(override, fragment):
    with pytest.raises(RecipeError, match=re.escape(fragment)):
        apply_overrides(load_recipe("rtn-w4"), [override])


def test_budget_bits_is_an_alias_for_set():
    args = build_parser().parse_args(["compress", "m", "--recipe", "hawq-4.5", "--out", "o", "--budget-bits", "4.5",
                                      "--set", "HAWQ.samples=2"])
    assert args.overrides == [("--budget-bits 4.5", "HAWQ.budget_bits=4.5"), ("--set HAWQ.samples=2", "HAWQ.samples=2")]
    recipe = apply_overrides(load_recipe("hawq-4.5"), args.overrides)
    assert recipe.stages[0].budget_bits == 4.5 and recipe.stages[0].samples == 2
    assert "HAWQ" in registered()


@pytest.mark.parametrize("argv,fragment", [
    (["compress", "{model}", "--recipe", "rtn-w4", "--set", "RTN.bitz=3"], "unknown argument 'bitz'"),
    (["compress", "{model}", "--recipe", "rtn-w4", "--set", "Bogus.x=1"], "unknown technique 'Bogus'"),
    (["compress", "{model}", "--recipe", "rtn-w4", "--set", "RTN.bits=[1"], "not valid YAML"),
    (["train", "{model}", "--recipe", "gmp-50", "--data", "pydoc", "--set", "GMP.final_sparsity=2"], "GMP"),
    (["compare", "{model}", "--recipes", "rtn-w8,rtn-w4", "--set", "GPTQ.block_size=8"], "GPTQ stage"),
])
def test_cli_set_errors_are_one_line_before_the_model_loads(capsys, tmp_path, argv, fragment):
    out = tmp_path / "out"
    argv = [a.format(model=tmp_path / "no-such-model") for a in argv] + ["--out", str(out)]
    assert main(["--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from slimformer.models.tiny import tiny_model, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model("llama", seed=1).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_cli_set_applies_and_is_recorded(capsys, tmp_path, tiny_dir):
    out = tmp_path / "w8"
    assert main(["--quiet", "compress", str(tiny_dir), "--recipe", "rtn-w4", "--set", "RTN.bits=8",
                 "--out", str(out)]) == 0
    saved = json.loads((out / "slimformer.json").read_text())
    assert "# overridden: --set RTN.bits=8" in saved["recipe"]
    assert {m["weight"]["bits"] for m in saved["modules"].values() if m["type"] == "QuantLinear"} == {8}


@pytest.mark.parametrize("fmt", ["compressed", "offload"])
def test_cli_export(capsys, tmp_path, tiny_dir, fmt):
    import slimformer

    out = tmp_path / fmt
    assert main(["--quiet", "export", str(tiny_dir), "--format", fmt, "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    if fmt == "offload":
        from slimformer.runtime.offload import load_offloaded

        model, _ = load_offloaded(str(out), 10**9)
    else:
        model, _ = slimformer.load(str(out))
    assert model.config.num_hidden_layers == 2
    assert main(["--quiet", "export", str(tiny_dir), "--format", fmt, "--out", str(out)]) == 2   # exists
    assert main(["--quiet", "export", str(tiny_dir), "--format", fmt, "--out", str(out), "--overwrite"]) == 0


def test_cli_export_unknown_format(capsys, tmp_path, tiny_dir):
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(tiny_dir), "--format", "onnx", "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err
