"""QAT: quantisation-aware training that deploys exactly.

The stage swaps every targeted projection for a :class:`~slimformer.nn.fake_quant.FakeQuantLinear`
when its training run starts (before the trainer is built and before a resume, so the
optimiser and the checkpoints see the fake-quant parameters), and converts each back to a
``QuantLinear`` with the codes its forward used when training ends: the model then saves,
loads and exports through the paths PTQ models take, and computes what training computed.

Initialisation: from a float Linear, RTN's min/max scales; from a ``QuantLinear`` already in
place (a recipe ``[GPTQ, QAT]``), its dequantised weight, scales and zero-points, so the
first forward is that model's exactly. The loss is the recipe's ``train: loss`` (e.g.
``distill``: KL to the model as it was before the first stage).

Checks: the format must be one the runtime deploys on every targeted layer (refused at
hook creation, naming the layer, before any training); after each backward and each
optimiser step, a non-finite gradient, weight or scale, or a learned scale collapsing to
zero, stops training naming the step and the layer (no checkpoint is written after it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from slimformer.core.transform import Needs, Transform, register
from slimformer.errors import QuantConfigError, TrainingError
from slimformer.formats.spec import ActGranularity, QuantFormat, WeightGranularity
from slimformer.nn.fake_quant import MIN_SCALE, FakeQuantLinear
from slimformer.nn.quant_linear import QuantLinear
from slimformer.nn.surgery import is_linear, set_module
from slimformer.train.hooks import TrainHook


@register
@dataclass(frozen=True)
class QAT(QuantFormat, Transform):
    """Arguments: the weight / activation format (:class:`QuantFormat`: default int4 in
    symmetric groups of 32), ``targets``, and:

    - ``learn_scales``: LSQ scales (else fixed at their initial values);
    - ``scale_lr_ratio``: the scales' (and activation clips') learning rate on log s relative
      to the weights' (the trainer's ``lr``);
    - ``learn_act_clip``: learn the static activation clip value (PACT-style; else it stays
      at the first batch's range);
    - ``freeze_embeddings``: keep the embedding table and the LM head fixed (they are not
      fake-quantised here; a ``QuantizeEmbeddings`` stage after training quantises them): saves
      their gradients and optimiser state (on SmolLM2 a fifth of the parameters).
    """

    bits: int = 4
    granularity: WeightGranularity = "group"
    group_size: int | None = 32
    act_granularity: ActGranularity = "token"
    learn_scales: bool = True
    scale_lr_ratio: float = 20.0
    learn_act_clip: bool = True
    freeze_embeddings: bool = True

    needs = Needs.TRAINING

    def __post_init__(self):
        super().__post_init__()
        if not self.scale_lr_ratio > 0:
            raise QuantConfigError(f"scale_lr_ratio must be positive, got {self.scale_lr_ratio!r}")
        act = self.act_spec()
        if act is not None and not act.dynamic and not act.symmetric:
            raise QuantConfigError("QAT learns static activation clipping for symmetric formats only "
                                   "(act_symmetric: true)")

    def convert(self, block, ctx):
        raise QuantConfigError("QAT trains: use `slimformer train`")

    def training_hook(self, model: nn.Module, adapter, config) -> "QATHook":
        wspec, aspec = self.weight_spec(), self.act_spec()
        found: dict[str, tuple[nn.Module, str, nn.Module]] = {}
        for index, block in enumerate(adapter.get_blocks(model)):
            for name in self.targets.select(adapter.linears, index):
                module = block.get_submodule(name)
                full = f"{adapter.blocks}.{index}.{name}"
                if not (isinstance(module, QuantLinear) or is_linear(module)):
                    raise QuantConfigError(f"{full}: QAT starts from a Linear or a QuantLinear, not a "
                                           f"{type(module).__name__}")
                found[full] = (block, name, module)
        # Check every layer before swapping any: refuse before training starts.
        fakes = {}
        for full, (block, name, module) in found.items():
            try:
                fakes[full] = FakeQuantLinear.from_module(
                    module, wspec, aspec, learn_scale=self.learn_scales, scale_lr_ratio=self.scale_lr_ratio,
                    learn_act_clip=self.learn_act_clip)
            except QuantConfigError as exc:
                raise QuantConfigError(f"{full}: {exc}") from None
        for full, (block, name, _module) in found.items():
            set_module(block, name, fakes[full])
        if self.freeze_embeddings:
            for get in ("get_input_embeddings", "get_output_embeddings"):
                table = getattr(model, get, lambda: None)()
                if table is not None:
                    table.requires_grad_(False)
        return QATHook(model, fakes)


class QATHook(TrainHook):
    """Runs the fake-quant layers: calibrates static activation ranges on the first batch,
    checks every step for collapse or non-finite values, converts to ``QuantLinear`` at the end."""

    def __init__(self, model: nn.Module, layers: dict[str, FakeQuantLinear]):
        self.model, self.layers = model, layers
        self.converted: dict[str, QuantLinear] = {}

    def on_start(self, trainer) -> None:
        waiting = [m for m in self.layers.values() if m.act_ready is not None and not bool(m.act_ready)]
        if not waiting:
            return   # weight-only, dynamic activations, or a resumed run (the ranges are in the checkpoint)
        for module in waiting:
            module.start_observing()
        with torch.no_grad():
            self.model(input_ids=trainer.batches(0), use_cache=False)
        for module in waiting:
            module.finish_observing()

    def _check(self, step: int, gradients: bool) -> None:
        for name, module in self.layers.items():
            if gradients:
                for pname, p in module.named_parameters():
                    if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                        raise TrainingError(f"step {step}: {name}: the gradient of {pname} is not finite "
                                            "(non-finite loss or overflow); lower the learning rate — the last "
                                            "checkpoint is kept")
                continue
            for pname, p in module.named_parameters():
                if not bool(torch.isfinite(p).all()):
                    raise TrainingError(f"step {step}: {name}: {pname} became non-finite; lower the learning rate "
                                        "— the last checkpoint is kept")
            scale = module.latent_scale().detach()
            if bool((scale < MIN_SCALE).any()):
                raise TrainingError(f"step {step}: {name}: a learned scale collapsed to zero "
                                    f"(min {float(scale.min()):.3g}); lower scale_lr_ratio or the learning rate — "
                                    "the last checkpoint is kept")
            if module.act_log_clip is not None:
                clip = float(module.act_scale().detach()) * module.act_spec.qmax
                if not clip >= MIN_SCALE:
                    raise TrainingError(f"step {step}: {name}: the learned activation clip collapsed to {clip:.3g}; "
                                        "lower scale_lr_ratio or the learning rate — the last checkpoint is kept")

    def after_backward(self, trainer, step: int) -> None:
        self._check(step + 1, gradients=True)

    def after_step(self, trainer, step: int) -> None:
        self._check(step + 1, gradients=False)

    def on_end(self, trainer) -> None:
        for name, module in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            quant = module.to_quant_linear()
            set_module(self.model.get_submodule(parent_name), child, quant)
            self.converted[name] = quant
