"""Recipes: YAML lists of technique stages, validated against the registered Transforms.

```yaml
name: rtn-w4-g64
description: 4-bit weights, one scale per 64 input columns
stages:
  - RTN: {bits: 4, granularity: group, group_size: 64}
```
A recipe whose stages train (GMP, STE, ...) may carry a ``train:`` mapping of
:class:`~slimformer.train.TrainConfig` settings (steps, lr, schedule, ...), read by
``slimformer train``; its flags override them.
The same object is built from Python (``Recipe(name, [RTN(bits=4, ...)])``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from slimformer.core.transform import Transform, build_transform
from slimformer.errors import RecipeError

_TOP_KEYS = {"name", "description", "stages", "train"}


@dataclass
class Recipe:
    name: str
    stages: list[Transform]
    description: str = ""
    text: str = field(default="", repr=False)   # the YAML verbatim, stored with every output
    train: dict = field(default_factory=dict)    # training settings for `slimformer train`


def parse_recipe(text: str, default_name: str = "recipe") -> Recipe:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"invalid recipe YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping with a 'stages' list")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise RecipeError(f"unknown recipe key '{sorted(unknown)[0]}' (accepted: {', '.join(sorted(_TOP_KEYS))})")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise RecipeError("recipe key 'stages' must be a non-empty list")
    transforms = []
    for i, stage in enumerate(stages):
        if isinstance(stage, str):
            stage = {stage: {}}
        if not isinstance(stage, dict) or len(stage) != 1:
            raise RecipeError(f"stage {i + 1} must be a mapping of one technique name to its arguments")
        (name, args), = stage.items()
        if args is not None and not isinstance(args, dict):
            raise RecipeError(f"stage {i + 1} ({name}): arguments must be a mapping")
        transforms.append(build_transform(name, args))
    name, description = data.get("name"), data.get("description")
    train = data.get("train") or {}
    if not isinstance(train, dict):
        raise RecipeError("recipe key 'train' must be a mapping of training settings")
    from slimformer.train.loop import TrainConfig

    TrainConfig.parse(train)   # validate now: a typo fails when the recipe is read, not after loading the model
    return Recipe(default_name if name is None else str(name), transforms,
                  "" if description is None else str(description), text, train)


def _builtin_dir():
    return resources.files("slimformer.recipes") / "builtin"


def builtin_recipes() -> dict[str, str]:
    """Built-in recipe names → YAML text."""
    return {
        entry.name[: -len(".yaml")]: entry.read_text()
        for entry in sorted(_builtin_dir().iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".yaml")
    }


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a YAML file."""
    builtins = builtin_recipes()
    if name_or_path in builtins:
        return parse_recipe(builtins[name_or_path], name_or_path)
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        return parse_recipe(path.read_text(), path.stem)
    raise RecipeError(f"unknown recipe '{name_or_path}' (built-in: {', '.join(builtins)}; or a .yaml path)")
