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

``apply_overrides`` changes one argument of a stage (``--set GPTQ.block_size=64``): the
value is read as a YAML scalar and checked exactly as the recipe's own arguments are.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from slimformer.core.transform import Transform, build_transform, registered
from slimformer.errors import RecipeError

_TOP_KEYS = {"name", "description", "stages", "train"}
MAX_RECIPE_BYTES = 1 << 20
# A recipe's name becomes a directory and file name (compare's models/NAME, report rows):
# a plain name, never a path.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")


def check_recipe_name(name) -> str:
    """``name`` if it is a safe plain name (letters, digits, ``. _ + -``, at most 100
    characters, no ``..``): it is used as a path component."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise RecipeError(f"recipe name {str(name)[:80]!r} is not a plain name (letters, digits, '.', '_', '+', '-'; "
                          "at most 100 characters; no '..' or '/')")
    return name


@dataclass
class Recipe:
    name: str
    stages: list[Transform]
    description: str = ""
    text: str = field(default="", repr=False)   # the YAML verbatim, stored with every output
    train: dict = field(default_factory=dict)    # training settings for `slimformer train`

    def __post_init__(self):
        check_recipe_name(self.name)


class _RecipeLoader(yaml.SafeLoader):
    """YAML without anchors and aliases (a recipe never needs them; they let a small file
    stand for a huge tree)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise RecipeError(f"invalid recipe YAML at line {event.start_mark.line + 1}: aliases (*name) are not accepted")
        return super().compose_node(parent, index)


MAX_FLOW_DEPTH = 64
_BRACKETS = re.compile(r"[^\[\]{}]+")


def _flow_depth(text: str) -> int:
    """Deepest nesting of [ ] / { } (quotes ignored: an over-estimate). PyYAML's scanner slows
    down superlinearly on deep flow nesting, so it is bounded before YAML sees the text."""
    depth = deepest = 0
    for ch in _BRACKETS.sub("", text):
        depth = depth + 1 if ch in "[{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest


def parse_recipe(text: str, default_name: str = "recipe") -> Recipe:
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe is {len(text)} characters, more than the {MAX_RECIPE_BYTES} allowed")
    if _flow_depth(text) > MAX_FLOW_DEPTH:
        raise RecipeError(f"invalid recipe YAML: [ ] / {{ }} nested more than {MAX_FLOW_DEPTH} levels")
    try:
        data = yaml.load(text, Loader=_RecipeLoader)   # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        problem = (problem.strip().splitlines() or ["unreadable"])[0]   # one line: PyYAML adds the position below
        raise RecipeError(f"invalid recipe YAML{where}: {problem}") from None
    except RecursionError:
        raise RecipeError("invalid recipe YAML: nested too deeply") from None
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
    if name is None:
        try:
            name = check_recipe_name(default_name)
        except RecipeError as exc:
            raise RecipeError(f"{exc}; the name comes from the file name here: add a 'name:' key") from None
    if description is not None and not isinstance(description, str):
        raise RecipeError(f"recipe key 'description' must be text, found {type(description).__name__}")
    return Recipe(check_recipe_name(name), transforms, "" if description is None else description, text, train)


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
        try:
            size = path.stat().st_size
            if size > MAX_RECIPE_BYTES:
                raise RecipeError(f"{path}: {size} bytes, more than the {MAX_RECIPE_BYTES} a recipe may have")
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"{path}: cannot read the recipe ({str(exc).splitlines()[0][:120]})") from None
        try:
            return parse_recipe(text, path.stem)
        except RecipeError as exc:
            raise RecipeError(f"{path}: {exc}") from None
    raise RecipeError(f"unknown recipe '{name_or_path}' (built-in: {', '.join(builtins)}; or a .yaml path)")


def stage_args(stage: Transform) -> dict:
    """The arguments that rebuild ``stage`` with ``build_transform`` (tuples as the lists
    YAML would give)."""
    args = {f.name: getattr(stage, f.name) for f in dataclasses.fields(stage) if f.init}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}


def parse_override(text: str) -> tuple[str, str, object]:
    """``"Stage.field=value"`` → ``(stage, field, value)``, the value read as YAML."""
    key, sep, raw = text.partition("=")
    stage, dot, name = key.strip().partition(".")
    if not sep or not dot or not stage or not name:
        raise RecipeError(f"--set {text}: expected STAGE.FIELD=VALUE, e.g. GPTQ.block_size=64")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise RecipeError(f"--set {text}: the value is not valid YAML") from None
    return stage, name.strip(), value


def apply_overrides(recipe: Recipe, overrides, *, missing: str = "error") -> Recipe:
    """``recipe`` with stage arguments overridden. ``overrides``: ``"Stage.field=value"``
    strings, or ``(label, "Stage.field=value")`` pairs where ``label`` is how the user
    wrote it (for messages and the note appended to the recipe text). A stage name the
    recipe lacks is an error, unless ``missing="skip"``."""
    stages, notes = list(recipe.stages), []
    for item in overrides:
        label, text = item if isinstance(item, (tuple, list)) else (f"--set {item}", item)
        name, key, value = parse_override(text)
        if name not in registered():
            raise RecipeError(f"{label}: unknown technique '{name}' (known: {', '.join(sorted(registered()))})")
        hits = [i for i, stage in enumerate(stages) if type(stage).__name__ == name]
        if not hits:
            if missing == "skip":
                continue
            present = ", ".join(type(s).__name__ for s in stages)
            raise RecipeError(f"{label} needs a recipe with a {name} stage; {recipe.name} has none (stages: {present})")
        for i in hits:
            try:
                stages[i] = build_transform(name, {**stage_args(stages[i]), key: value})
            except RecipeError as exc:
                raise RecipeError(f"{label}: {exc}") from None
        notes.append(label)
    if not notes:
        return recipe
    text = (recipe.text or f"name: {recipe.name}").rstrip() + "\n" + "".join(f"# overridden: {n}\n" for n in notes)
    return dataclasses.replace(recipe, stages=stages, text=text)


def recipe_has_stage(recipe: Recipe, name: str) -> bool:
    return any(type(stage).__name__ == name for stage in recipe.stages)
