"""The Transform: one configuration dataclass per technique, registered by name.

A recipe is a list of Transforms. The runner (``core/runner.py``, ``run_recipe``) runs
them in recipe order. A one-shot stage is called per block: ``prepare`` (attach
observers, masks, ...), one shared calibration pass when any Transform of the stage
``needs`` it, then ``convert`` (fold, quantise, swap modules). A training stage
(``needs = Needs.TRAINING``) gives the training loop a ``training_hook`` and may add
``loss_terms``; consecutive training stages share one training run.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn

from slimformer.errors import RecipeError
from slimformer.models.adapters import Adapter
from slimformer.nn.surgery import linear_weight

if TYPE_CHECKING:
    from slimformer.train.hooks import TrainHook
    from slimformer.train.loop import TrainConfig
    from slimformer.train.losses import LossTerm


class Needs(enum.Enum):
    NONE = "none"
    CALIBRATION = "calibration"
    TRAINING = "training"


@dataclass
class BlockContext:
    """What a Transform sees while processing one block."""

    model: nn.Module
    adapter: Adapter
    index: int                      # block number
    prefix: str                     # dotted path of the block from the model root
    state: dict = field(default_factory=dict)     # per-transform scratch, keyed by the transform
    fallbacks: list = field(default_factory=list)  # layers not processed as asked, with reasons
    plan: dict = field(default_factory=dict)      # shared by all stages: model-level decisions (see Transform.plan_model)
    layer_report: dict = field(default_factory=dict)  # full layer name -> {measure: value}, saved with the model

    def fallback(self, layer: str, reason: str) -> None:
        self.fallbacks.append(f"{self.prefix}.{layer}: {reason}")

    def report(self, layer: str, **values) -> None:
        """Record per-layer facts worth keeping (e.g. LLM.int8()'s outlier fraction):
        they go into the compress result and the saved ``slimformer.json`` under ``layers``."""
        self.layer_report.setdefault(f"{self.prefix}.{layer}", {}).update(values)


@dataclass(frozen=True)
class Targets:
    """Which projections of each block a Transform touches: regular expressions
    matched (``re.fullmatch``) against the projection's path inside its block, e.g.
    ``self_attn.q_proj``; ``ignore`` wins over ``include``; ``blocks`` limits block indices."""

    include: tuple[str, ...] = (".*",)
    ignore: tuple[str, ...] = ()
    blocks: tuple[int, ...] | None = None

    def __post_init__(self):
        for key in ("include", "ignore"):
            for pattern in getattr(self, key):
                if not isinstance(pattern, str):
                    raise RecipeError(f"targets {key}: patterns must be strings, got {pattern!r}")
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise RecipeError(f"targets {key}: invalid pattern {pattern!r}: {exc}") from None
        if self.blocks is not None and not all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in self.blocks
        ):
            raise RecipeError(f"targets blocks must be block numbers (integers from 0), got {list(self.blocks)!r}")

    def select(self, names: typing.Iterable[str], block_index: int) -> list[str]:
        if self.blocks is not None and block_index not in self.blocks:
            return []
        return [
            n for n in names
            if any(re.fullmatch(p, n) for p in self.include) and not any(re.fullmatch(p, n) for p in self.ignore)
        ]

    @classmethod
    def parse(cls, value: Any) -> "Targets":
        if isinstance(value, Targets):
            return value
        if isinstance(value, str):
            return cls(include=(value,))
        if isinstance(value, list):
            return cls(include=tuple(value))
        if isinstance(value, dict):
            unknown = set(value) - {"include", "ignore", "blocks"}
            if unknown:
                raise RecipeError(f"unknown key '{sorted(unknown)[0]}' in targets")
            to_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,)  # noqa: E731
            return cls(
                include=to_tuple(value.get("include", ".*")),
                ignore=to_tuple(value.get("ignore", ())),
                blocks=None if value.get("blocks") is None else to_tuple(value["blocks"]),
            )
        raise RecipeError(f"targets must be a pattern, a list of patterns or a mapping, got {value!r}")


@dataclass(frozen=True)
class Transform:
    """Base class. Subclasses are frozen dataclasses decorated with ``@register``."""

    targets: Targets = Targets()
    needs: ClassVar[Needs] = Needs.NONE
    # True when ``convert`` changes nothing a block computes (a model-level stage such as
    # QuantizeEmbeddings): the runner then keeps the block outputs an earlier one-pass stage made.
    keeps_block_outputs: ClassVar[bool] = False

    def requires(self) -> Needs:
        """What this configuration needs (a technique may need data only for some settings)."""
        return self.needs

    # True when the calibration forward itself compresses the block (hooks quantise each
    # layer as the whole calibration batch reaches it, e.g. GPTQ layer by layer): the runner
    # then forwards all calibration inputs as one batch, and that forward's outputs are
    # already those of the compressed block.
    def one_pass(self) -> bool:
        return False

    def plan_model(self, model: nn.Module, adapter: Adapter, calib, plan: dict) -> None:
        """Optional: model-level analysis before any block is changed (e.g. HAWQ's
        sensitivities); decisions go into ``plan``, which every stage's context shares
        as ``ctx.plan``. ``calib``: the calibration token ids, or None."""

    def prepare(self, block: nn.Module, ctx: BlockContext) -> None:
        """Optional: attach observers before the calibration pass over this block."""

    def convert(self, block: nn.Module, ctx: BlockContext) -> None:
        """Required: change the block (fold, quantise, swap modules)."""
        raise NotImplementedError

    def finish(self, model: nn.Module, adapter: Adapter) -> None:
        """Optional: model-level work after all blocks (e.g. the LM head)."""

    # -- training stages (``needs = Needs.TRAINING``) -----------------------------------

    def training_hook(self, model: nn.Module, adapter: Adapter, config: "TrainConfig") -> "TrainHook":
        """Required for a training stage: the hook that runs this technique inside the
        training loop (masks, straight-through estimators, schedules). Called once, when the
        training run this stage belongs to starts, after the stages before it have run."""
        raise NotImplementedError(f"{type(self).__name__} is not a training stage")

    def loss_terms(self, model: nn.Module, adapter: Adapter, config: "TrainConfig") -> list["LossTerm"]:
        """Optional for a training stage: terms it adds to the loss (see ``train/losses.py``),
        next to those of the recipe's ``train:`` section."""
        return []

    def summary(self, model: nn.Module, adapter: Adapter) -> dict | None:
        """Optional: facts about the result worth reporting (e.g. ``{"sparsity": ...}``)."""
        return None

    def target_linears(self, block: nn.Module, ctx: BlockContext) -> dict[str, nn.Module]:
        names = self.targets.select(ctx.adapter.linears, ctx.index)
        return {n: block.get_submodule(n) for n in names}


def check_targets(transforms: typing.Iterable[Transform], model: nn.Module, adapter: Adapter) -> None:
    """Refuse a stage whose targets select no projection of ``model``: it would silently do nothing."""
    n_blocks = len(adapter.get_blocks(model))
    for number, transform in enumerate(transforms, 1):
        if not any(transform.targets.select(adapter.linears, b) for b in range(n_blocks)):
            raise RecipeError(
                f"stage {number} ({type(transform).__name__}): targets select no projection of this "
                f"{adapter.family} model (projections: {', '.join(adapter.linears)}; blocks 0-{n_blocks - 1})"
            )


_REGISTRY: dict[str, type[Transform]] = {}


def register(cls: type[Transform]) -> type[Transform]:
    """Register a Transform under its class name (the recipe key)."""
    _REGISTRY[cls.__name__] = cls
    return cls


def registered() -> dict[str, type[Transform]]:
    return dict(_REGISTRY)


def build_transform(name: str, args: dict | None) -> Transform:
    """A Transform from a recipe stage; every error names the key."""
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none: slimformer.plugins.load_builtin() registers the built-in ones"
        raise RecipeError(f"unknown technique '{name}' (known: {known})")
    cls = _REGISTRY[name]
    args = dict(args or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in args:
        if key not in fields:
            raise RecipeError(f"{name}: unknown argument '{key}' (accepted: {', '.join(fields)})")
    if "targets" in args:
        args["targets"] = Targets.parse(args["targets"])
    for key, value in list(args.items()):
        if key != "targets":
            args[key] = value = _yaml_float(value, hints.get(key))
            _check_type(name, key, value, hints.get(key))
    try:
        return cls(**args)
    except RecipeError:
        raise
    except Exception as exc:  # __post_init__ validation
        raise RecipeError(f"{name}: {exc}") from None


def _yaml_float(value: Any, hint) -> Any:
    """PyYAML reads ``2e-4`` (no dot) as a string: where a float is expected, read it as one."""
    if isinstance(value, str) and float in (typing.get_args(hint) or (hint,)):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_type(technique: str, key: str, value: Any, hint) -> None:
    if hint is None:
        return
    origin = typing.get_origin(hint)
    allowed = typing.get_args(hint) if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) else (hint,)
    ok = False
    for option in allowed:
        base = typing.get_origin(option) or option
        if option is type(None) and value is None:
            ok = True
        elif base is typing.Literal and value in typing.get_args(option):
            ok = True
        elif base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            ok = True
        elif base is int and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        elif isinstance(base, type) and base not in (float, int) and isinstance(value, base):
            ok = True
    if not ok:
        raise RecipeError(f"{technique}: argument '{key}' has bad value {value!r} (expected {_hint_name(hint)})")


def _hint_name(hint) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def target_weights(model: nn.Module, adapter, targets) -> dict[str, torch.Tensor]:
    """Full name → ``[out, in]`` weight of every projection ``targets`` selects, all blocks."""
    found = {}
    for index, block in enumerate(adapter.get_blocks(model)):
        for name in targets.select(adapter.linears, index):
            found[f"{adapter.blocks}.{index}.{name}"] = linear_weight(block.get_submodule(name))
    return found
